"""KVFetcher's Python client: remote KV caches as PyTorch tensors.

A thin layer over the Rust client (``kvfetcher-client``, the one implementation of the local
protocol), for engines written in Python::

    import kvfetcher
    with kvfetcher.Client("/run/kvfetcher/kvfetcher.sock") as c:
        n = c.lookup(model_id, tokens)                  # tokens stored, 0 on a miss
        with c.fetch(model_id, tokens, kvfetcher.Layout(torch.float16, "hnd")) as f:
            for i in range(f.num_layers):
                k, v = f.layer(i)                       # waits for layer i; no copy
        c.save(model_id, tokens, k_layers, v_layers, order="hnd")

Host fetches are tensors over the daemon's buffer (a memfd, mapped copy-on-write: reading
costs nothing, a write copies the page it touches into this process). GPU fetches
(``device="cuda:N"``) are tensors over the daemon's device memory opened over CUDA IPC, and
``layer(i)`` makes the caller's current CUDA stream wait for the layer's restore without
blocking on the GPU. A buffer stays mapped while its handle or any tensor over it lives.

torch is imported only when tensors are made: ``lookup``, ``stats`` and model ids work
without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Optional, Sequence, Tuple, Union

from . import _native
from . import errors as _errors
from .errors import (
    BadRequestError,
    BusyError,
    ClientClosedError,
    ConnectError,
    ConnectionLostError,
    CorruptError,
    DaemonError,
    GpuDriverError,
    GpuUnsupportedError,
    InvalidArgumentError,
    KvFetcherError,
    LayerOutOfRangeError,
    NotFoundError,
    ProtocolError,
    ReleasedError,
    SharedMemoryError,
    UnavailableError,
    WrongMemoryError,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "Client",
    "FetchHandle",
    "FetchDone",
    "KvShape",
    "Layout",
    "DEFAULT_SOCKET",
    "model_id_from_file",
    "gpu_unavailable_reason",
    "buffer_len",
    *_errors.__all__,
]

__version__ = "0.1.0"

DEFAULT_SOCKET = "/run/kvfetcher/kvfetcher.sock"
"""The daemon's socket when neither an argument nor ``$KVFETCHER_SOCKET`` names one."""

_DTYPES = ("float16", "bfloat16", "float32")
_MAX_TOKEN = (1 << 32) - 1

Tokens = Union[Sequence[int], "torch.Tensor"]
DeviceLike = Union[str, "torch.device", None]


def _invalid(message: str) -> InvalidArgumentError:
    return InvalidArgumentError("invalid_argument", message)


def _dtype_name(dtype: Any) -> str:
    """``float16``/``bfloat16``/``float32`` from a torch dtype or a name."""
    name = str(dtype)
    name = name[len("torch."):] if name.startswith("torch.") else name
    name = {"f16": "float16", "half": "float16", "bf16": "bfloat16", "f32": "float32", "float": "float32"}.get(
        name, name
    )
    if name not in _DTYPES:
        raise _invalid(f"KV dtype must be float16, bfloat16 or float32, not {dtype}")
    return name


def _torch_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, name)


@dataclass(frozen=True)
class Layout:
    """How fetched (or saved) KV is laid out: for each layer, K then V.

    ``order`` ``"nhd"``: each tensor is ``[tokens, kv_heads, head_dim]``; ``"hnd"``:
    ``[kv_heads, tokens, head_dim]`` (what Hugging Face caches hold per sequence).
    ``block_tokens`` > 0 makes the layout paged: each tensor is ``[blocks, block_tokens,
    kv_heads, head_dim]`` (nhd) or ``[blocks, kv_heads, block_tokens, head_dim]`` (hnd), block
    ``b`` holding tokens ``[b*block_tokens, (b+1)*block_tokens)``, the last one zero-padded;
    copy them into an engine's paged cache with :meth:`FetchHandle.copy_layer_into`.
    """

    dtype: Any = "float16"
    """``torch.float16``, ``torch.bfloat16``, ``torch.float32`` (or their names)."""
    order: str = "nhd"
    block_tokens: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        if self.order not in ("nhd", "hnd"):
            raise _invalid(f'order must be "nhd" or "hnd", not {self.order!r}')
        if not isinstance(self.block_tokens, int) or not 0 <= self.block_tokens < 1 << 32:
            raise _invalid(f"block_tokens must be an int in [0, 2**32), not {self.block_tokens!r}")


class KvShape(NamedTuple):
    """The shape of a fetched cache; ``tokens`` is the prefix the daemon had."""

    num_layers: int
    tokens: int
    kv_heads: int
    head_dim: int


class FetchDone(NamedTuple):
    """The end of a fetch."""

    tokens: int
    bytes_on_wire: int


def _token_list(tokens: Tokens) -> list:
    """Token ids as a list of ints in [0, 2**32), from a sequence or a 1-D integer tensor."""
    if hasattr(tokens, "tolist") and hasattr(tokens, "dim"):
        if tokens.dim() != 1:
            raise _invalid(f"tokens must be 1-D, not of shape {tuple(tokens.shape)}")
        if tokens.is_floating_point() or tokens.is_complex():
            raise _invalid(f"tokens must be integers, not {tokens.dtype}")
        tokens = tokens.tolist()
    try:
        out = [int(t) for t in tokens]
    except (TypeError, ValueError) as e:
        raise _invalid(f"tokens must be a sequence of ints: {e}") from None
    for t in out:
        if not 0 <= t <= _MAX_TOKEN:
            raise _invalid(f"token id {t} is outside [0, 2**32)")
    if not out:
        raise _invalid("tokens is empty")
    return out


def _cuda_ordinal(device: DeviceLike) -> Optional[int]:
    """None for host memory, else the CUDA ordinal of ``device``."""
    if device is None:
        return None
    text = str(device)
    if text == "cpu":
        return None
    if text == "cuda":
        import torch

        return torch.cuda.current_device()
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    raise _invalid(f'device must be "cpu", "cuda" or "cuda:N", not {device!r}')


def _default_socket() -> str:
    return os.environ.get("KVFETCHER_SOCKET") or DEFAULT_SOCKET


class Client:
    """A blocking connection to the node daemon. Thread-safe: calls on one connection are
    serialized, and every blocking call releases the GIL."""

    def __init__(self, socket_path: Union[str, "os.PathLike[str]", None] = None) -> None:
        """Connects to ``socket_path`` (default ``$KVFETCHER_SOCKET``, else
        ``/run/kvfetcher/kvfetcher.sock``). Raises :class:`ConnectError` if nobody listens."""
        self._c = _native.Client(os.fspath(socket_path) if socket_path is not None else _default_socket())

    @property
    def socket_path(self) -> str:
        return self._c.socket_path

    @property
    def closed(self) -> bool:
        return self._c.closed

    def close(self) -> None:
        """Lets go of the connection: it closes once no fetch handle or tensor uses it.
        Later calls raise :class:`ClientClosedError`. Idempotent."""
        self._c.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lookup(self, model: str, tokens: Tokens) -> int:
        """How many leading tokens of ``tokens`` the daemon can fetch for ``model`` (0: none)."""
        return self._c.lookup(model, _token_list(tokens))

    def fetch(
        self,
        model: str,
        tokens: Tokens,
        layout: Optional[Layout] = None,
        device: DeviceLike = "cpu",
    ) -> "FetchHandle":
        """Starts fetching the longest stored prefix of ``tokens``; returns once the buffer is
        mapped, before the layers are ready (:meth:`FetchHandle.layer` waits for each).

        ``device``: ``"cpu"`` (host memory) or ``"cuda:N"`` (GPU N's memory, over CUDA IPC).
        Nothing stored raises :class:`NotFoundError`.
        """
        layout = layout or Layout()
        gpu = _cuda_ordinal(device)
        native = self._c.fetch(model, _token_list(tokens), layout.dtype, layout.order, layout.block_tokens, gpu)
        return FetchHandle(native)

    def save(
        self,
        model: str,
        tokens: Tokens,
        k_layers: Sequence["torch.Tensor"],
        v_layers: Sequence["torch.Tensor"],
        *,
        order: str = "nhd",
        replace: bool = False,
    ) -> int:
        """Saves the KV of ``tokens``: one K and one V tensor per layer, each
        ``[tokens, kv_heads, head_dim]`` (``order="nhd"``) or ``[kv_heads, tokens, head_dim]``
        (``"hnd"``), all of one dtype (float16, bfloat16 or float32) on one device (host or
        CUDA), contiguous. K is after RoPE. Returns the number of chunks stored (chunks already
        stored count and are kept; ``replace=True`` overwrites them where the daemon allows it).

        The tensors are packed into one buffer (one copy) that the daemon reads; a CUDA save
        synchronizes the current stream first and the daemon copies the bytes out of GPU memory
        before this returns.
        """
        import torch

        toks = _token_list(tokens)
        if order not in ("nhd", "hnd"):
            raise _invalid(f'order must be "nhd" or "hnd", not {order!r}')
        ks, vs = list(k_layers), list(v_layers)
        if not ks or len(ks) != len(vs):
            raise _invalid(f"need one K and one V tensor per layer, got {len(ks)} K and {len(vs)} V")
        first = ks[0]
        if not isinstance(first, torch.Tensor):
            raise _invalid(f"k_layers[0] is a {type(first).__name__}, not a torch.Tensor")
        if first.dim() != 3:
            raise _invalid(
                f"k_layers[0] has shape {tuple(first.shape)}: each layer's K and V must be 3-D "
                f"({'[tokens, kv_heads, head_dim]' if order == 'nhd' else '[kv_heads, tokens, head_dim]'})"
            )
        t_axis = 0 if order == "nhd" else 1
        if first.shape[t_axis] != len(toks):
            raise _invalid(
                f"k_layers[0] has shape {tuple(first.shape)}: {first.shape[t_axis]} tokens on axis "
                f"{t_axis} ({order}), but {len(toks)} token ids were given"
            )
        dtype = _dtype_name(first.dtype)
        for name, seq in (("k_layers", ks), ("v_layers", vs)):
            for i, t in enumerate(seq):
                if not isinstance(t, torch.Tensor):
                    raise _invalid(f"{name}[{i}] is a {type(t).__name__}, not a torch.Tensor")
                if t.dtype != first.dtype:
                    raise _invalid(f"{name}[{i}] is {t.dtype}, k_layers[0] is {first.dtype}")
                if t.device != first.device:
                    raise _invalid(f"{name}[{i}] is on {t.device}, k_layers[0] on {first.device}")
                if t.shape != first.shape:
                    raise _invalid(f"{name}[{i}] has shape {tuple(t.shape)}, k_layers[0] {tuple(first.shape)}")
                if not t.is_contiguous():
                    raise _invalid(
                        f"{name}[{i}] is not contiguous (strides {t.stride()}): a transposed or sliced view "
                        f"is usually the wrong order; pass .contiguous() if it is intended"
                    )
        dev = first.device
        if dev.type not in ("cpu", "cuda"):
            raise _invalid(f"tensors must be on the CPU or a CUDA device, not {dev}")
        with torch.no_grad():
            buf = torch.stack([torch.stack((k.detach(), v.detach())) for k, v in zip(ks, vs)])
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()
            capsule = buf.__dlpack__(stream=-1)
        else:
            capsule = buf.__dlpack__()
        heads, dim = (first.shape[1], first.shape[2]) if order == "nhd" else (first.shape[0], first.shape[2])
        return self._c.save(model, toks, dtype, order, 0, len(ks), heads, dim, capsule, replace)

    def stats(self) -> dict:
        """The daemon's counters, and the pid, uid and gid it recorded for this connection."""
        return self._c.stats()


class FetchHandle:
    """A fetch in progress or done. Its buffer stays mapped (and the daemon's fetch alive) while
    this handle or any tensor from :meth:`layer` lives; :meth:`release` (or garbage collection)
    lets go of the handle's hold."""

    def __init__(self, native: "_native.Fetch") -> None:
        self._f = native
        self._gpu = native.gpu

    @property
    def id(self) -> int:
        return self._f.id

    @property
    def shape(self) -> KvShape:
        """``(num_layers, tokens, kv_heads, head_dim)``; ``tokens`` is the prefix fetched."""
        return KvShape(*self._f.shape)

    @property
    def tokens(self) -> int:
        """How many leading tokens were fetched (may be fewer than asked for)."""
        return self._f.shape[1]

    @property
    def num_layers(self) -> int:
        return self._f.shape[0]

    @property
    def layout(self) -> Layout:
        return Layout(self._f.dtype, self._f.order, self._f.block_tokens)

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda:N"``."""
        return "cpu" if self._gpu is None else f"cuda:{self._gpu}"

    @property
    def nbytes(self) -> int:
        return self._f.nbytes

    @property
    def released(self) -> bool:
        return self._f.released

    def wait_layer(self, layer: int) -> None:
        """Blocks until ``layer`` is restored (GPU: until the GPU finished writing it)."""
        self._f.wait_layer(layer)

    def wait_done(self) -> FetchDone:
        """Blocks until every layer is restored; the daemon's final report."""
        return FetchDone(*self._f.wait_done())

    def layer(self, layer: int, stream: Optional["torch.cuda.Stream"] = None) -> Tuple["torch.Tensor", "torch.Tensor"]:
        """Waits for ``layer`` and returns its ``(K, V)`` tensors over the buffer (no copy),
        shaped as the layout says.

        Host: blocks until the daemon restored the layer. GPU: blocks until the daemon announced
        it, then makes ``stream`` (default: the current stream of the buffer's device) wait for
        the restore on the GPU; work queued on that stream afterwards reads the restored bytes,
        and the thread never waits for the GPU. Reading the tensors on another stream needs
        that stream's own ``layer(i, stream)`` call.
        """
        import torch

        if self._gpu is None:
            self._f.wait_layer(layer)
        else:
            s = stream if stream is not None else torch.cuda.current_stream(self._gpu)
            self._f.stream_wait_layer(layer, s.cuda_stream)
        k, v = self._f.layer_dlpack(layer)
        return torch.from_dlpack(k), torch.from_dlpack(v)

    def layers(self, stream: Optional["torch.cuda.Stream"] = None) -> Iterator[Tuple["torch.Tensor", "torch.Tensor"]]:
        """``layer(i)`` for every layer in order (each waits for its own layer only)."""
        for i in range(self.num_layers):
            yield self.layer(i, stream)

    def copy_layer_into(
        self,
        layer: int,
        k_cache: "torch.Tensor",
        v_cache: "torch.Tensor",
        block_ids: Union[Sequence[int], "torch.Tensor"],
        stream: Optional["torch.cuda.Stream"] = None,
    ) -> None:
        """Paged layouts: copies the fetched blocks of ``layer`` into an engine's paged cache,
        block ``b`` to ``k_cache[block_ids[b]]`` (and V likewise), after waiting for the layer as
        :meth:`layer` does. ``k_cache``/``v_cache`` are ``[num_blocks, block_tokens, kv_heads,
        head_dim]`` (nhd) or ``[num_blocks, kv_heads, block_tokens, head_dim]`` (hnd) of the
        fetch's dtype on its device; ``block_ids`` is the request's block table (at least
        ``ceil(tokens / block_tokens)`` entries; extra entries are ignored). The last block's
        slots past the prefix are written as zeros: the engine computes those tokens anyway.
        """
        import torch

        bt = self._f.block_tokens
        if bt == 0:
            raise _invalid("copy_layer_into needs a paged layout (Layout(block_tokens=N))")
        k, v = self.layer(layer, stream)
        blocks = k.shape[0]
        ids = torch.as_tensor(block_ids, dtype=torch.long)
        if ids.dim() != 1 or ids.numel() < blocks:
            raise _invalid(f"block_ids needs at least {blocks} entries (1-D), got shape {tuple(ids.shape)}")
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if cache.dtype != k.dtype or cache.device != k.device or tuple(cache.shape[1:]) != tuple(k.shape[1:]):
                raise _invalid(
                    f"{name} is {cache.dtype} {tuple(cache.shape)} on {cache.device}; the fetched "
                    f"blocks are {k.dtype} {tuple(k.shape)} on {k.device}"
                )
        ids = ids[:blocks].to(k.device)
        if self._gpu is not None and stream is not None:
            with torch.cuda.stream(stream):
                k_cache.index_copy_(0, ids, k)
                v_cache.index_copy_(0, ids, v)
        else:
            k_cache.index_copy_(0, ids, k)
            v_cache.index_copy_(0, ids, v)

    def release(self) -> bool:
        """Lets go of the buffer. With no tensor over it left, the daemon's fetch is released now
        (True); otherwise when the last tensor is freed (False). A GPU buffer must no longer be
        read by queued work once its last tensor is gone: synchronize the stream first.
        Idempotent."""
        return self._f.release()

    def __enter__(self) -> "FetchHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"FetchHandle(id={self.id}, shape={self.shape}, layout={self.layout}, device={self.device!r}"
            f"{', released' if self.released else ''})"
        )


def model_id_from_file(path: Union[str, "os.PathLike[str]"]) -> str:
    """``sha256:<hex>`` of a model file's bytes (cached per path while the file is unchanged):
    the namespace that keeps KV of other weights apart. Append the settings that change the KV
    (dtype, attention kernel, device, engine), as engines do (docs/ENGINES.md)."""
    return _native.model_id_from_file(os.fspath(path))


def gpu_unavailable_reason() -> Optional[str]:
    """None when this process can open GPU buffers (the CUDA driver loads), else why not."""
    return _native.gpu_unavailable_reason()


def buffer_len(layout: Layout, shape: KvShape) -> int:
    """The bytes of a buffer of ``shape`` in ``layout`` (client-rs's reference arithmetic)."""
    return _native.buffer_len(layout.dtype, layout.order, layout.block_tokens, *shape)
