"""asyncio variant of the client: the same calls, awaitable.

Each call runs the blocking client's call on a worker thread (``asyncio.to_thread``): the
native calls release the GIL and block on the socket (no polling), so an event loop stays free
while a lookup, a fetch's layer wait or a save is under way. Calls on one connection are
serialized by the connection itself; use several clients for parallel requests.
"""

from __future__ import annotations

import asyncio
import functools
import os
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Tuple, TypeVar, Union

from . import Client, FetchDone, FetchHandle, KvShape, Layout

if TYPE_CHECKING:
    import torch

__all__ = ["AsyncClient", "AsyncFetchHandle"]

T = TypeVar("T")


async def _run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))


class AsyncClient:
    """An asyncio connection to the daemon. Make one with ``await AsyncClient.connect(path)``."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @classmethod
    async def connect(cls, socket_path: Union[str, "os.PathLike[str]", None] = None) -> "AsyncClient":
        return cls(await _run(Client, socket_path))

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    async def lookup(self, model: str, tokens: Any) -> int:
        return await _run(self.client.lookup, model, tokens)

    async def fetch(self, model: str, tokens: Any, layout: Optional[Layout] = None, device: Any = "cpu") -> "AsyncFetchHandle":
        return AsyncFetchHandle(await _run(self.client.fetch, model, tokens, layout, device))

    async def save(
        self,
        model: str,
        tokens: Any,
        k_layers: Sequence["torch.Tensor"],
        v_layers: Sequence["torch.Tensor"],
        *,
        order: str = "nhd",
        replace: bool = False,
    ) -> int:
        return await _run(self.client.save, model, tokens, k_layers, v_layers, order=order, replace=replace)

    async def stats(self) -> dict:
        return await _run(self.client.stats)


class AsyncFetchHandle:
    """A fetch whose waits are awaitable; ``handle`` is the blocking :class:`FetchHandle`."""

    def __init__(self, handle: FetchHandle) -> None:
        self.handle = handle

    @property
    def shape(self) -> KvShape:
        return self.handle.shape

    @property
    def tokens(self) -> int:
        return self.handle.tokens

    @property
    def num_layers(self) -> int:
        return self.handle.num_layers

    async def layer(self, layer: int, stream: Optional["torch.cuda.Stream"] = None) -> Tuple["torch.Tensor", "torch.Tensor"]:
        """:meth:`FetchHandle.layer`, awaited. For GPU buffers pass ``stream`` explicitly: the
        worker thread's current stream is not the caller's."""
        if stream is None and self.handle.device != "cpu":
            import torch

            stream = torch.cuda.current_stream(self.handle.device)
        return await _run(self.handle.layer, layer, stream)

    async def wait_layer(self, layer: int) -> None:
        await _run(self.handle.wait_layer, layer)

    async def wait_done(self) -> FetchDone:
        return await _run(self.handle.wait_done)

    async def release(self) -> bool:
        return await _run(self.handle.release)

    async def __aenter__(self) -> "AsyncFetchHandle":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()
