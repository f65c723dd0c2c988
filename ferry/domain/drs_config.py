"""How DRS runs in a cluster (`ferry drs settings`): the automation level, vSphere's
migration threshold, the loop's interval and the limits on parallel moves."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, model_validator

from ferry.domain.specs import Frozen


class Automation(StrEnum):
    MANUAL = "manual"  # plans are shown, nothing moves by itself
    PARTIAL = "partial"  # initial placement only
    FULL = "full"  # a loop applies plans every interval


class DrsConfig(Frozen):
    automation: Automation = Automation.MANUAL
    # 1: only mandatory moves (rules, maintenance) ... 5: act on slight gains.
    threshold: int = Field(default=3, ge=1, le=5)
    interval_s: int = Field(default=60, ge=1, le=86_400)
    cooldown_s: int = Field(default=3600, ge=0, le=7 * 86_400)
    # Parallel migrations: per host (in and out each; vSphere's 10 GbE figure is 8) and
    # per cluster.
    per_host_limit: int = Field(default=8, ge=1, le=64)
    cluster_limit: int = Field(default=32, ge=1, le=1024)
    # DPM (with full automation): consolidate and put hosts in standby when demand sits
    # below the band, wake one when it rises above (vSphere's default band 45-81 %).
    dpm: bool = False
    dpm_low: float = Field(default=0.45, gt=0, lt=1)
    dpm_high: float = Field(default=0.81, gt=0, le=1)
    ha_reserve_hosts: int = Field(default=1, ge=0, le=64)

    @model_validator(mode="after")
    def _band(self) -> DrsConfig:
        if self.dpm_low >= self.dpm_high:
            raise ValueError(f"the DPM band's low mark {self.dpm_low} must be below its "
                             f"high mark {self.dpm_high}")
        return self
