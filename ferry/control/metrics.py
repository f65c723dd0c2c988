"""/metrics: the cluster in Prometheus' text format, computed at scrape time.

Everything is read from the store (and the DRS snapshot) when Prometheus scrapes, by a
collector registered in a registry of our own, never the process-global one: counters
are derived from the persisted migration and relocation records and the event log, so
they survive a restart of the control plane and agree between replicas, instead of
counters kept in memory that would start again at zero.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ferry.control.drs import Drs
from ferry.domain.drs_model import ClusterSnapshot
from ferry.domain.events import EventKind
from ferry.domain.migration import Phase
from ferry.domain.records import HostRecord, MigrationRecord, VmRecord
from ferry.domain.storage import RelocationRecord
from ferry.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS_S = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
DOWNTIME_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
MIB = 1 << 20


@dataclass(frozen=True)
class ClusterFacts:
    """What one scrape reports, read once so the collector itself does no I/O."""

    now: float
    hosts: Sequence[HostRecord]
    vms: Sequence[VmRecord]
    migrations: Sequence[MigrationRecord]
    relocations: Sequence[RelocationRecord]
    events: dict[EventKind, int]
    snapshot: ClusterSnapshot


async def gather(store: Store, drs: Drs) -> ClusterFacts:
    return ClusterFacts(now=time.time(), hosts=await store.hosts(), vms=await store.vms(),
                        migrations=await store.migrations(),
                        relocations=await store.relocations(),
                        events=await store.events.counts(), snapshot=await drs.snapshot())


def render(facts: ClusterFacts) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FactsCollector(facts))
    return generate_latest(registry)


def histogram(name: str, doc: str, values: Sequence[float],
              bounds: Sequence[float]) -> HistogramMetricFamily:
    """A histogram family from observed values: cumulative counts per upper bound."""
    buckets = [(_le(b), float(sum(1 for v in values if v <= b))) for b in bounds]
    buckets.append(("+Inf", float(len(values))))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=float(sum(values)))


def _le(bound: float) -> str:
    return repr(float(bound))


def _duration_s(m: MigrationRecord) -> float | None:
    if m.total_ms is not None:
        return m.total_ms / 1000
    ended = m.phase_times.get(m.phase.value)
    return ended - m.created_at if ended is not None else None


class FactsCollector(Collector):
    def __init__(self, facts: ClusterFacts) -> None:
        self._facts = facts

    def collect(self) -> Iterable[Metric]:
        yield from self._migrations()
        yield from self._other_jobs()
        yield from self._hosts()

    def _migrations(self) -> Iterable[Metric]:
        ended = [m for m in self._facts.migrations if m.phase.terminal]
        outcomes = CounterMetricFamily("ferry_migrations", "Migrations ended, by outcome",
                                       labels=["outcome"])
        by_phase = Counter(m.phase.value for m in ended)
        for phase in (Phase.COMPLETED, Phase.FAILED):  # both present, even at zero
            outcomes.add_metric([phase.value], by_phase[phase.value])
        yield outcomes
        running = GaugeMetricFamily("ferry_migrations_running", "Migrations under way")
        running.add_metric([], len(self._facts.migrations) - len(ended))
        yield running
        done = [m for m in ended if m.phase is Phase.COMPLETED]
        yield histogram("ferry_migration_duration_seconds",
                        "Completed migrations: start to end",
                        [d for m in done if (d := _duration_s(m)) is not None],
                        DURATION_BUCKETS_S)
        yield histogram("ferry_migration_downtime_seconds",
                        "Completed migrations: the guest's pause at switchover",
                        [m.downtime_ms / 1000 for m in done if m.downtime_ms is not None],
                        DOWNTIME_BUCKETS_S)
        sent = CounterMetricFamily("ferry_migration_bytes_sent",
                                   "Bytes migrations sent, by stream", labels=["stream"])
        sent.add_metric(["memory"], sum(m.transferred_bytes or 0 for m in self._facts
                                        .migrations))
        sent.add_metric(["disk"], sum(m.disk_copied_bytes for m in self._facts.migrations))
        yield sent
        passes = CounterMetricFamily("ferry_migration_passes", "Pre-copy passes")
        passes.add_metric([], sum(len(m.iterations) for m in self._facts.migrations))
        yield passes
        levers = CounterMetricFamily("ferry_migration_levers",
                                     "Convergence levers pulled, by lever", labels=["lever"])
        for lever, n in sorted(Counter(a.kind for m in self._facts.migrations
                                       for a in m.actions).items()):
            levers.add_metric([lever], n)
        yield levers
        checks = [m.memory_check for m in self._facts.migrations if m.memory_check]
        checked = CounterMetricFamily(
            "ferry_memory_checks", "Destination RAM checks before the switch, by result",
            labels=["result"])
        checked.add_metric(["equal"], sum(1 for c in checks
                                          if not c.skipped and not c.repaired_pages))
        checked.add_metric(["repaired"], sum(1 for c in checks if c.repaired_pages))
        checked.add_metric(["skipped"], sum(1 for c in checks if c.skipped))
        yield checked
        repaired = CounterMetricFamily("ferry_memory_repaired_pages",
                                       "Stale destination pages copied again at switchover")
        repaired.add_metric([], sum(c.repaired_pages for c in checks))
        yield repaired

    def _other_jobs(self) -> Iterable[Metric]:
        relocations = CounterMetricFamily("ferry_relocations",
                                          "Disk relocations ended, by outcome",
                                          labels=["outcome"])
        by_phase = Counter(r.phase.value for r in self._facts.relocations if r.phase.terminal)
        for outcome in ("completed", "failed"):
            relocations.add_metric([outcome], by_phase[outcome])
        yield relocations
        for name, doc, kind in (
                ("ferry_drs_moves", "Migrations DRS started (balance, maintenance)",
                 EventKind.DRS_MOVE),
                ("ferry_ha_restarts", "VMs HA restarted after their host failed",
                 EventKind.HA_RESTART)):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], self._facts.events.get(kind, 0))
            yield family

    def _hosts(self) -> Iterable[Metric]:
        snap = self._facts.snapshot
        cpu = GaugeMetricFamily("ferry_host_cpu_load_ratio",
                                "CPU demand of a host's VMs over its cores, as DRS sees it",
                                labels=["host"])
        mem = GaugeMetricFamily("ferry_host_memory_load_ratio",
                                "Memory of a host's VMs over its memory, as DRS sees it",
                                labels=["host"])
        for h in snap.hosts:
            on = [v for v in snap.vms if v.host == h.name]
            cpu.add_metric([h.name], sum(v.cpu_demand for v in on) / h.cpus)
            mem.add_metric([h.name], sum(min(v.mem_demand_mib, v.memory_mib) for v in on)
                           / h.memory_mib)
        yield cpu
        yield mem
        free = GaugeMetricFamily("ferry_host_memory_free_bytes",
                                 "Free memory the host's agent last reported", labels=["host"])
        vms = GaugeMetricFamily("ferry_host_vms", "VMs the inventory places on the host",
                                labels=["host"])
        age = GaugeMetricFamily("ferry_agent_heartbeat_age_seconds",
                                "Seconds since the host's agent last sent a heartbeat",
                                labels=["host"])
        placed = Counter(vm.host for vm in self._facts.vms)
        for rec in self._facts.hosts:
            if rec.facts is not None:
                free.add_metric([rec.name], rec.facts.memory_free_mib * MIB)
            vms.add_metric([rec.name], placed[rec.name])
            age.add_metric([rec.name], max(0.0, self._facts.now - rec.last_seen))
        yield free
        yield vms
        yield age
