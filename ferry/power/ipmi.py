"""IPMI power control through `ipmitool` (Debian 12 packages it: `ipmitool`, 1.8.19, in
bookworm/main; it is not installed by Ferry's setup, so a host using this driver needs
`apt-get install ipmitool` on the control plane's machine).

ipmitool runs from an argv list, never through a shell, and reads the BMC password
from a file (`-f`), so the password is on no command line that `ps` shows. Each call
has a timeout; on expiry the whole process group is killed, so a wrapper's children go
too. Output is read with LC_ALL=C and checked: an answer that is not ipmitool's usual
sentence is an error, never taken as a state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from pathlib import Path

from ferry.power.config import IpmiPowerConfig, validated
from ferry.power.driver import PowerState
from ferry.power.errors import PowerError, PowerTimeout

_STATUS = re.compile(r"^Chassis Power is (on|off)\s*$", re.IGNORECASE | re.MULTILINE)
_CONTROL = re.compile(r"^Chassis Power Control: \S+", re.IGNORECASE | re.MULTILINE)
_FIX = ("check the BMC's address, user name and password file, and try "
        "`ipmitool -I lanplus -H ADDRESS -U USER -f FILE chassis power status` by hand")


class IpmiDriver:
    def __init__(self, address: str, username: str, password_file: str | Path,
                 interface: str = "lanplus", *, timeout_s: float = 20.0,
                 graceful_off: bool = True, ipmitool: str = "ipmitool") -> None:
        # The same checks as a host's settings, so a driver built by hand is no weaker.
        self.config = validated(IpmiPowerConfig, {
            "driver": "ipmi", "address": address, "username": username,
            "password_file": str(password_file), "interface": interface,
            "timeout_s": timeout_s, "graceful_off": graceful_off})
        self.ipmitool = ipmitool
        self._lock = asyncio.Lock()  # one command at a time: BMCs serve sessions poorly

    @classmethod
    def from_config(cls, config: IpmiPowerConfig, *, ipmitool: str = "ipmitool"
                    ) -> IpmiDriver:
        return cls(config.address, config.username, config.password_file, config.interface,
                   timeout_s=config.timeout_s, graceful_off=config.graceful_off,
                   ipmitool=ipmitool)

    def argv(self, *command: str) -> list[str]:
        c = self.config
        return [self.ipmitool, "-I", c.interface, "-H", c.address, "-U", c.username,
                "-f", c.password_file, *command]

    async def power_on(self) -> None:
        out = await self._run("chassis", "power", "on")
        self._expect_control(out, "on")

    async def power_off(self) -> None:
        out = await self._run("chassis", "power", "soft" if self.config.graceful_off else "off")
        self._expect_control(out, "off")

    async def status(self) -> PowerState:
        out = await self._run("chassis", "power", "status")
        found = _STATUS.search(out)
        if found is None:
            raise PowerError(f"BMC {self.config.address}: unexpected answer to power status: "
                             f"{_excerpt(out)!r}", _FIX)
        return PowerState(found.group(1).lower())

    def _expect_control(self, out: str, what: str) -> None:
        if _CONTROL.search(out) is None:
            raise PowerError(f"BMC {self.config.address}: unexpected answer to power {what}: "
                             f"{_excerpt(out)!r}", _FIX)

    async def _run(self, *command: str) -> str:
        c = self.config
        if not os.access(c.password_file, os.R_OK):
            raise PowerError(f"the password file {c.password_file} for BMC {c.address} is "
                             f"missing or not readable", "create it, readable by Ferry only")
        argv = self.argv(*command)
        async with self._lock:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, start_new_session=True,
                    env={**os.environ, "LC_ALL": "C"})
            except OSError as exc:
                raise PowerError(f"cannot run {self.ipmitool}: {exc.strerror or exc}",
                                 "install it: apt-get install ipmitool", cause=exc) from exc
            try:
                out, err = await asyncio.wait_for(proc.communicate(), c.timeout_s)
            except TimeoutError as exc:
                await _kill(proc)
                raise PowerTimeout(f"BMC {c.address}: `{' '.join(command)}` got no answer "
                                   f"within {c.timeout_s:g} s", _FIX, cause=exc) from exc
        if proc.returncode != 0:
            detail = _excerpt(err.decode(errors="replace") or out.decode(errors="replace"))
            cause = OSError(f"ipmitool exited with {proc.returncode}")
            raise PowerError(f"BMC {c.address}: `{' '.join(command)}` failed "
                             f"(exit {proc.returncode}): {detail}", _FIX, cause=cause)
        return out.decode(errors="replace")


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is its pid
    with contextlib.suppress(Exception):
        await proc.communicate()  # reap it and close the pipes


def _excerpt(text: str, limit: int = 200) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    joined = " / ".join(lines[-3:]) or "(no output)"
    return joined if len(joined) <= limit else joined[:limit] + "…"
