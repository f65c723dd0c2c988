"""Running one nftables script as one transaction: the agent's filters
(vxlan_filter.py, nic_filter.py, stream_filter.py) each replace their own table this way.

Through libnftables in this process (what `nft -f` runs, without its fork and exec and
its context's teardown: ~0.3 ms instead of 10-40 on a busy host, on a migration's
path), in a thread; through the `nft` program where the library cannot be loaded.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading

from ferry import commands
from ferry.domain.errors import HostUnavailable

COMMAND_TIMEOUT_S = 15.0
LIBRARY = "libnftables.so.1"


class FilterFailed(HostUnavailable):
    """nftables refused the rules, or is not installed (HTTP 502, a host failure)."""


class _Library:
    """libnftables' C API, one context for the process (freeing a context costs 7-20 ms
    here, running a script in a kept one ~0.3 ms); a context is not thread-safe, so
    one script at a time."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(LIBRARY)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise OSError("libnftables could not make a context")
        # Buffered: nothing written to this process's stdout or stderr.
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        self._lib, self._ctx = lib, ctx
        self._lock = threading.Lock()

    def run(self, script: str) -> str | None:
        """None when applied, else nft's error text."""
        with self._lock:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
            # Each read empties its buffer: nothing carries over to the next script.
            self._lib.nft_ctx_get_output_buffer(self._ctx)
            err: bytes | None = self._lib.nft_ctx_get_error_buffer(self._ctx)
        if rc == 0:
            return None
        return (err or b"").decode(errors="replace").strip() or "unknown error"


_loaded: _Library | None = None
_load_lock = threading.Lock()


def _library() -> _Library | None:
    global _loaded
    with _load_lock:
        if _loaded is None:
            try:
                _loaded = _Library()
            except (OSError, AttributeError):
                return None
        return _loaded


async def apply(script: str, purpose: str) -> None:
    """Run `script`; `purpose` says in errors what the rules were for."""
    lib = _library()
    if lib is not None:
        err = await asyncio.wait_for(asyncio.to_thread(lib.run, script), COMMAND_TIMEOUT_S)
        if err is not None:
            raise FilterFailed(f"nftables refused the rules to {purpose}: {err}")
        return
    try:
        done = await commands.run("nft", "-f", "-", timeout_s=COMMAND_TIMEOUT_S,
                                  stdin=script.encode())
    except FileNotFoundError:
        raise FilterFailed(f"nftables (`nft`) is not installed: cannot {purpose}",
                           "apt-get install nftables") from None
    except TimeoutError:
        raise FilterFailed(f"`nft -f -` did not finish in {COMMAND_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        raise FilterFailed(f"nftables refused the rules to {purpose}: {done.err}")


def replacing(family: str, table: str) -> list[str]:
    """The script's first lines: `add` then `delete` makes the delete succeed whether or
    not the table existed; the whole script is one transaction, so the old rules hold
    until the new ones do."""
    return [f"add table {family} {table}", f"delete table {family} {table}"]


def removal(family: str, table: str) -> str:
    return "\n".join([*replacing(family, table), ""])
