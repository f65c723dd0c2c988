"""Power drivers against a fake BMC (an `ipmitool` on PATH written here) and a UDP
socket on loopback; nothing leaves 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from ferry.domain.errors import HostUnavailable, InvalidInput
from ferry.power import (
    IpmiDriver,
    IpmiPowerConfig,
    LabPowerConfig,
    PowerDriver,
    PowerError,
    PowerState,
    PowerTimeout,
    PowerUnsupported,
    WakeOnLanDriver,
    WolPowerConfig,
    magic_packet,
    make_driver,
    parse_power_config,
)
from ferry.wire import status_for

PASSWORD = "s3cret-Pw"

# The fake BMC: answers like ipmitool, keeps the chassis state in a file, logs every
# argv, and misbehaves as FAKE_BMC_MODE asks (hang, fail, garbage).
FAKE_IPMITOOL = """#!{python}
import json, os, sys, time
state_dir = os.environ["FAKE_BMC_DIR"]
args = sys.argv[1:]
with open(os.path.join(state_dir, "calls.jsonl"), "a") as log:
    log.write(json.dumps({{"argv": args, "pid": os.getpid()}}) + "\\n")
mode = os.environ.get("FAKE_BMC_MODE", "ok")
if mode == "hang":
    time.sleep(60)
if mode == "fail":
    print("Error: Unable to establish IPMI v2 / RMCP+ session", file=sys.stderr)
    sys.exit(1)
if mode == "garbage":
    print("\\x1b[31m?? lorem ipsum")
    sys.exit(0)
password = open(args[args.index("-f") + 1]).read().strip()
if password != "{password}":
    print("Error: Unable to establish IPMI v2 / RMCP+ session", file=sys.stderr)
    sys.exit(1)
state_file = os.path.join(state_dir, "state")
state = open(state_file).read().strip() if os.path.exists(state_file) else "off"
verb = args[-1]
if verb == "status":
    print("Chassis Power is " + state)
elif verb in ("on", "off", "soft"):
    open(state_file, "w").write("on" if verb == "on" else "off")
    print("Chassis Power Control: " + {{"on": "Up/On", "off": "Down/Off", "soft": "Soft"}}[verb])
else:
    sys.exit(1)
"""


@pytest.fixture
def bmc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "ipmitool"
    tool.write_text(FAKE_IPMITOOL.format(python=sys.executable, password=PASSWORD))
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_BMC_DIR", str(tmp_path))
    (tmp_path / "bmc.pw").write_text(PASSWORD + "\n")
    (tmp_path / "bmc.pw").chmod(0o600)
    return tmp_path


def driver(bmc: Path, **kw: object) -> IpmiDriver:
    return IpmiDriver("192.0.2.10", "admin", bmc / "bmc.pw", **kw)  # type: ignore[arg-type]


def calls(bmc: Path) -> list[dict[str, object]]:
    lines = (bmc / "calls.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


async def test_ipmi_switches_and_reads_the_chassis(bmc: Path) -> None:
    d = driver(bmc)
    assert isinstance(d, PowerDriver)
    assert await d.status() is PowerState.OFF
    await d.power_on()
    assert await d.status() is PowerState.ON
    await d.power_off()
    assert await d.status() is PowerState.OFF
    argvs = [c["argv"] for c in calls(bmc)]
    assert argvs[1] == ["-I", "lanplus", "-H", "192.0.2.10", "-U", "admin",
                        "-f", str(bmc / "bmc.pw"), "chassis", "power", "on"]
    assert argvs[3][-1] == "soft"  # graceful: the host's OS shuts down cleanly
    assert all(PASSWORD not in " ".join(a) for a in argvs)  # type: ignore[arg-type]


async def test_ipmi_hard_off_when_asked(bmc: Path) -> None:
    await driver(bmc, graceful_off=False, interface="lan").power_off()
    argv = calls(bmc)[0]["argv"]
    assert argv[:2] == ["-I", "lan"] and argv[-1] == "off"  # type: ignore[index]


async def test_ipmi_timeout_kills_the_command(bmc: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_BMC_MODE", "hang")
    started = time.monotonic()
    with pytest.raises(PowerTimeout, match=r"no answer within 0\.5 s") as caught:
        await driver(bmc, timeout_s=0.5).status()
    assert time.monotonic() - started < 5
    assert isinstance(caught.value.cause, TimeoutError)
    pid = calls(bmc)[0]["pid"]
    assert isinstance(pid, int)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped, not left behind


async def test_ipmi_failing_command_is_a_power_error_with_ipmitools_words(
        bmc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_BMC_MODE", "fail")
    with pytest.raises(PowerError, match=r"failed \(exit 1\): Error: Unable to establish") \
            as caught:
        await driver(bmc).power_on()
    err = caught.value
    assert isinstance(err, HostUnavailable) and status_for(err) == 502
    assert err.cause is not None and err.__cause__ is err.cause
    assert "by hand" in err.fix


async def test_ipmi_wrong_password_fails(bmc: Path) -> None:
    (bmc / "bmc.pw").write_text("wrong\n")
    with pytest.raises(PowerError, match="RMCP"):
        await driver(bmc).status()


async def test_ipmi_garbage_is_not_taken_for_a_state(bmc: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_BMC_MODE", "garbage")
    with pytest.raises(PowerError, match="unexpected answer to power status"):
        await driver(bmc).status()
    with pytest.raises(PowerError, match="unexpected answer to power on"):
        await driver(bmc).power_on()


async def test_ipmi_missing_tool_or_password_file(bmc: Path) -> None:
    with pytest.raises(PowerError, match="cannot run") as caught:
        await driver(bmc, ipmitool=str(bmc / "no-such-ipmitool")).status()
    assert "apt-get install ipmitool" in caught.value.fix
    assert isinstance(caught.value.cause, OSError)
    (bmc / "bmc.pw").unlink()
    with pytest.raises(PowerError, match="password file"):
        await driver(bmc).status()


def test_ipmi_settings_are_checked() -> None:
    with pytest.raises(InvalidInput, match="neither an IP address nor a host name"):
        IpmiDriver("bmc host1", "admin", "/etc/ferry/bmc.pw")
    with pytest.raises(InvalidInput, match="neither"):
        IpmiDriver("-oProxyCommand=x", "admin", "/etc/ferry/bmc.pw")
    with pytest.raises(InvalidInput, match="must be an absolute path"):
        IpmiDriver("bmc1.example.org", "admin", "bmc.pw")
    with pytest.raises(InvalidInput, match="spaces"):
        IpmiDriver("10.0.0.5", "ad min", "/etc/ferry/bmc.pw")
    with pytest.raises(InvalidInput, match="interface"):
        IpmiDriver("10.0.0.5", "admin", "/etc/ferry/bmc.pw", interface="open")
    assert IpmiDriver("BMC1.Example.org", "admin", "/p").config.address == "bmc1.example.org"


async def test_wake_on_lan_sends_the_magic_packet_to_loopback() -> None:
    mac = "52:54:00:AB:cd:01"
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    port = receiver.getsockname()[1]
    try:
        d = WakeOnLanDriver(mac, broadcast="127.0.0.1", port=port)
        assert isinstance(d, PowerDriver)
        await d.power_on()
        loop = asyncio.get_running_loop()
        got = [await asyncio.wait_for(loop.sock_recv(receiver, 1024), 2) for _ in range(3)]
    finally:
        receiver.close()
    expected = b"\xff" * 6 + bytes.fromhex("525400abcd01") * 16
    assert len(expected) == 102
    assert got == [expected] * 3
    assert magic_packet("52-54-00-ab-cd-01") == expected


async def test_wake_on_lan_cannot_power_off_and_does_not_know_the_state() -> None:
    d = WakeOnLanDriver("52:54:00:00:00:01", broadcast="127.0.0.1")
    assert await d.status() is PowerState.UNKNOWN
    with pytest.raises(PowerUnsupported, match="cannot power off") as caught:
        await d.power_off()
    assert "IPMI" in caught.value.fix and isinstance(caught.value, PowerError)


@pytest.mark.parametrize("mac", [
    "52:54:00:00:00", "52:54:00:00:00:01:02", "52:54:00-00:00:01", "5254.0000.0001",
    "525400000001", "52:54:00:00:00:0g", "01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff",
    "00:00:00:00:00:00", " 52:54:00:00:00:01", "52:54:00:00:00:1"])
def test_wake_on_lan_refuses_a_bad_mac(mac: str) -> None:
    with pytest.raises(InvalidInput, match="MAC address"):
        WakeOnLanDriver(mac)


def test_wake_on_lan_refuses_a_bad_broadcast_or_port() -> None:
    with pytest.raises(InvalidInput, match="IPv4"):
        WakeOnLanDriver("52:54:00:00:00:01", broadcast="ff02::1")
    with pytest.raises(InvalidInput, match="port"):
        WakeOnLanDriver("52:54:00:00:00:01", port=0)


def test_power_config_is_told_apart_by_driver() -> None:
    ipmi = parse_power_config({"driver": "ipmi", "address": "10.1.2.3", "username": "root",
                               "password_file": "/etc/ferry/h1.pw"})
    assert isinstance(ipmi, IpmiPowerConfig) and ipmi.interface == "lanplus"
    wol = parse_power_config({"driver": "wol", "mac": "52-54-00-AA-BB-CC"})
    assert isinstance(wol, WolPowerConfig) and wol.mac == "52:54:00:aa:bb:cc"
    assert isinstance(make_driver(wol), WakeOnLanDriver)
    assert isinstance(make_driver(ipmi), IpmiDriver)
    lab = parse_power_config({"driver": "lab"})
    assert isinstance(lab, LabPowerConfig)
    with pytest.raises(InvalidInput, match="no lab runs here"):
        make_driver(lab)
    made = WakeOnLanDriver("52:54:00:00:00:09")
    assert make_driver(lab, lambda _: made) is made


@pytest.mark.parametrize(("data", "words"), [
    ({"driver": "snmp"}, "does not match any of the expected tags"),
    ({"address": "10.0.0.1"}, "driver"),
    ({"driver": "ipmi", "address": "10.0.0.1", "username": "root",
      "password_file": "/p", "password": "x"}, "a password is never stored"),
    ({"driver": "ipmi", "address": "10.0.0.1", "username": "root",
      "password_file": "relative.pw"}, "password_file 'relative.pw' must be an absolute"),
    ({"driver": "ipmi", "address": "10.0.0.1", "username": "root", "password_file": "/p",
      "timeout_s": 0}, "timeout_s"),
    ({"driver": "wol", "mac": "nope"}, "MAC address 'nope'"),
    ({"driver": "lab", "host": "h1"}, "host"),
])
def test_power_config_errors_name_the_field(data: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidInput, match="power settings") as caught:
        parse_power_config(data)
    assert words in caught.value.problem
