"""Running a host command (argv list, never a shell) with a bound on how long it takes.

One helper for the agent's iproute2 and nftables calls and the hypervisor's qemu-img:
each caller turns the outcome into its own error (what failed, and what to do).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True)
class Finished:
    returncode: int
    out: str
    err: str


async def run(*argv: str, timeout_s: float, stdin: bytes | None = None) -> Finished:
    """Run `argv` to its end. FileNotFoundError if the program is missing; TimeoutError
    (the process killed and reaped) past `timeout_s`."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None  # communicate() returns once it exited
    return Finished(proc.returncode, out.decode(errors="replace"),
                    err.decode(errors="replace").strip())
