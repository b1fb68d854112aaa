"""Exceptions of the kvfetcher package.

Every error is a :class:`KvFetcherError` carrying ``code`` and ``message``. For errors the
daemon reported, ``code`` is the local protocol's code (``not_found``, ``busy``, ``unavailable``,
``bad_request``, ``corrupt``, ``gpu_unsupported``, ...; docs/PROTOCOL.md) and ``message`` the
daemon's own words. Errors found in this process have client-side codes: ``connect``,
``closed``, ``io``, ``protocol``, ``version_mismatch``, ``invalid_argument``,
``layer_out_of_range``, ``wrong_memory``, ``shared_memory``, ``gpu_driver``, ``released`` and
``client_closed``.
"""

from __future__ import annotations

__all__ = [
    "KvFetcherError",
    "DaemonError",
    "NotFoundError",
    "BusyError",
    "UnavailableError",
    "BadRequestError",
    "CorruptError",
    "GpuUnsupportedError",
    "GpuDriverError",
    "ConnectError",
    "ConnectionLostError",
    "ProtocolError",
    "InvalidArgumentError",
    "LayerOutOfRangeError",
    "WrongMemoryError",
    "SharedMemoryError",
    "ReleasedError",
    "ClientClosedError",
]


class KvFetcherError(Exception):
    """Base class of every kvfetcher error."""

    code: str
    """The protocol's error code (daemon errors) or a client-side code."""
    message: str
    """What went wrong, in words."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message

    def __reduce__(self):  # pickles (multiprocessing) with both fields
        return (type(self), (self.code, self.message))


class DaemonError(KvFetcherError):
    """The daemon refused or failed the request (``code`` is the protocol's)."""


class NotFoundError(DaemonError, LookupError):
    """Nothing is stored for these tokens (``not_found``): prefill instead."""


class BusyError(DaemonError):
    """The daemon is at a limit of clients, requests or fetches (``busy``)."""


class UnavailableError(DaemonError):
    """The remote store or another dependency is down (``unavailable``); retry later."""


class BadRequestError(DaemonError, ValueError):
    """The daemon found the request invalid or forbidden (``bad_request``)."""


class CorruptError(DaemonError):
    """A stored object is damaged (``corrupt``); the daemon set it aside."""


class GpuUnsupportedError(KvFetcherError):
    """GPU memory was asked for but the daemon or this process cannot provide it
    (``gpu_unsupported``: no driver, no such device, GPU disabled)."""


class GpuDriverError(KvFetcherError):
    """A CUDA driver call failed in this process (``gpu_driver``)."""


class ConnectError(KvFetcherError):
    """The daemon's socket could not be reached (``connect``)."""


class ConnectionLostError(KvFetcherError):
    """The connection to the daemon broke (``closed``, ``io``)."""


class ProtocolError(KvFetcherError):
    """The daemon answered something this client cannot use (``protocol``,
    ``version_mismatch``)."""


class InvalidArgumentError(KvFetcherError, ValueError):
    """An argument is wrong: tensor dtype, shape, device or layout, token ids... (``invalid_argument``)."""


class LayerOutOfRangeError(InvalidArgumentError, IndexError):
    """A layer index beyond the fetched shape (``layer_out_of_range``)."""


class WrongMemoryError(KvFetcherError):
    """A host accessor on a GPU buffer or the reverse (``wrong_memory``)."""


class SharedMemoryError(KvFetcherError):
    """A memfd could not be created, written or mapped (``shared_memory``)."""


class ReleasedError(KvFetcherError):
    """The fetch handle was released (``released``)."""


class ClientClosedError(KvFetcherError):
    """The client was closed (``client_closed``)."""
