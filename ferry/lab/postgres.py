"""A private PostgreSQL server: initdb into a directory of its own, listening only on a
unix socket in that directory (no TCP port), so the system's own cluster is never
touched and two labs or test runs never meet. Trust authentication is safe there: the
directory is 0700 and owned by the server's user. The lab's store with `ferry lab up
--db postgresql` (a server in the lab directory, kept until `ferry lab down`), and the
test session's (`private_server`, a temporary directory, gone at the end)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path(os.environ.get("FERRY_PG_BIN", "/usr/lib/postgresql/15/bin"))
# The server refuses to run as root; as root we run it as Debian's `postgres` user.
SERVER_USER = "postgres"
START_TIMEOUT_S = 30
PREFIX = "ferry-pg-"
OWNER = "owner.pid"  # the test process that started the server


class PostgresMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class PostgresServer:
    socket_dir: Path
    user: str

    def url(self, database: str) -> str:
        """The store URL of one database on this server (asyncpg reads a directory as
        `host` as the unix socket's)."""
        return f"postgresql+asyncpg://{self.user}@/{database}?host={self.socket_dir}"


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", SERVER_USER, "--", *argv]
    return argv


def _require_binaries() -> None:
    if not (BIN / "initdb").exists() or not (BIN / "pg_ctl").exists():
        raise PostgresMissing(f"no PostgreSQL server binaries in {BIN} "
                              "(Debian: apt-get install postgresql; scripts/install-deps.sh)")


def _own(root: Path) -> str:
    """Make `root` the server user's, 0700; returns that user."""
    user = SERVER_USER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0:
        entry = pwd.getpwnam(SERVER_USER)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    os.chmod(root, 0o700)
    return user


@contextlib.contextmanager
def private_server() -> Iterator[PostgresServer]:
    """Start a throwaway server; stop it and delete its files on exit, whatever
    happened in between."""
    _require_binaries()
    _remove_orphans()
    root = Path(tempfile.mkdtemp(prefix=PREFIX))
    (root / OWNER).write_text(str(os.getpid()))
    data, log = root / "data", root / "server.log"
    user = _own(root)
    try:
        _start(data, log, root, user)
        yield PostgresServer(socket_dir=root, user=user)
    finally:
        if (data / "postmaster.pid").exists():
            _stop(data)
        shutil.rmtree(root, ignore_errors=True)


def ensure_server(root: Path) -> PostgresServer:
    """A server whose files live in `root` (made if missing), started if it is not
    running; its data are kept across stops (a lab's store)."""
    _require_binaries()
    root.mkdir(parents=True, exist_ok=True)
    user = _own(root)
    data = root / "data"
    if not _running(data):
        if (data / "PG_VERSION").exists():
            _pg_ctl_start(data, root / "server.log", root)
        else:
            shutil.rmtree(data, ignore_errors=True)  # a half-made one of a crashed start
            _start(data, root / "server.log", root, user)
    return PostgresServer(socket_dir=root, user=user)


def stop_server(root: Path) -> bool:
    """Stop the server in `root` if it runs; True if it did."""
    data = root / "data"
    if not _running(data):
        return False
    _stop(data)
    return True


def _running(data: Path) -> bool:
    if not (data / "postmaster.pid").exists():
        return False
    return subprocess.run(_as_server_user([str(BIN / "pg_ctl"), "status", "-D", str(data)]),
                          check=False, capture_output=True, timeout=30).returncode == 0


def _stop(data: Path) -> None:
    subprocess.run(_as_server_user([
        str(BIN / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate", "-w"]),
        check=False, capture_output=True, timeout=60)


def _remove_orphans() -> None:
    """Servers of test sessions that died without their teardown (SIGKILL): each
    directory names the process that made it; a dead one's server is stopped here."""
    for root in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            owner = int((root / OWNER).read_text())
        except (OSError, ValueError):
            continue  # not ours, or being made right now
        if Path(f"/proc/{owner}").exists():
            continue
        if (root / "data" / "postmaster.pid").exists():
            _stop(root / "data")
        shutil.rmtree(root, ignore_errors=True)


def _start(data: Path, log: Path, socket_dir: Path, user: str) -> None:
    try:
        subprocess.run(_as_server_user([
            str(BIN / "initdb"), "-D", str(data), "-U", user, "--auth=trust",
            "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"]),
            check=True, capture_output=True, timeout=120)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"could not create the PostgreSQL data directory {data}: {exc}"
                           f"\n{exc.stderr.decode(errors='replace')}") from exc
    _pg_ctl_start(data, log, socket_dir)


def _pg_ctl_start(data: Path, log: Path, socket_dir: Path) -> None:
    # listen_addresses='': no TCP at all; the socket lives in our directory. fsync off:
    # a lab's or a test's store (nothing to keep through a machine crash), for speed.
    options = (f"-c listen_addresses='' -c unix_socket_directories={socket_dir} "
               "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
               "-c max_connections=200")
    try:
        subprocess.run(_as_server_user([
            str(BIN / "pg_ctl"), "start", "-w", "-t", str(START_TIMEOUT_S), "-D", str(data),
            "-l", str(log), "-o", options]),
            check=True, capture_output=True, timeout=START_TIMEOUT_S + 10)
    except subprocess.CalledProcessError as exc:
        server_log = log.read_text(errors="replace") if log.exists() else ""
        raise RuntimeError(f"could not start the PostgreSQL server in {data}: {exc}\n"
                           f"{exc.stderr.decode(errors='replace')}\n{server_log}") from exc


def ensure_database(server: PostgresServer, name: str) -> str:
    """The store URL of database `name` (a plain identifier) on `server`, created if
    missing."""
    if not name.isidentifier():
        raise ValueError(f"database name {name!r} is not a plain identifier")
    found = subprocess.run(_as_server_user([
        str(BIN / "psql"),
        "-h", str(server.socket_dir), "-U", server.user, "-d", "postgres", "-tAc",
        f"SELECT 1 FROM pg_database WHERE datname = '{name}'"]),
        check=True, capture_output=True, timeout=30).stdout.strip()
    if found != b"1":
        subprocess.run(_as_server_user([
            str(BIN / "createdb"),
            "-h", str(server.socket_dir), "-U", server.user, name]),
            check=True, capture_output=True, timeout=30)
    return server.url(name)
