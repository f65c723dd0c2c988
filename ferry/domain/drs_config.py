"""How DRS runs in a cluster (`ferry drs settings`): the automation level, vSphere's
migration threshold, the loop's interval and the limits on parallel moves."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from ferry.domain.specs import Frozen


class Automation(StrEnum):
    MANUAL = "manual"  # plans are shown, nothing moves by itself
    PARTIAL = "partial"  # initial placement only
    FULL = "full"  # a loop applies plans every interval


class DrsConfig(Frozen):
    automation: Automation = Automation.MANUAL
    # 1: only mandatory moves (rules, maintenance) ... 5: act on slight gains.
    threshold: int = Field(default=3, ge=1, le=5)
    interval_s: int = Field(default=60, ge=5, le=86_400)
    cooldown_s: int = Field(default=3600, ge=0, le=7 * 86_400)
    # Parallel migrations: per host (in and out each; vSphere's 10 GbE figure is 8) and
    # per cluster.
    per_host_limit: int = Field(default=8, ge=1, le=64)
    cluster_limit: int = Field(default=32, ge=1, le=1024)
