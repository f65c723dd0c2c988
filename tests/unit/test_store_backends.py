"""What the store must keep on a backend with concurrent writers (PostgreSQL) as it does
on SQLite: racing writes neither fail nor lose each other, the database's own
constraints hold where a check before a write could pass twice, and event ids become
visible in order. Each test runs on both backends (`db_url`, tests/unit/conftest.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from ferry.domain.audit import EventRecord
from ferry.domain.drs import Rule
from ferry.domain.drs_model import RuleKind
from ferry.domain.errors import Conflict
from ferry.domain.events import SYSTEM, EventKind, EventQuery
from ferry.domain.ha import Priority
from ferry.domain.inventory import VmState
from ferry.domain.leader import LeaderLease, LeaderTerms, claim
from ferry.domain.migration import Phase
from ferry.domain.records import MigrationRecord, VmRecord
from ferry.domain.specs import HostFacts, KernelBoot, VmSpec
from ferry.store import Store
from ferry.store.engine import backend, order_event_writers, store_url
from ferry.store.tables import EventRow, MigrationRow

FACTS = HostFacts(name="host1", address="10.0.0.1", accel="tcg", cpus=2, memory_mib=1024,
                  memory_free_mib=1024, cpu_models=("Nehalem",), qemu_version="7.2.0",
                  machine_types=("pc-i440fx-7.2",))


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = await Store.open(db_url)
    yield s
    await s.close()


def test_a_store_is_named_by_a_path_or_a_url() -> None:
    assert store_url("/var/lib/ferry/ferry.db") == "sqlite+aiosqlite:////var/lib/ferry/ferry.db"
    assert store_url("sqlite:///ferry.db") == "sqlite+aiosqlite:///ferry.db"
    assert store_url("postgresql://ferry@db1/ferry") == "postgresql+asyncpg://ferry@db1/ferry"
    assert store_url("postgres://ferry@db1/ferry") == "postgresql+asyncpg://ferry@db1/ferry"
    kept = "postgresql+asyncpg://u@/d?host=/run/postgresql"
    assert store_url(kept) == kept
    assert backend("ferry.db") == "sqlite" and backend(kept) == "postgresql"


async def test_another_database_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"SQLite .* or PostgreSQL"):
        await Store.open("mysql+aiomysql://u@h/d")


async def test_the_store_says_which_backend_it_is(store: Store, db_url: str) -> None:
    assert store.backend == backend(db_url)


async def test_two_migrations_of_one_vm_racing_one_is_refused(store: Store) -> None:
    def mig(i: int) -> MigrationRecord:
        return MigrationRecord(id=f"m{i}", vm="web1", source="a", target="b",
                               phase=Phase.PENDING, created_at=time.time())
    results = await asyncio.gather(*(store.add_migration(mig(i)) for i in range(8)),
                                   return_exceptions=True)
    added = [r for r in results if isinstance(r, MigrationRecord)]
    refused = [r for r in results if isinstance(r, Conflict)]
    assert len(added) == 1 and len(refused) == 7, results
    assert all(f"({added[0].id})" in str(r) for r in refused)
    assert [m.id for m in await store.migrations(unfinished_only=True)] == [added[0].id]


async def test_the_database_refuses_a_second_unfinished_job_itself(store: Store) -> None:
    """The guarantee is the unique index on unfinished jobs, not the check before the
    insert; a finished job does not count."""
    def row(i: str, phase: Phase) -> MigrationRow:
        return MigrationRow(id=i, vm="web1", record_json="{}", phase=phase.value,
                            created_at=0.0)
    async with store._session.begin() as s:
        s.add(row("m1", Phase.FAILED))
        s.add(row("m2", Phase.PRECOPY))
    with pytest.raises(IntegrityError):
        async with store._session.begin() as s:
            s.add(row("m3", Phase.PENDING))
    async with store._session.begin() as s:
        s.add(row("m4", Phase.COMPLETED))


async def test_racing_writes_to_one_vm_row_are_all_kept(store: Store) -> None:
    await store.record_heartbeat(FACTS, "u")
    spec = VmSpec(name="web1", kernel=KernelBoot(kernel="/k"))
    await store.add_vm(VmRecord(spec=spec, host="host1", state=VmState.DEFINED))
    # Different fields of one row from concurrent transactions: none fails, none is lost.
    await asyncio.gather(
        store.update_vm("web1", state=VmState.RUNNING),
        store.update_vm("web1", spec=spec.model_copy(update={"memory_mib": 512})),
        store.record_heartbeat(FACTS, "u2"))
    vm = await store.vm("web1")
    assert vm.state is VmState.RUNNING and vm.spec.memory_mib == 512


async def test_racing_first_heartbeats_register_the_host_once(store: Store) -> None:
    await asyncio.gather(*(store.record_heartbeat(FACTS, f"u{i}") for i in range(6)))
    assert [h.name for h in await store.hosts()] == ["host1"]


async def test_racing_priority_changes_are_all_kept(store: Store) -> None:
    vms = [f"vm{i}" for i in range(12)]
    await asyncio.gather(*(store.ha.set_priority(vm, Priority.HIGH) for vm in vms))
    assert await store.ha.priorities() == dict.fromkeys(vms, Priority.HIGH)
    await asyncio.gather(*(store.ha.forget(vm) for vm in vms[:6]))
    assert sorted(await store.ha.priorities()) == sorted(vms[6:])


async def test_racing_settings_and_enrolments_neither_fail(store: Store) -> None:
    from ferry.domain.migration import StreamOptions
    await asyncio.gather(*(store.set_migration_defaults(StreamOptions(max_bandwidth_bytes_s=n))
                           for n in range(1, 9)))
    assert 1 <= (await store.migration_defaults()).max_bandwidth_bytes_s <= 8
    await asyncio.gather(*(store.security.enrol("host1", f"{n:064x}") for n in range(6)))
    assert (await store.security.enrolment("host1") or "").startswith("0" * 63)


async def test_racing_rules_of_one_name_one_is_refused(store: Store) -> None:
    rule = Rule(name="apart", kind=RuleKind.ANTI_AFFINITY, vms=("a", "b"))
    results = await asyncio.gather(*(store.drs.add_rule(rule) for _ in range(5)),
                                   return_exceptions=True)
    assert sum(isinstance(r, Conflict) for r in results) == 4, results


def test_a_rule_name_fits_its_column() -> None:
    with pytest.raises(ValidationError):
        Rule(name="r" * 65, kind=RuleKind.ANTI_AFFINITY, vms=("a", "b"))


async def test_event_ids_become_visible_in_order(store: Store) -> None:
    """A follower asks for ids above the last it saw: an id committed after a larger
    one would be skipped for ever. Concurrent writers; a reader polling all along."""
    writers, each = 6, 15
    seen: list[EventRecord] = []
    done = asyncio.Event()

    async def write(w: int) -> None:
        for n in range(each):
            await store.events.add(EventKind.AUDIT, SYSTEM, f"w{w}", f"n{n}")

    async def follow() -> None:
        last = 0
        while True:
            finished = done.is_set()
            page = await store.events.page(EventQuery(after=last, limit=1000))
            seen.extend(page)
            last = page[-1].id if page else last
            if finished and not page:
                return
            await asyncio.sleep(0)
    reader = asyncio.create_task(follow())
    await asyncio.gather(*(write(w) for w in range(writers)))
    done.set()
    await reader
    assert len(seen) == writers * each == len({e.id for e in seen})


async def test_a_later_event_waits_for_an_earlier_uncommitted_one(store: Store) -> None:
    """The same, made certain: an event written while another's transaction is still
    open must not become visible first (on PostgreSQL its id would be larger, and a
    follower past it would never see the earlier one)."""
    async with store._session.begin() as s:
        await order_event_writers(s)  # what EventStore.add does first
        s.add(EventRow(at=0.0, kind=EventKind.AUDIT.value, actor=SYSTEM, action="first",
                       object="o", outcome="ok", detail=""))
        await s.flush()
        later = asyncio.create_task(
            store.events.add(EventKind.AUDIT, SYSTEM, "second", "o"))
        await asyncio.sleep(0.5)
        assert await store.events.page(EventQuery(after=0)) == []
    second = await later
    page = await store.events.page(EventQuery(after=0))
    assert [e.action for e in page] == ["first", "second"] and page[1].id == second.id


async def test_ids_past_32_bits_bind(store: Store) -> None:
    # PostgreSQL's INTEGER is 32-bit: the serial ids are BIGINT there.
    await store.events.add(EventKind.AUDIT, SYSTEM, "a", "o")
    assert len(await store.events.page(EventQuery(before=2**62))) == 1
    assert await store.schedules.update_run(2**40) is None


async def test_two_control_planes_starting_at_once_share_one_schema(db_url: str) -> None:
    stores = await asyncio.gather(*(Store.open(db_url) for _ in range(3)))
    try:
        await stores[0].record_heartbeat(FACTS, "u")
        assert [h.name for h in await stores[2].hosts()] == ["host1"]
    finally:
        for s in stores:
            await s.close()


async def test_of_two_claims_from_one_reading_one_lands(store: Store) -> None:
    terms = LeaderTerms()
    read = await store.leader.read()
    assert read == LeaderLease()
    a, b = claim(read, "a", 100.0, terms), claim(read, "b", 100.0, terms)
    assert a is not None and b is not None
    landed = await asyncio.gather(store.leader.write(read, a), store.leader.write(read, b))
    assert sorted(landed) == [False, True]
    now = await store.leader.read()
    assert now.holder in ("a", "b") and now.token == 1 and now.version == 1
