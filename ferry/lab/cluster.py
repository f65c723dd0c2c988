"""Bring the lab up and down; say what runs. Crash-safe: `down` finds leftovers by
scanning for processes that name the lab directory and namespaces by prefix."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from ferry.agent.config import AgentConfig, DatastoreConfig
from ferry.control.bootstrap import init_cluster, join_tokens
from ferry.lab import net, postgres
from ferry.lab.config import AGENT_PORT, NETWORK, LabConfig, load
from ferry.pki import ControlPki, HostTls, write_private
from ferry.pki.layout import client_context
from ferry.store.engine import sqlite_url

REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(os.environ.get("FERRY_GUEST_DIR", REPO_ROOT / "build" / "guest"))
GUEST_FILES = ("vmlinuz", "initrd.img")


class LabError(RuntimeError):
    """A lab operation refused or failed; the message says what to do."""


@dataclass(frozen=True)
class LabStatus:
    config: LabConfig
    network_up: bool
    control_pid: int | None  # the first replica's
    agent_pids: dict[str, int | None]
    qemu_pids: list[int]
    new_admin_token: str | None = None  # shown once, when `up` created it
    replica_pids: tuple[int | None, ...] = ()  # every control-plane replica's, in order


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates network namespaces and a bridge); "
                       "run it as root, e.g. `sudo ferry lab up`")
    for tool in ("ip", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            raise LabError(f"`{tool}` is not installed; run `make demo` (it installs "
                           "iproute2 and qemu-system-x86) or apt-get install it")


def _pidfile(config: LabConfig, who: str) -> Path:
    return config.directory / "run" / f"{who}.pid"


def _alive_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")", 1)[1].split()[0] == "Z":
                return None
    except (OSError, IndexError):
        return None
    return pid


def _spawn(argv: list[str], log: Path, pidfile: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    pidfile.write_text(str(proc.pid))
    return proc.pid


def install_guest_image(config: LabConfig) -> bool:
    """Copy the built probe guest onto the shared datastore; False if not built."""
    if not all((GUEST_DIR / f).exists() for f in GUEST_FILES):
        return False
    config.images_dir.mkdir(parents=True, exist_ok=True)
    for name in GUEST_FILES:
        src, dst = GUEST_DIR / name, config.images_dir / name
        if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
            shutil.copy2(src, dst)
    return True


def agent_config(config: LabConfig, host: str, join_token: str | None = None
                 ) -> AgentConfig:
    spec = next(h for h in config.hosts if h.name == host)
    return AgentConfig(
        name=host, listen_host=config.host_ip(host), listen_port=AGENT_PORT,
        control_url=config.control_url, control_urls=config.control_urls[1:],
        run_dir=config.host_dir(host) / "run",
        tls_dir=config.host_tls_dir(host), control_ca=config.ca_file, join_token=join_token,
        accel="tcg", cpus=spec.cpus, memory_mib=spec.memory_mib,
        datastores=(DatastoreConfig(name="shared", path=str(config.shared_datastore),
                                    shared=True),
                    DatastoreConfig(name=f"local-{host}",
                                    path=str(config.local_datastore(host))))
        + ((DatastoreConfig(name="small", path=str(config.small_datastore), shared=True),)
           if config.small_datastore_mib else ()),
        # VM leases and host heartbeats on the shared datastore (HA; off until enabled
        # with `ferry cluster ha --enable`, but leases are kept from the start).
        ha_datastore="shared", fault_hooks=config.fault_hooks)


def start_agent(config: LabConfig, host: str) -> int:
    """Start a host's agent; a host not enrolled yet gets a fresh one-time join token."""
    cfg_path = config.host_dir(host) / "agent.json"
    token = None
    if not HostTls(config.host_tls_dir(host)).enrolled():
        token = join_tokens(_db_url(config), (host,))[host]
    # 0600: the join token is a secret until the agent has spent it.
    write_private(cfg_path, agent_config(config, host, token).model_dump_json(indent=2)
                  .encode())
    argv = ["ip", "netns", "exec", config.netns(host), sys.executable, "-m",
            "ferry.agent.main", "--config", str(cfg_path)]
    return _spawn(argv, config.logs_dir / f"agent-{host}.log", _pidfile(config, f"agent-{host}"))


def _db_url(config: LabConfig) -> str:
    if config.db_url:
        return config.db_url
    if config.db == "postgresql":
        # The server runs as the postgres user: it must be able to pass through the lab
        # directory to its own (search only: o+x, the lab's files stay unreadable).
        config.directory.chmod(config.directory.stat().st_mode | 0o001)
        try:
            return postgres.ensure_database(postgres.ensure_server(config.postgres_dir),
                                            "ferry")
        except postgres.PostgresMissing as exc:
            raise LabError(f"--db postgresql: {exc}") from None
    return sqlite_url(str(config.db_file))


def init_trust(config: LabConfig) -> str | None:
    """The lab's CA, control plane certificate and admin token (kept 0600 in the lab
    directory for the CLI); returns the admin token when made now."""
    return init_cluster(_db_url(config), ControlPki(config.pki_dir), (config.bridge_ip,),
                        config.admin_token_file)


def _control_name(index: int) -> str:
    """The pid and log file name of the index-th replica ("control" for the first, as
    a lab of one control plane always had)."""
    return "control" if index == 0 else f"control{index + 1}"


def start_control(config: LabConfig, index: int = 0) -> int:
    argv = [sys.executable, "-m", "ferry.cli.main", "server",
            "--db", _db_url(config), "--pki", str(config.pki_dir),
            "--lab-dir", str(config.directory), "--replica-id", config.replica_id(index),
            "--listen", config.bridge_ip, "--port", str(config.control_port + index)]
    name = _control_name(index)
    return _spawn(argv, config.logs_dir / f"{name}.log", _pidfile(config, name))


def control_pid(config: LabConfig, index: int = 0) -> int | None:
    return _alive_pid(_pidfile(config, _control_name(index)))


def kill_pid(pid: int, grace_s: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def agent_pid(config: LabConfig, host: str) -> int | None:
    return _alive_pid(_pidfile(config, f"agent-{host}"))


def stop_agent(config: LabConfig, host: str) -> None:
    pid = _alive_pid(_pidfile(config, f"agent-{host}"))
    if pid is not None:
        # `ip netns exec` execs the agent, so this pid is the agent itself.
        kill_pid(pid)


def stop_control(config: LabConfig, index: int | None = None) -> None:
    """Stop the index-th replica, or every one (None)."""
    for i in range(config.control_planes) if index is None else (index,):
        pid = control_pid(config, i)
        if pid is not None:
            kill_pid(pid)


def processes_of(directory: Path) -> list[tuple[int, str]]:
    """(pid, argv0) of every process whose command line names the lab directory."""
    mark = str(directory).encode()
    mine = {os.getpid(), os.getppid()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if mark in cmdline:
            found.append((int(entry.name), cmdline.split(b"\0")[0].decode(errors="replace")))
    return found


def _http(config: LabConfig, timeout_s: float = 30.0, url: str | None = None
          ) -> httpx.Client:
    token = config.admin_token_file.read_text().strip()
    return httpx.Client(base_url=url or config.control_url, timeout=timeout_s,
                        trust_env=False, verify=client_context(config.ca_file),
                        headers={"authorization": f"Bearer {token}"})


def leader_url(config: LabConfig, timeout_s: float = 60.0) -> str:
    """The URL of the replica that leads (the lab's changes go there); waits, bounded,
    while none does (a term of a replica killed earlier still running out)."""
    if config.control_planes == 1:
        return config.control_url
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for url in config.control_urls:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError), \
                    _http(config, 2.0, url) as http:
                if http.get("/v1/cluster/leader").json()["leading"]:
                    return url
        time.sleep(0.5)
    raise LabError(f"no control-plane replica leads after {timeout_s:.0f} s; see the logs "
                   f"in {config.logs_dir}")


def wait_registered(config: LabConfig, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    want = {h.name for h in config.hosts}
    last = "control plane not answering"
    with _http(config, timeout_s=2.0) as http:
        while time.monotonic() < deadline:
            try:
                hosts = http.get("/v1/hosts").json()
                ready = {h["name"] for h in hosts if h["state"] == "connected"}
                if want <= ready:
                    return
                last = f"waiting for hosts {sorted(want - ready)}"
            except (httpx.HTTPError, ValueError) as exc:
                last = f"control plane not answering: {exc}"
            time.sleep(0.2)
    raise LabError(f"lab did not come up within {timeout_s:.0f} s ({last}); "
                   f"see the logs in {config.logs_dir}")


def ensure_power(config: LabConfig) -> None:
    """Every lab host's power driver is the lab's (no process of it = powered off); a
    host left in standby by an earlier run is up again now."""
    with _http(config, url=leader_url(config)) as http:
        for host in config.hosts:
            resp = http.put(f"/v1/hosts/{host.name}/power", json={"driver": "lab"})
            if resp.status_code >= 400:
                raise LabError(f"power driver of {host.name}: HTTP {resp.status_code} "
                               f"{resp.text}")
            if http.get(f"/v1/hosts/{host.name}").json().get("standby"):
                http.post(f"/v1/hosts/{host.name}/standby", params={"on": "false"})


def ensure_vm_network(config: LabConfig, timeout_s: float = 60.0) -> None:
    """The lab's VM network (`vmnet`) on every host, and the client machine on it."""
    with _http(config, url=leader_url(config)) as http:
        resp = http.get(f"/v1/networks/{NETWORK}")
        if resp.status_code == 404:
            resp = http.post("/v1/networks", json={"name": NETWORK,
                                                   "vteps": [config.client_ip]})
        deadline = time.monotonic() + timeout_s
        while True:
            if resp.status_code >= 400:
                raise LabError(f"the lab's network {NETWORK}: HTTP {resp.status_code} "
                               f"{resp.text}")
            view = resp.json()
            waiting = {h: s for h, s in view["hosts"].items() if s != "ready"}
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise LabError(f"network {NETWORK} not ready on every host within "
                               f"{timeout_s:.0f} s: {waiting}")
            time.sleep(0.3)
            resp = http.get(f"/v1/networks/{NETWORK}")
    net.join_client(config, view["spec"]["vni"], view["spec"]["mtu"])


def up(config: LabConfig) -> LabStatus:
    """Create what is missing and start what is not running (idempotent)."""
    require_root()
    existing = load(config.directory)
    changed = existing is not None and (existing.hosts, existing.subnet) != (
        config.hosts, config.subnet)
    if changed and existing is not None and (net.exists(existing)
                                             or processes_of(config.directory)):
        raise LabError(f"a lab with {len(existing.hosts)} hosts on {existing.subnet} "
                       f"is running in {config.directory}; it is not changed while it "
                       "runs: run `ferry lab down` first, then `ferry lab up` again")
    for d in (config.directory, config.shared_datastore, config.logs_dir):
        d.mkdir(parents=True, exist_ok=True)
    for host in config.hosts:
        config.local_datastore(host.name).mkdir(parents=True, exist_ok=True)
    config.config_file.write_text(config.model_dump_json(indent=2))
    install_guest_image(config)
    new_token = None
    try:
        new_token = init_trust(config)
        mount_small_datastore(config)
        net.create(config)
        for i in range(config.control_planes):
            if control_pid(config, i) is None:
                start_control(config, i)
        for host in config.hosts:
            if _alive_pid(_pidfile(config, f"agent-{host.name}")) is None:
                start_agent(config, host.name)
        wait_registered(config)
        ensure_vm_network(config)
        ensure_power(config)
    except Exception:
        down(config)
        raise
    return replace(status(config), new_admin_token=new_token)


def down(config: LabConfig) -> list[str]:
    """Stop everything of the lab and remove its network; returns what was removed."""
    removed = []
    stop_control(config)
    for host in config.hosts:
        stop_agent(config, host.name)
    # Before the sweep below (its processes name the lab directory): a clean stop.
    if postgres.stop_server(config.postgres_dir):
        removed.append("the lab's PostgreSQL server (its data kept)")
    for pid, argv0 in processes_of(config.directory):
        kill_pid(pid, grace_s=2.0)
        removed.append(f"process {pid} ({Path(argv0).name})")
    removed += [f"mount {m}" for m in unmount_all(config.directory)]
    if net.exists(config):
        removed.append(f"bridge {config.bridge}")
    net.destroy(config)
    for pidfile in (config.directory / "run").glob("*.pid"):
        pidfile.unlink(missing_ok=True)
    for host in config.hosts:
        shutil.rmtree(config.host_dir(host.name) / "run", ignore_errors=True)
    return removed


def status(config: LabConfig) -> LabStatus:
    qemus = [pid for pid, argv0 in processes_of(config.directory) if "qemu" in argv0]
    return LabStatus(
        config=config, network_up=net.exists(config),
        control_pid=control_pid(config),
        replica_pids=tuple(control_pid(config, i) for i in range(config.control_planes)),
        agent_pids={h.name: _alive_pid(_pidfile(config, f"agent-{h.name}"))
                    for h in config.hosts},
        qemu_pids=qemus)


def mount_small_datastore(config: LabConfig) -> None:
    """A tmpfs of small_datastore_mib: a datastore that really runs out of space."""
    if not config.small_datastore_mib:
        return
    path = config.small_datastore
    path.mkdir(parents=True, exist_ok=True)
    if str(path) in _mounts():
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={config.small_datastore_mib}m",
                    "ferry-small", str(path)], check=True, capture_output=True, timeout=30)


def _mounts() -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f]


def unmount_all(directory: Path) -> list[str]:
    """Unmount everything mounted under the lab directory (deepest first)."""
    inside = sorted((m for m in _mounts() if m.startswith(f"{directory}/")), reverse=True)
    for mount in inside:
        subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)
    return inside
