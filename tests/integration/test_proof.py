"""The proof tools prove something: the double-run watcher fires on a guest running on two
hosts, the probe's verifier notices a corrupted word, a rebooted guest is not intact."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ferry.cli.client import Client
from ferry.cli.demo import wait_heartbeat
from ferry.domain.probe import (
    PAGE_SIZE,
    Heartbeat,
    judge_intact,
    page_errors,
    page_pattern,
    probe_address,
)
from ferry.hypervisor.guest_ram import MEMFD_LINK
from ferry.lab.config import LabConfig
from ferry.lab.watch import current_heartbeat, heartbeats_from_now
from tests.integration.helpers import (
    assert_intact,
    boot_probe,
    qemu_hosts,
    remove_vm,
    wait_until,
)
from tests.integration.watcher import Watcher

MIB = 1 << 20


def qemu_pid(lab: LabConfig, vm: str, host: str) -> int:
    return int((lab.host_dir(host) / "run" / "vms" / vm / "qemu.pid").read_text())


def test_the_watcher_sees_a_guest_executing_on_two_hosts(
        client: Client, lab: LabConfig, watcher: Watcher | None) -> None:
    assert watcher is not None
    boot_probe(client, lab, "twin1", "host1", dirty=20)
    rogue_dir = lab.host_dir("host2") / "rogue" / "twin1"
    try:
        wait_until(lambda: watcher.seen_running("twin1") == {"host1"}, 30,
                   "the watcher to see twin1 executing on host1")
        assert watcher.double_runs(["twin1"]) == []
        # A second QEMU of the same VM, as a split brain would start it: the same
        # command line, its files under host2's directory, cold-booting the same guest.
        argv = Path(f"/proc/{qemu_pid(lab, 'twin1', 'host1')}/cmdline").read_bytes()
        run_dir = str(lab.host_dir("host1") / "run" / "vms" / "twin1")
        rogue_argv = [a.decode().replace(run_dir, str(rogue_dir))
                      for a in argv.rstrip(b"\0").split(b"\0")]
        rogue_argv = [a for a in rogue_argv if a != "-S"]  # run, not wait for `cont`
        assert not any(str(lab.host_dir("host1")) in a for a in rogue_argv)
        rogue_dir.mkdir(parents=True)
        started = time.monotonic()
        rogue = subprocess.Popen(rogue_argv, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: qemu_hosts(lab, "twin1") == ["host1", "host2"], 30,
                       "the second QEMU to appear")
            wait_until(lambda: bool(watcher.double_runs(["twin1"])), 60,
                       "the watcher to see twin1 executing on two hosts")
        finally:
            rogue.kill()
            rogue.wait()
        watcher.allow_double_run("twin1")  # this test's own doing: do not fail it
        (hit,) = watcher.double_runs(["twin1"])
        assert hit.hosts == ("host1", "host2") and hit.second.pid == rogue.pid
        assert hit.proven_at > started
        assert watcher.seen_running("twin1") == {"host1", "host2"}
    finally:
        shutil.rmtree(rogue_dir.parent, ignore_errors=True)
        remove_vm(client, "twin1")


def guest_ram(pid: int, memory_mib: int) -> int:
    """Where QEMU keeps the guest's RAM in its own address space.

    Ferry backs a VM's RAM with a shared memfd (hypervisor/argv.py, for the memory
    check): QEMU 7.2 maps it (guest-physical 0 up to the VM's size, for VMs below
    3 GiB) as one shared mapping of exactly that size, named after the memfd, followed
    by a one-page PROT_NONE guard (qemu_ram_mmap); checked by hand against QMP's
    `gpa2hva`. QMP itself cannot be asked: QEMU serves one QMP client per socket and
    the agent holds it (a second client gets no greeting).
    """
    size = memory_mib * MIB
    maps = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        ram = len(fields) == 6 and fields[5].startswith(MEMFD_LINK)
        maps.append((start, end, fields[1], ram))
    found = [start for (start, end, perms, ram), nxt in itertools.pairwise(maps)
             if ram and perms == "rw-s" and end - start == size and nxt[0] == end
             and nxt[2] == "---p"]
    assert len(found) == 1, f"no single {memory_mib} MiB RAM mapping in QEMU {pid}: {found}"
    return found[0]


def serial(client: Client, vm: str) -> list[str]:
    return list(client.call("GET", f"/v1/vms/{vm}/serial", lines=1000)["lines"])


def test_a_word_of_guest_memory_corrupted_from_the_host_is_caught(
        client: Client, lab: LabConfig) -> None:
    # no dirtying: page 0 keeps generation 0, so its content is known exactly
    boot_probe(client, lab, "rot1", "host1", dirty=0, memory=192, probe_mib=64)
    try:
        first = current_heartbeat(client, "rot1")
        addr = probe_address(serial(client, "rot1"))
        assert first is not None and addr is not None and addr.gpa is not None, addr
        assert addr.boot_id == first.boot_id and addr.gpa % PAGE_SIZE == 0
        assert addr.gpa + PAGE_SIZE <= 192 * MIB
        pid = qemu_pid(lab, "rot1", "host1")
        hva = guest_ram(pid, 192) + addr.gpa
        word = 5
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(hva)
            page = mem.read(PAGE_SIZE)
            # the address is right: the probe's page 0, byte for byte
            assert page == page_pattern(0, 0)
            good = int.from_bytes(page[8 * word:8 * word + 8], "little")
            bad = good ^ (1 << 17)  # one bit flipped
            before = wait_heartbeat(client, "rot1")
            assert before["mem_errors"] == 0
            mem.seek(hva + 8 * word)
            mem.write(bad.to_bytes(8, "little"))
            # the probe's next sweep finds it and repairs it
            after = heartbeats_from_now(client, "rot1")
            mem.seek(hva)
            assert mem.read(PAGE_SIZE) == page_pattern(0, 0)
        assert after[-1].mem_errors == 1 and after[-1].boot_id == first.boot_id, after[-1]
        errors = page_errors(serial(client, "rot1"))
        assert [(e.page, e.want_gen, e.word, e.got, e.want) for e in errors] == [
            (0, 0, word, bad, good)]
        # and the judgement every migration test uses says so, and only that
        problems = judge_intact(Heartbeat.model_validate(before), after)
        seen = next(hb.seq for hb in after if hb.mem_errors)
        assert problems == ["integrity errors: mem_errors=1 disk_errors=0 "
                            f"(first seen at seq {seen})"], problems
    finally:
        remove_vm(client, "rot1")


def test_a_rebooted_guest_is_not_intact(client: Client, lab: LabConfig) -> None:
    boot_probe(client, lab, "reb1", "host1", dirty=5)
    try:
        before = wait_heartbeat(client, "reb1", after_seq=3)
        client.call("POST", "/v1/vms/reb1/stop", force=True)
        client.call("POST", "/v1/vms/reb1/start")
        # a cold boot, on the same host, clean and counting: everything the old check
        # (a later seq, zero errors) looked at would pass once seq is high enough
        with pytest.raises(AssertionError, match="the guest rebooted"):
            assert_intact(client, "reb1", "host1", lab, before)
        now = current_heartbeat(client, "reb1")
        assert now is not None and now.boot_id != before["boot_id"]
        assert now.integrity_errors == 0
    finally:
        remove_vm(client, "reb1")
