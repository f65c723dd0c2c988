"""`ferry`: hosts, VMs, migrations and the lab, from the command line."""

from __future__ import annotations

import functools
import ipaddress
import random
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from ferry.cli import (
    drs_cmd,
    events_cmd,
    ha_cmd,
    lab_cmd,
    migrate_cmd,
    network_cmd,
    policy_cmd,
    relocate_cmd,
    schedule_cmd,
    trust_cmd,
)
from ferry.cli.client import Client, connect
from ferry.cli.output import console, heartbeat_text, print_error, print_json, table
from ferry.domain.errors import FerryError, InvalidInput
from ferry.domain.specs import DiskCache, DiskFormat
from ferry.domain.units import parse_size
from ferry.lab.config import DEFAULT_LAB_DIR, NETWORK, LabConfig, load
from ferry.pki import ControlPki

app = typer.Typer(help="Ferry: live migration, and what builds on it, for QEMU/KVM hosts.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
host_app = typer.Typer(help="Hosts of the cluster.", no_args_is_help=True)
vm_app = typer.Typer(help="Virtual machines: create, power, inspect, migrate.",
                     no_args_is_help=True)
app.add_typer(host_app, name="host")
app.add_typer(vm_app, name="vm")
app.add_typer(lab_cmd.app, name="lab")
app.add_typer(migrate_cmd.migration_app, name="migration")
app.add_typer(policy_cmd.app, name="policy")
app.add_typer(relocate_cmd.relocation_app, name="relocation")
app.add_typer(network_cmd.app, name="network")
app.add_typer(drs_cmd.drs_app, name="drs")
app.add_typer(drs_cmd.rule_app, name="rule")
app.add_typer(ha_cmd.cluster_app, name="cluster")
app.add_typer(schedule_cmd.app, name="schedule")

F = TypeVar("F", bound=Callable[..., Any])
UrlOpt = Annotated[str | None, typer.Option("--url", help="control plane URL "
                                            "(default: $FERRY_URL, else the lab's)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def handle_errors(fn: F) -> F:
    """Every FerryError becomes 'error: ... / fix: ...' and exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FerryError as exc:
            print_error(exc)
            raise typer.Exit(1) from None
        except ValidationError as exc:
            print_error(InvalidInput("; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())))
            raise typer.Exit(2) from None
    return wrapper  # type: ignore[return-value]


migrate_cmd.register(vm_app, handle_errors)
policy_cmd.register(handle_errors)
relocate_cmd.register(vm_app, handle_errors)
trust_cmd.register(app, host_app, handle_errors)
events_cmd.register(app, handle_errors)
network_cmd.register(handle_errors)
drs_cmd.register(host_app, handle_errors)
ha_cmd.register(vm_app, handle_errors)
schedule_cmd.register(handle_errors)
lab_cmd.handle_errors = handle_errors


DB_HELP = ("the store: a SQLite file (a path or sqlite:// URL) or a PostgreSQL database "
           "(postgresql://USER@HOST/DB, or ?host=/run/postgresql for its socket)")


@app.command()
def server(db: Annotated[str, typer.Option(help=DB_HELP)] =
           "sqlite+aiosqlite:///ferry.db",
           listen: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
           port: Annotated[int, typer.Option(help="port to listen on")] = 8700,
           pki: Annotated[Path, typer.Option(help="directory of the cluster CA and the "
                                             "control plane's certificate (created by "
                                             "`ferry init` or here if missing)")] =
           Path("pki"),
           allowed_host: Annotated[list[str] | None, typer.Option(
               help="another name clients may use in the Host header (repeatable)")] = None,
           log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
           lab_dir: Annotated[Path | None, typer.Option(
               help="the lab this control plane serves (its hosts' power driver stops "
                    "and starts their agents)")] = None,
           replica_id: Annotated[str | None, typer.Option(
               help="this replica's name in the leader lease (default: the machine's "
                    "name; give each replica on one machine its own)")] = None,
           ) -> None:
    """Run the control plane over TLS (REST API at /v1, OpenAPI at /docs)."""
    from ferry.api.main import run
    run(db, listen, port, pki, tuple(allowed_host or ()), log_level, lab_dir, replica_id)


@app.command()
@handle_errors
def init(db: Annotated[str, typer.Option(help=DB_HELP)] =
         "sqlite+aiosqlite:///ferry.db",
         pki: Annotated[Path, typer.Option(help="directory for the cluster CA")] =
         Path("pki"),
         address: Annotated[list[str] | None, typer.Option(
             help="address the control plane listens on (repeatable; in its certificate)")
         ] = None,
         token_file: Annotated[Path | None, typer.Option(
             help="also write the admin token to this file (0600)")] = None) -> None:
    """Create a cluster: its CA, the control plane's certificate and a first admin token.

    The token is printed once; only its hash is stored."""
    from ferry.control.bootstrap import init_cluster
    token = init_cluster(db, ControlPki(pki), tuple(address or ()), token_file)
    if token is None:
        console.print(f"the cluster in {pki} already exists; nothing changed")
        return
    console.print(f"cluster CA in {pki}; admin token (shown once, keep it secret):")
    console.print(token, markup=False, highlight=False)


# --- hosts ------------------------------------------------------------------------
@host_app.command("list")
@handle_errors
def host_list(url: UrlOpt = None, json_out: JsonOpt = False) -> None:
    """Hosts with their state, capacity and what is allotted."""
    client = connect(url)
    hosts = client.call("GET", "/v1/hosts")
    vms = client.call("GET", "/v1/vms")
    if json_out:
        print_json(hosts)
        return
    rows = []
    for h in hosts:
        facts = h.get("facts") or {}
        mine = [v for v in vms if v["host"] == h["name"] and v["state"] != "defined"]
        rows.append([h["name"], h["state"], facts.get("address"), facts.get("accel"),
                     f"{sum(v['spec']['vcpus'] for v in mine)}/{facts.get('cpus')}",
                     f"{sum(v['spec']['memory_mib'] for v in mine)}/{facts.get('memory_mib')}",
                     ", ".join(d["name"] for d in facts.get("datastores", [])),
                     len(mine)])
    table("Hosts", ["host", "state", "address", "accel", "vCPUs used/cap",
                    "MiB used/cap", "datastores", "VMs"], rows)


# --- VMs --------------------------------------------------------------------------
def random_mac() -> str:
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


def parse_disk(text: str) -> dict[str, Any]:
    """NAME=DATASTORE:PATH[:FORMAT[:CACHE]]"""
    name, _, rest = text.partition("=")
    parts = rest.split(":")
    if not name or len(parts) not in (2, 3, 4):
        raise InvalidInput(f"--disk {text!r} is not NAME=DATASTORE:PATH[:FORMAT[:CACHE]]",
                           "e.g. --disk root=shared:images/web1.qcow2 or "
                           "--disk root=shared:web1.raw:raw:writeback")
    disk = {"name": name, "datastore": parts[0], "path": parts[1],
            "format": parts[2] if len(parts) >= 3 else DiskFormat.QCOW2.value}
    if len(parts) == 4:
        caches = [c.value for c in DiskCache]
        if parts[3] not in caches:
            raise InvalidInput(f"--disk {text!r}: cache {parts[3]!r} is not one of "
                               f"{', '.join(caches)}",
                               "none (O_DIRECT, the default) or writeback (host page cache)")
        disk["cache"] = parts[3]
    return disk


def check_ip(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise InvalidInput(f"--ip {value!r} is not an IPv4 address",
                           "give one like 198.19.210.10") from None


def next_free_ip(client: Client, lab: LabConfig) -> str:
    """The lowest lab VM address no VM's kernel line claims (ip=...)."""
    used = set()
    for vm in client.call("GET", "/v1/vms"):
        for arg in ((vm["spec"].get("kernel") or {}).get("append") or "").split():
            if arg.startswith("ip="):
                used.add(arg[3:].split("/")[0].split(":")[0])
    for index in range(240):
        if lab.vm_ip(index) not in used:
            return lab.vm_ip(index)
    raise InvalidInput(f"every address of the lab's VM subnet {lab.vm_subnet} is taken",
                       "give --ip, or delete VMs")


@vm_app.command("create")
@handle_errors
def vm_create(
    name: Annotated[str, typer.Argument(help="VM name: lowercase letters, digits, '-'")],
    host: Annotated[str | None, typer.Option(help="host to place it on (default: first "
                                             "host with room)")] = None,
    memory: Annotated[str, typer.Option(help="memory, e.g. 256 (MiB) or 1GiB")] = "256",
    vcpus: Annotated[int, typer.Option(help="virtual CPUs")] = 1,
    cpu_model: Annotated[str, typer.Option(help="QEMU CPU model")] = "Nehalem",
    machine: Annotated[str, typer.Option(help="machine type (an alias is pinned to "
                                         "its versioned type)")] = "pc",
    kernel: Annotated[str | None, typer.Option(help="kernel to boot directly")] = None,
    initrd: Annotated[str | None, typer.Option(help="initrd for --kernel")] = None,
    append: Annotated[str, typer.Option(help="kernel command line")] = "",
    disk: Annotated[list[str] | None, typer.Option(
        help="NAME=DATASTORE:PATH[:qcow2|raw[:none|writeback]], repeatable; the first "
             "boots if no kernel; cache none (O_DIRECT) is the default")
    ] = None,
    nic: Annotated[list[str] | None, typer.Option(
        help="NETWORK or NETWORK=MAC, repeatable; `user` is QEMU user-mode networking "
             "(no bridge, reachable by nobody); the probe's default is the lab's vmnet")
    ] = None,
    ip: Annotated[str | None, typer.Option(
        help="the probe guest's static address on its network (kernel ip=ADDR/PREFIX); "
             "default: the next free one of the lab's VM subnet")] = None,
    probe: Annotated[bool, typer.Option(help="boot the lab's probe guest")] = False,
    probe_mib: Annotated[int, typer.Option(help="memory the probe fills and checks")] = 64,
    dirty_rate: Annotated[int, typer.Option(help="MiB/s the probe rewrites")] = 0,
    start: Annotated[bool, typer.Option(help="power it on")] = True,
    url: UrlOpt = None, json_out: JsonOpt = False,
) -> None:
    """Create a VM (and power it on). Boot a kernel, a disk, or the lab's --probe guest."""
    memory_mib = parse_size(memory, "mib") // (1 << 20)
    if ip and not probe:
        raise InvalidInput("--ip sets the probe guest's address", "use it with --probe, or "
                           "give your own guest its address on its kernel command line")
    spec: dict[str, Any] = {"name": name, "vcpus": vcpus, "memory_mib": memory_mib,
                            "cpu_model": cpu_model, "machine": machine,
                            "disks": [parse_disk(d) for d in disk or []], "nics": []}
    for i, n in enumerate(nic or []):
        network, _, mac = n.partition("=")
        spec["nics"].append({"name": f"nic{i}", "network": network, "mac": mac or random_mac()})
    if probe:
        if kernel:
            raise InvalidInput("--probe and --kernel exclude each other", "give one of them")
        if probe_mib + 72 > memory_mib:
            raise InvalidInput(f"--probe-mib {probe_mib} needs at least {probe_mib + 72} MiB "
                               f"of VM memory, --memory is {memory_mib}",
                               "raise --memory or lower --probe-mib")
        lab = load(DEFAULT_LAB_DIR)
        if lab is None:
            raise InvalidInput("--probe needs the lab's guest image and no lab is set up",
                               "run `ferry lab up`, or boot your own --kernel/--initrd")
        kernel = str(lab.images_dir / "vmlinuz")
        initrd = str(lab.images_dir / "initrd.img")
        if not nic:
            spec["nics"].append({"name": "nic0", "network": NETWORK, "mac": random_mac()})
        if spec["nics"][0]["network"] != "user":
            address = check_ip(ip) if ip else next_free_ip(connect(url), lab)
            append = f"ip={address}/{lab.vm_subnet.prefixlen} {append}"
        elif ip:
            raise InvalidInput(f"--ip {ip} cannot be used with --nic user: a user-mode "
                               "NIC is reachable by nobody", "leave out --ip, or put the "
                               "probe on a VM network (--nic vmnet)")
        append = (f"console=ttyS0 quiet panic=-1 ferry.probe_mib={probe_mib} "
                  f"ferry.dirty_mib_s={dirty_rate} {append}").strip()
    if kernel:
        spec["kernel"] = {"kernel": kernel, "initrd": initrd, "append": append}
    view = connect(url).call("POST", "/v1/vms",
                                         {"spec": spec, "host": host, "start": start})
    if json_out:
        print_json(view)
    else:
        console.print(f"VM [bold]{name}[/] created on {view['host']}: {view['state']}")


@vm_app.command("list")
@handle_errors
def vm_list(url: UrlOpt = None, json_out: JsonOpt = False) -> None:
    """VMs with their host, state and latest probe heartbeat."""
    vms = connect(url).call("GET", "/v1/vms")
    if json_out:
        print_json(vms)
        return
    table("VMs", ["VM", "host", "state", "vCPUs", "MiB", "CPU model", "heartbeat"],
          [[v["spec"]["name"], v["host"], v["state"], v["spec"]["vcpus"],
            v["spec"]["memory_mib"], v["spec"]["cpu_model"],
            heartbeat_text((v.get("live") or {}).get("heartbeat"))] for v in vms])


@vm_app.command("show")
@handle_errors
def vm_show(name: str, url: UrlOpt = None, json_out: JsonOpt = False) -> None:
    """One VM: spec, where it runs, its QEMU state and probe heartbeat."""
    v = connect(url).call("GET", f"/v1/vms/{name}")
    if json_out:
        print_json(v)
        return
    live = v.get("live") or {}
    spec = v["spec"]
    rows = [["host", v["host"]], ["state", v["state"]], ["QEMU", live.get("state", "-")],
            ["pid", live.get("pid")], ["uuid", spec["uuid"]], ["vCPUs", spec["vcpus"]],
            ["memory MiB", spec["memory_mib"]], ["CPU model", spec["cpu_model"]],
            ["machine", spec["machine"]],
            ["disks", ", ".join(f"{d['name']}={d['datastore']}:{d['path']}"
                                for d in spec["disks"]) or "-"],
            ["NICs", ", ".join(f"{n['name']}={n['network']}/{n['mac']}"
                               for n in spec["nics"]) or "-"],
            ["heartbeat", heartbeat_text(live.get("heartbeat"))]]
    table(f"VM {name}", ["", ""], rows)


@vm_app.command("start")
@handle_errors
def vm_start(name: str, url: UrlOpt = None) -> None:
    """Power a VM on, on its host."""
    v = connect(url).call("POST", f"/v1/vms/{name}/start")
    console.print(f"VM {name} on {v['host']}: {v['state']}")


@vm_app.command("stop")
@handle_errors
def vm_stop(name: str, force: Annotated[bool, typer.Option(
        help="power off at once instead of an ACPI shutdown first")] = False,
        url: UrlOpt = None) -> None:
    """Shut a VM down (ACPI, then power off after 30 s; --force at once)."""
    connect(url, timeout_s=120).call("POST", f"/v1/vms/{name}/stop", force=force)
    console.print(f"VM {name} stopped")


@vm_app.command("delete")
@handle_errors
def vm_delete(name: str, url: UrlOpt = None) -> None:
    """Remove a stopped VM from the inventory (its disk images stay)."""
    connect(url).call("DELETE", f"/v1/vms/{name}")
    console.print(f"VM {name} deleted")


@vm_app.command("serial")
@handle_errors
def vm_serial(name: str, lines: int = 20, url: UrlOpt = None) -> None:
    """The last lines of the VM's serial console."""
    out = connect(url).call("GET", f"/v1/vms/{name}/serial", lines=lines)
    for line in out["lines"]:
        print(line)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
