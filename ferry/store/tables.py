"""ORM tables. Rows never leave store/: the Store returns domain records."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ferry.domain.migration import Phase
from ferry.domain.storage import RelocationPhase

# Migrations and relocations end in phases of these names.
TERMINAL = tuple(p.value for p in Phase if p.terminal)
assert set(TERMINAL) == {p.value for p in RelocationPhase if p.terminal}
# Ids that count up for ever (events, iterations, runs): 64 bits on PostgreSQL, whose
# INTEGER is 32; SQLite's INTEGER is 64 already, and only INTEGER PRIMARY KEY is its
# rowid (autoincrementing), so it keeps that spelling.
SerialId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class HostRow(Base):
    __tablename__ = "hosts"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str] = mapped_column(String(256))
    maintenance: Mapped[bool] = mapped_column(Boolean, default=False)
    standby: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    facts_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_seen: Mapped[float] = mapped_column(Float, default=0.0)


class VmRow(Base):
    __tablename__ = "vms"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    spec_json: Mapped[str] = mapped_column(Text)
    host: Mapped[str] = mapped_column(ForeignKey("hosts.name"))
    state: Mapped[str] = mapped_column(String(32))


class JobColumns:
    """A persisted long job (a migration, a relocation): the columns queries need, and
    the whole record as the domain model's JSON (one schema, not two)."""

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    vm: Mapped[str] = mapped_column(String(64), index=True)
    record_json: Mapped[str] = mapped_column(Text)
    phase: Mapped[str] = mapped_column(String(32), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    # Bumped by every write; a write applies only if the version it read is still there.
    version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class MigrationRow(JobColumns, Base):
    __tablename__ = "migrations"


def _one_unfinished_per_vm(row: type[JobColumns], kind: str) -> Index:
    """At most one unfinished job of a kind per VM, kept by the database itself: with
    concurrent writers (PostgreSQL) a check before the insert could pass twice."""
    unfinished = row.phase.not_in(TERMINAL)
    return Index(f"uq_{kind}_unfinished_vm", row.vm, unique=True,
                 sqlite_where=unfinished, postgresql_where=unfinished)


class IterationRow(Base):
    __tablename__ = "migration_iterations"
    id: Mapped[int] = mapped_column(SerialId, primary_key=True, autoincrement=True)
    migration_id: Mapped[str] = mapped_column(ForeignKey("migrations.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    iteration_json: Mapped[str] = mapped_column(Text)


class SettingRow(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value_json: Mapped[str] = mapped_column(Text)


class RelocationRow(JobColumns, Base):
    __tablename__ = "relocations"


_JOB_INDEXES = (_one_unfinished_per_vm(MigrationRow, "migrations"),
                _one_unfinished_per_vm(RelocationRow, "relocations"))


def job_indexes() -> tuple[Index, ...]:
    return _JOB_INDEXES


# --- trust: API tokens, join tokens, enrolled hosts; the event log (store/events.py) --
class TokenRow(Base):
    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class JoinTokenRow(Base):
    __tablename__ = "join_tokens"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    host: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class EnrolmentRow(Base):
    __tablename__ = "enrolments"
    host: Mapped[str] = mapped_column(String(64), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    enrolled_at: Mapped[float] = mapped_column(Float)


class EventRow(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(SerialId, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(96))
    action: Mapped[str] = mapped_column(String(128))
    object: Mapped[str] = mapped_column(String(256))
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text, default="")
    # The VM the event concerns (a migration's, a relocation's), for `?vm=` filtering.
    vm: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


class NetworkRow(Base):
    __tablename__ = "networks"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Unique: two networks on one VNI would be one segment.
    vni: Mapped[int] = mapped_column(Integer, unique=True)
    spec_json: Mapped[str] = mapped_column(Text)


class RuleRow(Base):
    __tablename__ = "drs_rules"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    rule_json: Mapped[str] = mapped_column(Text)


# --- scheduled tasks and their runs ------------------------------------------------
class ScheduleRow(Base):
    __tablename__ = "schedules"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    schedule_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class ScheduleRunRow(Base):
    """One run of a task: claimed by inserting it before the action starts. The unique
    (task, scheduled time) is what makes a scheduled time run at most once, however
    many loops or restarts reach it."""

    __tablename__ = "schedule_runs"
    __table_args__ = (UniqueConstraint("schedule_id", "scheduled_at",
                                       name="uq_schedule_run"),)
    id: Mapped[int] = mapped_column(SerialId, primary_key=True, autoincrement=True)
    schedule_id: Mapped[str] = mapped_column(String(16), index=True)
    # Whole seconds (exact equality for the constraint); 64 bits: past 2038 on PostgreSQL.
    scheduled_at: Mapped[int] = mapped_column(BigInteger)
    run_json: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(16), index=True)


# --- the control plane's leader (ferry/domain/leader.py) ------------------------------
class LeaderRow(Base):
    """One row per lease (one: "control"). Written only by compare-and-set on version."""

    __tablename__ = "leader_lease"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128), default="")
    expires_at: Mapped[float] = mapped_column(Float, default=0.0)
    token: Mapped[int] = mapped_column(BigInteger, default=0)
    version: Mapped[int] = mapped_column(BigInteger, default=0)
