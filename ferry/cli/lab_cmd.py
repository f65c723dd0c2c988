"""`ferry lab up|down|status|link`: the local cluster of namespaces (needs root)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ferry.cli.output import console, print_error, table
from ferry.domain.errors import FerryError
from ferry.domain.units import parse_rate
from ferry.lab import cluster, net
from ferry.lab.config import DEFAULT_LAB_DIR, LabConfig, config_for_up, load

app = typer.Typer(help="A local cluster: hosts as network namespaces on a bridge.",
                  no_args_is_help=True)
handle_errors: Callable[..., Any] | None = None  # set by ferry.cli.main

DirOpt = Annotated[Path, typer.Option("--lab-dir", help="where the lab keeps its state "
                                      "(default: $FERRY_LAB_DIR or /var/lib/ferry/lab)")]


def _fail(message: str) -> None:
    print_error(FerryError(message))
    raise typer.Exit(1)


def _config(lab_dir: Path) -> LabConfig:
    config = load(lab_dir)
    if config is None:
        _fail(f"no lab in {lab_dir}; create one with `ferry lab up`")
    assert config is not None
    return config


@app.command()
def up(hosts: Annotated[int | None, typer.Option(
           help="number of hosts (new lab: 3)", min=1, max=32)] = None,
       cpus: Annotated[int | None, typer.Option(
           "--host-cpus", "--cpus",
           help="declared CPUs per host, DRS's capacity (new lab: 4)", min=1)] = None,
       memory: Annotated[int | None, typer.Option(
           "--host-memory", "--memory",
           help="declared MiB per host, DRS's capacity (new lab: 2048)", min=64)] = None,
       subnet: Annotated[str | None, typer.Option(
           help="IPv4 network of the lab bridge (new lab: 198.18.210.0/24, a range "
                "reserved for test networks)")] = None,
       control_planes: Annotated[int | None, typer.Option(
           "--control-planes", min=1, max=3,
           help="control-plane replicas sharing the store: one leads, the others stand "
                "by and take over when it dies (new lab: 1)")] = None,
       db: Annotated[str | None, typer.Option(
           "--db", help="the control plane's store: sqlite (a file in the lab directory) "
                        "or postgresql (a private server the lab starts in its directory); "
                        "new lab: sqlite")] = None,
       lab_dir: DirOpt = DEFAULT_LAB_DIR) -> None:
    """Create the hosts, agents, control plane(s), VM network vmnet and client machine.

    The VM network spans the hosts over VXLAN; the client machine is the namespace
    <prefix>-client on that network, an "outside" machine from which `ferry lab demo`
    and the benchmarks measure a migration as a client sees it."""
    try:
        config = config_for_up(lab_dir, load(lab_dir), hosts, cpus, memory, subnet,
                               control_planes, db)
    except FerryError as exc:
        print_error(exc)
        raise typer.Exit(1) from None
    began = time.monotonic()
    try:
        st = cluster.up(config)
    except (cluster.LabError, net.LabCommandError) as exc:
        _fail(str(exc))
        return
    planes = (f"control plane at {config.control_url}" if config.control_planes == 1 else
              f"{config.control_planes} control planes at {', '.join(config.control_urls)}")
    console.print(f"lab up in {time.monotonic() - began:.1f} s: {len(st.config.hosts)} hosts, "
                  f"{planes}, {config.db if not config.db_url else 'given'} store")
    if st.new_admin_token:
        console.print(f"admin token (kept 0600 in {config.admin_token_file}, where the CLI "
                      "finds it):")
        console.print(st.new_admin_token, markup=False, highlight=False)
    if not cluster.install_guest_image(config):
        console.print(f"[yellow]note:[/] no probe guest image in {cluster.GUEST_DIR}; "
                      "build it with `make guest` to use `ferry vm create --probe`")


@app.command()
def down(lab_dir: DirOpt = DEFAULT_LAB_DIR) -> None:
    """Stop every VM, agent and the control plane; remove namespaces and the bridge."""
    try:
        cluster.require_root()
    except cluster.LabError as exc:
        _fail(str(exc))
    removed = cluster.down(_config(lab_dir))
    console.print("lab down" + (f": removed {', '.join(removed)}" if removed else ""))


@app.command()
def status(lab_dir: DirOpt = DEFAULT_LAB_DIR) -> None:
    """What of the lab is running."""
    st = cluster.status(_config(lab_dir))
    rows: list[list[Any]] = [["network", "up" if st.network_up else "down"]]
    if st.config.control_planes == 1:
        rows.append(["control plane", st.control_pid or "not running"])
    else:
        rows += [[f"control plane {st.config.replica_id(i)}", pid or "not running"]
                 for i, pid in enumerate(st.replica_pids)]
    rows.append(["store", st.config.db if not st.config.db_url else "given URL"])
    rows += [[f"agent {h}", pid or "not running"] for h, pid in st.agent_pids.items()]
    rows.append(["QEMU processes", len(st.qemu_pids)])
    table(f"Lab {st.config.directory}", ["part", "pid / state"], rows)


@app.command()
def link(host: str,
         state: Annotated[str | None, typer.Argument(help="up or down (cut the link)")] = None,
         rate: Annotated[str | None, typer.Option(
             help="limit the host's link both ways, e.g. 200mbit or 25MiB; 'none' lifts it")
         ] = None,
         lab_dir: DirOpt = DEFAULT_LAB_DIR) -> None:
    """Cut or restore a host's network link, or shape its bandwidth (tc tbf)."""
    if state not in (None, "up", "down"):
        _fail(f"link state {state!r} is neither up nor down")
    if state is None and rate is None:
        _fail("nothing to do: give up/down and/or --rate")
    config = _config(lab_dir)
    if host not in [h.name for h in config.hosts]:
        _fail(f"the lab has no host {host!r}; it has {', '.join(h.name for h in config.hosts)}")
    if rate is not None:
        try:
            bits = None if rate == "none" else parse_rate(rate) * 8
        except FerryError as exc:
            print_error(exc)
            raise typer.Exit(1) from None
        net.shape(config, host, bits)
        console.print(f"link of {host}: " + (f"{bits / 1e6:.0f} Mbit/s each way" if bits
                                             else "unlimited"))
    if state is not None:
        net.set_link(config, host, state == "up")
        console.print(f"link of {host} {state}")


@app.command()
def demo(lab_dir: DirOpt = DEFAULT_LAB_DIR) -> None:
    """Bring up a 3-host lab, boot a probe VM on host1, migrate it to host2 and host3."""
    from ferry.cli.demo import run_demo

    try:
        cluster.require_root()
        run_demo(load(lab_dir) or LabConfig.default(lab_dir, 3))
    except (cluster.LabError, net.LabCommandError) as exc:
        _fail(str(exc))
    except FerryError as exc:
        print_error(exc)
        raise typer.Exit(1) from None
