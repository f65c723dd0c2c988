"""The planner's working copy of a cluster: loads kept up to date move by move.

Imbalance is kept as running sums (Σ load and Σ load² per dimension over the hosts in
the pool), so the effect of a trial move on the whole cluster costs O(1): only its
source and target change. Plain lists rather than models: the planner tries tens of
thousands of moves per plan.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from ferry.domain.drs_model import ClusterSnapshot, DrsSettings, HostLoad, Move
from ferry.domain.drs_rules import Book, compile_rules, must_allows

# Pre-copy sends the memory, then what was dirtied meanwhile, and so on: a geometric
# series, memory / (1 - dirty/link). Past this ratio it would not converge without
# throttling or post-copy; cost it as ten copies.
_MAX_DIRTY_RATIO = 0.9
_NONCONVERGING_FACTOR = 10.0


class State:
    def __init__(self, snap: ClusterSnapshot, settings: DrsSettings,
                 drain: frozenset[str] = frozenset()) -> None:
        self.settings = settings
        self.w = settings.cpu_weight
        hosts = snap.hosts
        self.hnames = [h.name for h in hosts]
        self.hidx = {n: i for i, n in enumerate(self.hnames)}
        n = len(hosts)
        self.cap_c = [float(h.cpus) for h in hosts]
        self.cap_m = [float(h.memory_mib) for h in hosts]
        self.vcap = [h.cpus * h.max_vcpu_ratio for h in hosts]
        self.avail = [h.available for h in hosts]
        self.drained = [h.available and (h.maintenance or h.standby or h.name in drain)
                        for h in hosts]
        # In the pool: counted in the imbalance and may receive VMs.
        self.active = [self.avail[i] and not self.drained[i] for i in range(n)]
        self.why_drained = ["maintenance" if h.maintenance else "standby" if h.standby
                            else "evacuation" for h in hosts]
        self.alloc = [0.0] * n
        self.vcpu = [0.0] * n
        self.dc = [0.0] * n
        self.dm = [0.0] * n
        for name, mib in snap.incoming_mib.items():
            if name in self.hidx:
                i = self.hidx[name]
                self.alloc[i] += mib
                self.dm[i] += mib  # it will be used there soon: count it as demand too
        self.vms = snap.vms
        self.vnames = [v.name for v in snap.vms]
        self.vhost = [self.hidx.get(v.host, -1) for v in snap.vms]
        self.v_alloc = [float(v.memory_mib) for v in snap.vms]
        self.v_vcpu = [float(v.vcpus) for v in snap.vms]
        self.v_c = [v.cpu_demand for v in snap.vms]
        self.v_m = [float(min(v.mem_demand_mib, v.memory_mib)) for v in snap.vms]
        for j, i in enumerate(self.vhost):
            if i >= 0:
                self.alloc[i] += self.v_alloc[j]
                self.vcpu[i] += self.v_vcpu[j]
                self.dc[i] += self.v_c[j]
                self.dm[i] += self.v_m[j]
        # Room as if every arrival came before any departure: a move that only fits
        # after earlier departures depends on them.
        self.peak_alloc = list(self.alloc)
        self.peak_vcpu = list(self.vcpu)
        self.lc = [self.dc[i] / self.cap_c[i] for i in range(n)]
        self.lm = [self.dm[i] / self.cap_m[i] for i in range(n)]
        self.pool = [i for i in range(n) if self.active[i]]
        self.n_act = len(self.pool)
        self.sc = sum(self.lc[i] for i in self.pool)
        self.qc = sum(self.lc[i] ** 2 for i in self.pool)
        self.sm = sum(self.lm[i] for i in self.pool)
        self.qm = sum(self.lm[i] ** 2 for i in self.pool)
        ref = self.pool or list(range(n))
        self.mean_cap_m = sum(self.cap_m[i] for i in ref) / len(ref) if ref else 1.0
        self.mean_cap_c = sum(self.cap_c[i] for i in ref) / len(ref) if ref else 1.0

        self.book: Book = compile_rules(self.vnames, self.hidx, snap.rules)
        self.v_anti: list[list[int]] = [[] for _ in snap.vms]
        self.anti_count: list[dict[int, int]] = []
        for k, (_, members) in enumerate(self.book.anti):
            counts: dict[int, int] = {}
            for j in members:
                self.v_anti[j].append(k)
                if self.vhost[j] >= 0:
                    counts[self.vhost[j]] = counts.get(self.vhost[j], 0) + 1
            self.anti_count.append(counts)
        # A unit's host: where all its VMs are, -1 if they are split or on unknown hosts.
        self.uhost: list[int] = []
        self.units_on: list[set[int]] = [set() for _ in range(n)]
        for u, unit in enumerate(self.book.units):
            where = {self.vhost[j] for j in unit.vms}
            h = where.pop() if len(where) == 1 else -1
            self.uhost.append(h)
            if h >= 0:
                self.units_on[h].add(u)
        self.v_sent = [self._sent_mib(v.dirty_rate_mib_s, self.v_m[j])
                       for j, v in enumerate(snap.vms)]
        # Per unit, fixed for the plan: its totals and its cost.
        self.u_tot = [self.totals(unit.vms) for unit in self.book.units]
        self.u_cost = [self.cost(unit.vms) for unit in self.book.units]
        self.moves: list[Move] = []
        self.departures: list[list[int]] = [[] for _ in range(n)]
        self.moved: set[int] = set()  # VMs this plan moved: never twice in one plan

    def _sent_mib(self, dirty: float, mem: float) -> float:
        ratio = dirty / self.settings.link_mib_s
        factor = 1.0 / (1.0 - ratio) if ratio < _MAX_DIRTY_RATIO else _NONCONVERGING_FACTOR
        return mem * factor + self.settings.move_overhead_mib

    # --- measures ---------------------------------------------------------------
    def objective(self) -> float:
        """n x the weighted variance of the pool's loads: the sum the planner lowers."""
        n = self.n_act
        if n == 0:
            return 0.0
        f = (self.w * (self.qc - self.sc * self.sc / n)
             + (1 - self.w) * (self.qm - self.sm * self.sm / n))
        return max(f, 0.0)

    def imbalance(self) -> float:
        """Weighted standard deviation of the pool hosts' normalized CPU and memory load."""
        return math.sqrt(self.objective() / self.n_act) if self.n_act else 0.0

    def trial(self, a: int, b: int, c: float, m: float) -> float:
        """The objective if demand (c cores, m MiB) moved from host a (or nowhere: -1) to b."""
        sc, qc, sm, qm = self.sc, self.qc, self.sm, self.qm
        if a >= 0 and self.active[a]:
            ac = (self.dc[a] - c) / self.cap_c[a]
            am = (self.dm[a] - m) / self.cap_m[a]
            lc, lm = self.lc[a], self.lm[a]
            sc += ac - lc
            qc += ac * ac - lc * lc
            sm += am - lm
            qm += am * am - lm * lm
        if self.active[b]:
            bc = (self.dc[b] + c) / self.cap_c[b]
            bm = (self.dm[b] + m) / self.cap_m[b]
            lc, lm = self.lc[b], self.lm[b]
            sc += bc - lc
            qc += bc * bc - lc * lc
            sm += bm - lm
            qm += bm * bm - lm * lm
        n = self.n_act
        return max(self.w * (qc - sc * sc / n) + (1 - self.w) * (qm - sm * sm / n), 0.0)

    def cost(self, members: Iterable[int]) -> float:
        """What moving the VMs costs, in the same units as the gain.

        The memory that crosses the wire (inflated by the dirty rate) as a share of a
        typical host, plus the CPU demand moved as a share of a typical host: the risk that
        the demand the move was made for changes before the move has paid off (vSphere's
        cost-benefit weighs the same risk). Weighted like the objective, so that with no
        CPU a move pays when the two hosts' memory loads differ by more than the
        threshold's spread plus the VM's own share."""
        sent = sum(self.v_sent[j] for j in members)
        cpu = sum(self.v_c[j] for j in members)
        return (2 * (1 - self.w) * sent / self.mean_cap_m
                + 2 * self.w * cpu / self.mean_cap_c)

    def load(self, i: int) -> HostLoad:
        return HostLoad(cpu=self.lc[i], memory=self.lm[i])

    # --- limits -----------------------------------------------------------------
    def totals(self, members: Iterable[int]) -> tuple[float, float, float, float]:
        alloc = vcpu = c = m = 0.0
        for j in members:
            alloc += self.v_alloc[j]
            vcpu += self.v_vcpu[j]
            c += self.v_c[j]
            m += self.v_m[j]
        return alloc, vcpu, c, m

    def room(self, b: int, alloc: float, vcpu: float) -> bool:
        return (self.active[b] and self.alloc[b] + alloc <= self.cap_m[b]
                and self.vcpu[b] + vcpu <= self.vcap[b] + 1e-9)

    def anti_ok(self, members: Iterable[int], b: int) -> bool:
        for j in members:
            for k in self.v_anti[j]:
                if self.anti_count[k].get(b, 0) > 0:
                    return False
        return True

    def fits(self, u: int, members: list[int], b: int,
             tot: tuple[float, float, float, float]) -> bool:
        return (self.room(b, tot[0], tot[1]) and must_allows(self.book.units[u], b)
                and self.anti_ok(members, b))

    # --- moving -----------------------------------------------------------------
    def move(self, j: int, b: int, reason: str, rule: str | None, mandatory: bool) -> None:
        a = self.vhost[j]
        before = self.objective()
        after = self.trial(a, b, self.v_c[j], self.v_m[j])
        alloc, vcpu = self.v_alloc[j], self.v_vcpu[j]
        depends: tuple[int, ...] = ()
        if (self.peak_alloc[b] + alloc > self.cap_m[b]
                or self.peak_vcpu[b] + vcpu > self.vcap[b] + 1e-9):
            depends = tuple(self.departures[b])
        self.peak_alloc[b] += alloc
        self.peak_vcpu[b] += vcpu
        for i, sign in ((a, -1.0), (b, 1.0)):
            if self.active[i]:
                self.sc -= self.lc[i]
                self.qc -= self.lc[i] ** 2
                self.sm -= self.lm[i]
                self.qm -= self.lm[i] ** 2
            self.alloc[i] += sign * alloc
            self.vcpu[i] += sign * vcpu
            self.dc[i] += sign * self.v_c[j]
            self.dm[i] += sign * self.v_m[j]
            self.lc[i] = self.dc[i] / self.cap_c[i]
            self.lm[i] = self.dm[i] / self.cap_m[i]
            if self.active[i]:
                self.sc += self.lc[i]
                self.qc += self.lc[i] ** 2
                self.sm += self.lm[i]
                self.qm += self.lm[i] ** 2
        for k in self.v_anti[j]:
            counts = self.anti_count[k]
            counts[a] -= 1
            counts[b] = counts.get(b, 0) + 1
        self.vhost[j] = b
        self.moved.add(j)
        u = self.book.unit_of[j]
        if self.uhost[u] >= 0:
            self.units_on[self.uhost[u]].discard(u)
        where = {self.vhost[x] for x in self.book.units[u].vms}
        self.uhost[u] = where.pop() if len(where) == 1 else -1
        if self.uhost[u] >= 0:
            self.units_on[self.uhost[u]].add(u)
        self.departures[a].append(len(self.moves))
        self.moves.append(Move(
            vm=self.vnames[j], source=self.hnames[a], target=self.hnames[b], reason=reason,
            rule=rule, mandatory=mandatory, gain=before - after, cost=self.cost([j]),
            source_after=self.load(a), target_after=self.load(b), depends_on=depends))

    def movable(self, members: Iterable[int]) -> bool:
        return all(self.vms[j].movable and self.avail[self.vhost[j]] for j in members
                   if self.vhost[j] >= 0)

    def cooling(self, members: Iterable[int]) -> bool:
        s = self.settings
        for j in members:
            if j in self.moved:
                return True
            t = self.vms[j].last_moved_at
            if t is not None and s.now - t < s.cooldown_s:
                return True
        return False
