"""An agent's VM leases and host heartbeat on the HA datastore (rules: ferry/domain/leases.py).

Files, under `<datastore>/.ferry/`: `leases/<vm>.json` (a LeaseRecord) and
`hosts/<host>.json` (a HostBeat). Every write is a whole small file written to a temporary
name and renamed over the old one; nothing locks (see the domain module for why that is
safe).

One background task renews the leases this agent holds, bumps its host heartbeat and
reads every other lease and heartbeat, each `renew_s`. Datastore I/O runs in a dedicated
two-thread executor with a timeout: a hung NFS mount blocks those threads, never the
event loop, and never more than two of them (a round whose I/O is still stuck is skipped).
What fencing does to a guest is the `Guests` given (ferry/agent/fencing.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import ValidationError

from ferry.agent.config import AgentConfig
from ferry.agent.models import DatastoreView, LeaseView
from ferry.domain.errors import Conflict
from ferry.domain.leases import (
    HostBeat,
    LeaseRecord,
    LeaseTiming,
    Observed,
    Verdict,
    confirmed,
    expired,
    must_fence,
    observe,
    released,
    renewed,
    take,
    verdict,
)

log = logging.getLogger("ferry.agent.leases")
RELEASED_SHOWN_S = 60.0
T = TypeVar("T")


class Guests(Protocol):
    """What the keeper asks of the host's VMs."""

    def alive(self, vm: str) -> bool: ...

    async def executing(self, vm: str) -> bool:
        """Its guest runs (not paused, not waiting for a migration)."""
        ...

    async def pause(self, vm: str) -> bool:
        """Stop the guest executing (QMP stop, or kill QEMU if QMP does not answer);
        True if it was running and is now paused (so it may be resumed)."""
        ...

    async def unpause(self, vm: str) -> None: ...

    async def lost(self, vm: str) -> None:
        """Another host holds the VM's lease now."""
        ...


class LeaseFiles:
    """The datastore's `.ferry` directory: blocking reads and atomic writes."""

    def __init__(self, root: Path) -> None:
        self.leases = root / "leases"
        self.hosts = root / "hosts"
        # path → ((inode, mtime, size), text): a file not replaced since is not read again
        # (every write is a rename, so a new record is a new inode).
        self._cache: dict[Path, tuple[tuple[int, int, int], str]] = {}

    def setup(self) -> None:
        self.leases.mkdir(parents=True, exist_ok=True)
        self.hosts.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _write(path: Path, text: str) -> None:
        # Unique per writer: hosts share the directory, and pids repeat across hosts.
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        # No fsync: what matters is that other hosts see the record, which close() gives
        # on NFS (close-to-open) and the page cache gives locally; a lease does not have
        # to survive its writer's crash (it expires), and fsync would add to every
        # migration's switchover (the destination writes the lease before `cont`).
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # atomic: readers see the old record or the new one

    @staticmethod
    def _read(path: Path) -> str | None:
        try:
            return path.read_text()
        except FileNotFoundError:
            return None

    def read_lease(self, vm: str) -> LeaseRecord | None:
        text = self._read(self.leases / f"{vm}.json")
        return LeaseRecord.model_validate_json(text) if text is not None else None

    def write_lease(self, record: LeaseRecord) -> None:
        self._write(self.leases / f"{record.vm}.json", record.model_dump_json())

    def write_beat(self, beat: HostBeat) -> None:
        self._write(self.hosts / f"{beat.host}.json", beat.model_dump_json())

    def read_beat(self, host: str) -> HostBeat | None:
        text = self._read(self.hosts / f"{host}.json")
        return HostBeat.model_validate_json(text) if text is not None else None

    def _read_cached(self, path: Path) -> str | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            self._cache.pop(path, None)
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        hit = self._cache.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        text = self._read(path)
        if text is not None:
            self._cache[path] = (stamp, text)
        return text

    def read_all(self) -> tuple[dict[str, LeaseRecord], dict[str, HostBeat]]:
        leases: dict[str, LeaseRecord] = {}
        beats: dict[str, HostBeat] = {}
        for path in self.leases.glob("*.json"):
            with contextlib.suppress(OSError, ValidationError, json.JSONDecodeError):
                text = self._read_cached(path)
                if text is not None:
                    rec = LeaseRecord.model_validate_json(text)
                    leases[rec.vm] = rec
        for path in self.hosts.glob("*.json"):
            with contextlib.suppress(OSError, ValidationError, json.JSONDecodeError):
                text = self._read_cached(path)
                if text is not None:
                    beat = HostBeat.model_validate_json(text)
                    beats[beat.host] = beat
        return leases, beats


class LeaseKeeper:
    def __init__(self, host: str, datastore: str, root: Path, timing: LeaseTiming,
                 address: str, guests: Guests,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.datastore = datastore
        self.timing = timing
        self.address = address
        self.files = LeaseFiles(root)
        self.guests = guests
        self.clock = clock
        self.held: dict[str, LeaseRecord] = {}
        self.last_ok = clock()  # when a renewal round last proved every lease ours
        self.ok = False
        self._beat = 0
        self._stalled: set[str] = set()  # guests we paused ourselves (fenced on a stall)
        # Leases taken for a QEMU being launched: renewed like a live guest's, never
        # released as "its QEMU is gone" before the launch has registered it.
        self._starting: set[str] = set()
        self._unfence_at: float | None = None
        self._seen: dict[str, Observed] = {}  # leases of others, as watched here
        self._records: dict[str, LeaseRecord] = {}
        self._beats: dict[str, HostBeat] = {}
        self._beat_seen: dict[str, Observed] = {}
        self._lock = asyncio.Lock()  # one writer of lease files in this agent at a time
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lease-io")
        self._busy = 0  # I/O calls outstanding (a hung datastore holds them)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # Called after every round (ferry/agent/watchdog.py's state is written there).
        self.on_round: Callable[[], None] | None = None
        self._unadopted: list[str] = []  # adopted guests whose leases are not sorted out

    # --- I/O ------------------------------------------------------------------------
    async def _io(self, fn: Callable[..., T], *args: object) -> T:
        if self._busy >= 2:
            raise Conflict(f"the HA datastore {self.datastore} of host {self.host} still "
                           "has not answered earlier requests", "check the shared storage")
        self._busy += 1
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, fn, *args)
        future.add_done_callback(lambda _: self._done())
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
            # cancellation that arrives as the call completes, and close() would then
            # wait forever for a renewal loop that goes on (seen in the unit tests).
            async with asyncio.timeout(max(self.timing.renew_s * 2, 1.0)):
                return await future
        except (OSError, TimeoutError, ValueError) as exc:
            # A start or a resume refused for this says why (not an HTTP 500).
            raise Conflict(f"the HA datastore {self.datastore} of host {self.host} does not "
                           f"answer: {type(exc).__name__} {exc}".strip(),
                           "check the shared storage; a VM runs only while its lease is "
                           "held") from exc

    def _done(self) -> None:
        self._busy -= 1

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self, adopted: list[str], present: Iterable[str] = ()) -> None:
        """Set up the directories, take back the leases of the adopted VMs whose guests
        execute (those another host holds now go to Guests.lost), release those in this
        host's name whose VM has no QEMU here any more (`present`: the VMs this agent
        still has a run directory for, adopted or not), and start renewing.
        Paused ones (e.g. a migration's destination) hold no lease until resumed. A
        datastore that does not answer now does not keep the agent down: adopting is
        retried every round, and the guests are paused if it has not worked after
        fence_s (an operator resumes them)."""
        try:
            await self._io(self.files.setup)
            await self._adopt(adopted)
            await self._release_gone({*adopted, *present})
        except Exception as exc:
            log.error("HA datastore %s not usable at start: %s", self.datastore, exc)
            self._unadopted = list(adopted)
        self._task = asyncio.create_task(self._run(), name="leases")

    async def _adopt(self, adopted: list[str]) -> None:
        lost = []
        running = [vm for vm in adopted if await self.guests.executing(vm)]
        async with self._lock:
            for vm in running:
                found = await self._io(self.files.read_lease, vm)
                if found is not None and found.owner != self.host and not found.released:
                    lost.append(vm)
                    continue
                if found is not None and found.owner == self.host and not found.released:
                    self.held[vm] = found  # ours; renewed from the next round on
                else:
                    mine = take(found, vm, self.host)
                    await self._io(self.files.write_lease, mine)
                    self.held[vm] = mine
        self.last_ok = self.clock()
        for vm in lost:
            log.warning("VM %s runs here but host %s holds its lease: fencing it", vm,
                        self._owner(vm))
            await self.guests.lost(vm)

    async def _release_gone(self, present: set[str]) -> None:
        """A lease in this host's name whose VM has no QEMU here (the host went down with
        it, or lost it while this agent was away) would keep every other host from
        starting the VM until an operator steps in: nothing runs it here, so it is free."""
        leases, _ = await self._io(self.files.read_all)
        async with self._lock:
            for vm, found in leases.items():
                if (found.owner == self.host and not found.released and vm not in present
                        and vm not in self.held):
                    log.info("VM %s has no QEMU on %s: releasing its lease", vm, self.host)
                    await self._io(self.files.write_lease, released(found))

    def _owner(self, vm: str) -> str:
        rec = self._records.get(vm)
        return rec.owner if rec is not None else "another host"

    async def close(self) -> None:
        self._closing = True  # the loop ends at its next round even if a cancel is lost
        if self._task is not None:
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                self._task.result()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while not self._closing:
            try:
                await self.tick()
            except Exception:  # never stop renewing (or fencing) on one odd round
                log.exception("lease round failed")
            await asyncio.sleep(self.timing.renew_s)

    # --- acquiring and releasing -----------------------------------------------------
    @contextlib.contextmanager
    def starting(self, vm: str) -> Iterator[None]:
        """Around taking a VM's lease and launching its QEMU: until the launch has
        registered the process, the rounds count the guest as alive."""
        self._starting.add(vm)
        try:
            yield
        finally:
            self._starting.discard(vm)

    def _alive(self, vm: str) -> bool:
        return vm in self._starting or self.guests.alive(vm)

    async def acquire(self, vm: str, wait_s: float = 0.0) -> None:
        """Hold the VM's lease before its guest runs here. Free (missing, released) or
        our own: taken at once. Another host's: only once this agent has seen it
        unchanged for expire_s (waiting up to wait_s for that), then confirmed."""
        deadline = self.clock() + wait_s
        while True:
            async with self._lock:
                found = await self._io(self.files.read_lease, vm)
                mine = self.held.get(vm)
                if mine is not None and verdict(mine, found) is Verdict.HOLD:
                    return
                if found is None or found.released:
                    # Free: written only after the previous guest's QEMU was gone.
                    rec = take(found, vm, self.host)
                    await self._io(self.files.write_lease, rec)
                    self.held[vm] = rec
                    return
                now = self.clock()
                seen = self._seen[vm] = observe(self._seen.get(vm), found.key, now)
                # Our own name on a record we do not hold (an agent restart, a guest
                # that crashed): only we write it, but a taker may be judging it
                # expired, so it is taken like any other, confirmation included.
                if found.owner == self.host or expired(seen, found, now, self.timing):
                    claim = take(found, vm, self.host)
                    await self._io(self.files.write_lease, claim)
                    break
                if now >= deadline:
                    raise Conflict(
                        f"host {found.owner} holds the lease of VM {vm} (generation "
                        f"{found.generation}) and host {self.host} has not seen it expire",
                        "wait until that host has stopped the VM or is declared dead")
            await asyncio.sleep(min(self.timing.renew_s, max(deadline - self.clock(), 0.01)))
        await asyncio.sleep(self.timing.confirm_s)
        async with self._lock:
            found = await self._io(self.files.read_lease, vm)
            if not confirmed(claim, found):
                raise Conflict(f"the lease of VM {vm} changed while host {self.host} took "
                               f"it over (now {found.owner if found else 'gone'}): "
                               "its previous holder lives", "retry later")
            self.held[vm] = claim

    async def take_over(self, vm: str) -> None:
        """Take the lease whatever it says, without waiting: only on the control plane's
        word that the other holder's guest cannot run (a migration's switch is recorded
        and the source is paused, or a destination never ran and the source resumes)."""
        async with self._lock:
            mine = self.held.get(vm)
            found = await self._io(self.files.read_lease, vm)
            if mine is not None and verdict(mine, found) is Verdict.HOLD:
                return
            rec = take(found, vm, self.host)
            await self._io(self.files.write_lease, rec)
            self.held[vm] = rec

    async def release(self, vm: str) -> None:
        """The VM's QEMU here is gone: mark the lease free (if it is still ours)."""
        async with self._lock:
            mine = self.held.pop(vm, None)
            self._stalled.discard(vm)
            found = await self._io(self.files.read_lease, vm)
            if found is None or found.released or found.owner != self.host:
                return
            if mine is not None and found.generation != mine.generation:
                return
            await self._io(self.files.write_lease, released(found))

    # --- the round ---------------------------------------------------------------------
    async def tick(self) -> None:
        start = self.clock()
        if self._unadopted:
            try:
                await self._io(self.files.setup)
                await self._adopt(self._unadopted)
                self._unadopted = []
            except Exception:
                if must_fence(self.last_ok, start, self.timing):
                    for vm in self._unadopted:
                        await self.guests.pause(vm)
                    self._unadopted = []
        if self.held and must_fence(self.last_ok, start, self.timing):
            await self._fence()
        beat_ok = True
        try:
            self._beat += 1
            await self._io(self.files.write_beat,
                           HostBeat(host=self.host, counter=self._beat, address=self.address))
        except Exception as exc:
            beat_ok = False
            log.warning("host heartbeat not written: %s", exc)
        lost, ok = await self._renew(start)
        ok = ok and beat_ok
        self.ok = ok
        for vm in lost:
            log.warning("host %s took the lease of VM %s: stopping it here", self._owner(vm),
                        vm)
            await self.guests.lost(vm)
        if ok:
            self.last_ok = start
            await self._maybe_unfence()
        if self.on_round is not None:
            try:
                self.on_round()
            except Exception:  # the watchdog then sees an old round: it errs on safety
                log.exception("watchdog state not written")
        await self._observe()

    async def _fence(self) -> None:
        """Not renewed for fence_s: stop every guest holding a lease before anyone may
        judge it expired. Those paused here are resumed only if the lease proves ours."""
        if self._unfence_at is None and not self._stalled:
            log.error("leases not renewed for %.1f s: fencing %s", self.clock() - self.last_ok,
                      ", ".join(sorted(self.held)))
        for vm in sorted(self.held):
            if vm not in self._stalled and await self.guests.pause(vm):
                self._stalled.add(vm)
        self._unfence_at = None

    async def _renew(self, start: float) -> tuple[list[str], bool]:
        lost: list[str] = []
        ok = True
        async with self._lock:
            for vm in sorted(self.held):
                mine = self.held[vm]
                if not self._alive(vm):
                    continue  # released below, outside the loop over held
                try:
                    found = await self._io(self.files.read_lease, vm)
                    v = verdict(mine, found)
                    if v is Verdict.LOST:
                        del self.held[vm]
                        self._stalled.discard(vm)
                        if found is not None:
                            self._records[vm] = found
                        lost.append(vm)
                        continue
                    new = renewed(mine)
                    await self._io(self.files.write_lease, new)
                    self.held[vm] = new
                except Exception as exc:
                    ok = False
                    log.warning("lease of %s not renewed: %s", vm, exc)
        for vm in [v for v in sorted(self.held) if not self._alive(v)]:
            with contextlib.suppress(Exception):
                await self.release(vm)
        # A round that took longer than fence_s proves nothing for its start.
        if self.clock() - start >= self.timing.fence_s:
            ok = False
        return lost, ok

    async def _maybe_unfence(self) -> None:
        if not self._stalled:
            return
        now = self.clock()
        if self._unfence_at is None:
            self._unfence_at = now + self.timing.confirm_s
            return
        if now < self._unfence_at:
            return
        # Renewed, and still ours confirm_s later: no taker wrote in between.
        for vm in sorted(self._stalled):
            if vm in self.held:
                log.warning("lease of %s still ours after the stall: resuming it", vm)
                await self.guests.unpause(vm)
        self._stalled.clear()
        self._unfence_at = None

    async def _observe(self) -> None:
        try:
            leases, beats = await self._io(self.files.read_all)
        except Exception as exc:
            log.debug("datastore not read: %s", exc)
            return
        now = self.clock()
        for vm, rec in leases.items():
            self._seen[vm] = observe(self._seen.get(vm), rec.key, now)
        self._records = leases
        for host, beat in beats.items():
            self._beat_seen[host] = observe(self._beat_seen.get(host),
                                            (host, 0, beat.counter, False), now)
        self._beats = beats

    # --- what others see -----------------------------------------------------------------
    def peers_alive(self) -> list[HostBeat]:
        """Other hosts whose datastore heartbeat this agent saw change within expire_s."""
        now = self.clock()
        return [b for h, b in sorted(self._beats.items()) if h != self.host
                and now - self._beat_seen[h].since < self.timing.expire_s]

    def view(self) -> DatastoreView:
        """Every held lease, and the released ones that changed within the last minute
        (what the control plane needs to restart an isolated host's VMs; the files of
        long-gone VMs would only grow every heartbeat)."""
        now = self.clock()
        return DatastoreView(
            datastore=self.datastore, ok=self.ok,
            hosts={h: b.counter for h, b in self._beats.items()},
            leases={vm: LeaseView(owner=r.owner, generation=r.generation, counter=r.counter,
                                  released=r.released) for vm, r in self._records.items()
                    if not r.released or now - self._seen[vm].since < RELEASED_SHOWN_S})


__all__ = ["Guests", "LeaseFiles", "LeaseKeeper", "keeper_for"]


def keeper_for(config: AgentConfig, guests: Guests) -> LeaseKeeper | None:
    """The agent's keeper on its HA datastore, or None when it has none."""
    if config.ha_datastore is None:
        return None
    path = config.datastore_paths.get(config.ha_datastore)
    if path is None:
        raise ValueError(f"ha_datastore {config.ha_datastore!r} is not one of the agent's "
                         "datastores")
    return LeaseKeeper(config.name, config.ha_datastore, Path(path) / ".ferry",
                       config.lease_timing, f"{config.listen_host}:{config.listen_port}",
                       guests)
