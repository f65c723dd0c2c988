"""Bad input, fuzzed: schemathesis against the OpenAPI of the real control plane and of a
real agent in the lab (issue 9).

Properties:
- no generated request gets a 5xx, whether sent with the admin token (control plane)
  or the control plane's certificate (agent);
- a refused request changes nothing: the inventory (VMs, hosts, migrations, relocations,
  policy, tokens), the QEMU processes of every host and the files of every datastore
  are the same before and after the refused requests (and after the admin's fuzzing).

The lab is shared by the whole suite, so nothing here may change it: requests that
would act for real with valid input (create, stop, delete, migrate, revoke, change the
policy) are sent only with invalid input (negative cases, and only those the server's
own models refuse too) or with names of things that do not exist; existing names are
used only with operations that read. Examples per operation are bounded and the
generation derandomized, so a run is repeatable and takes a few minutes.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from pydantic import BaseModel, ValidationError
from schemathesis import Case, GenerationMode
from schemathesis.generation.drivers import CoverageGenerator
from schemathesis.generation.feedback import FeedbackSources
from schemathesis.generation.overrides import Override
from schemathesis.schemas import APIOperation, BaseSchema

from ferry.agent.models import ApplyNetworks, CreateVm, ImageRef, PrepareIncoming
from ferry.api.schemas import (
    CreateNetworkRequest,
    CreateVmRequest,
    JoinTokenRequest,
    TokenRequest,
)
from ferry.cli.client import Client
from ferry.cli.demo import probe_spec
from ferry.control.migration import merge_options
from ferry.domain.errors import FerryError
from ferry.domain.migration import StreamOptions
from ferry.domain.streams import migration_endpoint, nbd_endpoint
from ferry.lab import cluster
from ferry.lab.config import LabConfig
from ferry.pki import ControlPki, HostTls
from ferry.pki.layout import client_context
from ferry.wire import status_for
from tests.integration.helpers import boot_probe, remove_vm

# Per operation and generation mode. A deeper run: FERRY_FUZZ_EXAMPLES=200, and
# FERRY_FUZZ_RANDOM=1 for other examples than the repeatable ones.
MAX_EXAMPLES = int(os.environ.get("FERRY_FUZZ_EXAMPLES", "12"))
DERANDOMIZE = not os.environ.get("FERRY_FUZZ_RANDOM")
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
BOTH = (POSITIVE, NEGATIVE)
FUZZ_VM = "fz-run"  # a running probe on host1: existing names for operations that read
AGENT_HOST = "host1"

# Bodies the server would accept and act on (create a VM or token, change the policy):
# their negative cases are sent only when the server's own model refuses them too
# (pydantic is laxer than the schema in places, e.g. "5" for an integer).
_CONTROL_MODELS: dict[str, type[BaseModel]] = {
    "POST /v1/vms": CreateVmRequest,
    "POST /v1/tokens": TokenRequest,
    "POST /v1/join-tokens": JoinTokenRequest,
    "POST /v1/networks": CreateNetworkRequest,
}
_AGENT_MODELS: dict[str, type[BaseModel]] = {
    "POST /v1/vms": CreateVm,
    "POST /v1/incoming": PrepareIncoming,
    "POST /v1/images/delete": ImageRef,
    "PUT /v1/networks": ApplyNetworks,
}


# --- what must not change ------------------------------------------------------------
def snapshot(client: Client, lab: LabConfig) -> dict[str, Any]:
    """The state a refused request must leave as it was (live data such as heartbeats
    and usage left out: they change by themselves)."""
    vms = sorted((v["spec"]["name"], v["host"], v["state"],
                  json.dumps(v["spec"], sort_keys=True))
                 for v in client.call("GET", "/v1/vms"))
    hosts = sorted((h["name"], h["url"], h["maintenance"])
                   for h in client.call("GET", "/v1/hosts"))
    migrations = sorted((m["id"], m["vm"], m["phase"])
                        for m in client.call("GET", "/v1/migrations"))
    relocations = sorted((r["id"], r["vm"], r["phase"])
                         for r in client.call("GET", "/v1/relocations"))
    tokens = sorted(json.dumps(t, sort_keys=True) for t in client.call("GET", "/v1/tokens"))
    networks = sorted(json.dumps(n["spec"], sort_keys=True)
                      for n in client.call("GET", "/v1/networks"))
    qemu = {h.name: sorted(pid for pid, argv0 in cluster.processes_of(lab.host_dir(h.name))
                           if argv0.endswith("qemu-system-x86_64"))
            for h in lab.hosts}
    root = lab.directory / "datastores"
    # .ferry/ is HA's bookkeeping (host heartbeats, and a VM's lease record, kept
    # released after the VM is deleted): not user data a request could have changed.
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                   if p.is_file() and ".ferry" not in p.relative_to(root).parts)
    return {"vms": vms, "hosts": hosts, "migrations": migrations,
            "relocations": relocations, "policy": client.call("GET", "/v1/policy"),
            "tokens": tokens, "networks": networks, "qemu": qemu, "files": files}


def settled_snapshot(client: Client, lab: LabConfig) -> dict[str, Any]:
    """A snapshot the control plane itself is not about to change: two taken more than
    two reconcile rounds apart (control/reconcile.py) agree, so a state an earlier test
    left behind is settled before the fuzzing starts."""
    deadline = time.monotonic() + 90
    last = snapshot(client, lab)
    while time.monotonic() < deadline:
        time.sleep(5)
        now = snapshot(client, lab)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the lab did not settle before fuzzing: {last}")


def assert_unchanged(before: dict[str, Any], after: dict[str, Any], what: str) -> None:
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"{what} changed state: {changed}"


# --- the fuzzer ------------------------------------------------------------------------
@dataclass
class Caller:
    """Who sends the generated requests, and how."""

    base_url: str
    ca: Path
    cert: tuple[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    session: requests.Session = field(default_factory=requests.Session)

    def send(self, case: Case) -> requests.Response:
        extra: dict[str, Any] = {"cert": self.cert} if self.cert else {}
        response = case.call(base_url=self.base_url, session=self.session,
                             headers=self.headers, verify=str(self.ca), timeout=60, **extra)
        return response  # type: ignore[no-any-return]


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    statuses: collections.Counter[tuple[str, str, int]] = field(
        default_factory=collections.Counter)
    seconds: collections.Counter[str] = field(default_factory=collections.Counter)
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)

    def sent(self) -> int:
        return sum(self.statuses.values())


Judge = Callable[[APIOperation, Case, requests.Response], str | None]
Skip = Callable[[APIOperation, Case], str | None]


def no_server_error(_: APIOperation, __: Case, response: requests.Response) -> str | None:
    if response.status_code >= 500:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    return None


def refused(_: APIOperation, __: Case, response: requests.Response) -> str | None:
    if response.status_code not in (400, 401, 403, 405, 422):
        return f"not refused: HTTP {response.status_code}: {response.text[:300]}"
    return None


def label(op: APIOperation) -> str:
    return f"{op.method.upper()} {op.path}"


def fuzz(op: APIOperation, modes: tuple[GenerationMode, ...], caller: Caller,
         found: Findings, judge: Judge = no_server_error, skip: Skip | None = None,
         path_parameters: dict[str, str] | None = None, query: dict[str, str] | None = None,
         max_examples: int = MAX_EXAMPLES, coverage: bool = True) -> None:
    """Send schemathesis' coverage cases (boundaries, wrong types, missing and unknown
    fields: deterministic) and up to max_examples generated requests per mode; record
    what the judge and transport errors say (no shrinking: findings are as sent)."""
    fixed = {k: v for k, v in (path_parameters or {}).items() if f"{{{k}}}" in op.path}
    began = time.monotonic()

    def send(case: Case, mode: str) -> None:
        reason = skip(op, case) if skip else None
        if reason is not None:
            found.skipped[reason] += 1
            return
        try:
            response = caller.send(case)
        except requests.RequestException as exc:
            found.problems.append(f"{label(op)} [{mode}]: {exc!r}\n  "
                                  + case.as_curl_command(base_url=caller.base_url))
            return
        found.statuses[(label(op), mode, response.status_code)] += 1
        problem = judge(op, case, response)
        if problem is not None:
            found.problems.append(f"{label(op)} [{mode}]: {problem}\n  "
                                  + case.as_curl_command(base_url=caller.base_url))

    if coverage:
        for case in CoverageGenerator(
                operation=op, generation_modes=list(modes), auth_storage=None,
                generation_config=op.schema.config.generation_for(operation=op),
                override=Override(path_parameters=fixed, query=query or {}),
                feedback=FeedbackSources()):
            send(case, "coverage")
    for mode in modes:
        with contextlib.suppress(Unsatisfiable):  # no case of this mode exists
            _generated(op, mode, fixed, query, max_examples, send)()
    found.seconds[label(op)] += time.monotonic() - began


def _generated(op: APIOperation, mode: GenerationMode, fixed: dict[str, str],
               query: dict[str, str] | None, max_examples: int,
               send: Callable[[Case, str], None]) -> Callable[[], None]:
    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=DERANDOMIZE,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode, path_parameters=fixed or None,
                               query=query))
    def one(case: Case) -> None:
        send(case, mode.value)

    return one  # type: ignore[no-any-return]


def operations(schema: BaseSchema) -> Iterator[APIOperation]:
    for result in schema.get_all_operations():
        yield result.ok()


def load_schema(url: str, verify: Any) -> BaseSchema:
    spec = httpx.get(f"{url}/openapi.json", verify=verify, trust_env=False,
                     timeout=30).json()
    return schemathesis.openapi.from_dict(spec)


def report(found: Findings) -> str:
    lines = [f"{n:4d} x {op} [{mode}] → {status}"
             for (op, mode, status), n in sorted(found.statuses.items())]
    slow = [f"{t:6.1f} s {op}" for op, t in found.seconds.most_common(5)]
    skipped = [f"{n:4d} skipped: {why}" for why, n in found.skipped.items()]
    return "\n".join([*found.problems[:20], "--- sent:", *lines, *skipped, "--- slowest:",
                      *slow])


# --- guards: what must never be sent --------------------------------------------------
def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _accepted_by(model: type[BaseModel] | None, body: Any) -> bool:
    if model is None:
        return False
    try:
        model.model_validate(body)
    except ValidationError:
        return False
    return True


def _valid_endpoint(value: Any, parse: Callable[[str], object]) -> bool:
    try:
        parse(str(value))
    except FerryError:
        return False
    return True


@dataclass
class Existing:
    """Names of things the lab has: a request acting on one of them is not sent."""

    names: set[str]
    datastores: set[str]

    def touches(self, case: Case) -> bool:
        params = case.path_parameters or {}
        if any(str(v) in self.names for v in params.values()):
            return True
        body = case.body if isinstance(case.body, dict) else {}
        return any(str(body.get(k)) in self.names for k in ("vm", "name", "host"))


def lab_existing(client: Client, lab: LabConfig) -> Existing:
    names = {v["spec"]["name"] for v in client.call("GET", "/v1/vms")}
    names |= {h["name"] for h in client.call("GET", "/v1/hosts")}
    names |= {m["id"] for m in client.call("GET", "/v1/migrations")}
    names |= {r["id"] for r in client.call("GET", "/v1/relocations")}
    names |= {t["id"] for t in client.call("GET", "/v1/tokens")}
    names |= {n["spec"]["name"] for n in client.call("GET", "/v1/networks")}
    stores = {"shared", "small"} | {f"local-{h.name}" for h in lab.hosts}
    return Existing(names, stores)


# --- the lab's callers -----------------------------------------------------------------
def admin(lab: LabConfig) -> Caller:
    token = lab.admin_token_file.read_text().strip()
    return Caller(lab.control_url, lab.ca_file,
                  headers={"Authorization": f"Bearer {token}"})


def control_plane_cert(lab: LabConfig, host: str = AGENT_HOST) -> Caller:
    pki = ControlPki(lab.pki_dir)
    return Caller(lab.agent_url(host), lab.ca_file, cert=(str(pki.cert), str(pki.key)))


@pytest.fixture
def fuzz_vm(lab: LabConfig, client: Client) -> Iterator[str]:
    boot_probe(client, lab, FUZZ_VM, AGENT_HOST, memory=128, probe_mib=16)
    try:
        yield FUZZ_VM
    finally:
        remove_vm(client, FUZZ_VM)


# --- control plane ---------------------------------------------------------------------
def test_control_plane_api_fuzzed_as_admin(lab: LabConfig, client: Client,
                                           fuzz_vm: str) -> None:
    """The admin token: reads of every kind (existing names included), every write with
    invalid input, writes with valid input only on names that do not exist, and the
    read-only CHECKING of a real VM against real hosts with generated options. No 5xx,
    and the lab is as it was."""
    schema = load_schema(lab.control_url, client_context(lab.ca_file))
    caller = admin(lab)
    existing = lab_existing(client, lab)
    policy = StreamOptions.model_validate(client.call("GET", "/v1/policy"))
    before = settled_snapshot(client, lab)
    found = Findings()

    def skip(op: APIOperation, case: Case) -> str | None:
        key = label(op)
        if op.method.upper() == "GET":
            return None
        if key == "POST /v1/migrations/check":
            return None  # reads: CHECKING touches nothing
        if existing.touches(case):
            return "acts on something that exists"
        if _accepted_by(_CONTROL_MODELS.get(key), case.body):
            return "a body the server would act on"
        if key == "PATCH /v1/policy" and isinstance(case.body, dict):
            try:
                merge_options(policy, case.body)
                return "a policy the server would set"
            except FerryError:
                return None
        return None

    for op in operations(schema):
        key = label(op)
        if op.method.upper() == "GET":
            fuzz(op, BOTH, caller, found)
            if "{name}" in op.path and "/hosts/" not in op.path:
                fuzz(op, BOTH, caller, found, path_parameters={"name": fuzz_vm})
            elif "{name}" in op.path:
                fuzz(op, BOTH, caller, found, path_parameters={"name": AGENT_HOST})
        elif key in _CONTROL_MODELS or key == "PATCH /v1/policy":
            fuzz(op, (NEGATIVE,), caller, found, skip=skip)
        else:
            fuzz(op, BOTH, caller, found, skip=skip)
    # CHECKING of a real VM towards each host, with generated options and datastores.
    check = schema["/v1/migrations/check"]["POST"]
    for target in [h.name for h in lab.hosts]:
        def with_vm(_: APIOperation, case: Case, target: str = target) -> str | None:
            if isinstance(case.body, dict):  # the real VM towards a real host
                case.body.update(vm=fuzz_vm, target=target)
            return None

        fuzz(check, BOTH, caller, found, skip=with_vm)

    print(report(found))
    assert found.sent() > 500, report(found)
    assert not found.problems, report(found)
    assert_unchanged(before, snapshot(client, lab), "fuzzing as admin")


def test_refused_requests_change_nothing(lab: LabConfig, client: Client,
                                         fuzz_vm: str) -> None:
    """A viewer's token on every operation that needs more (names of real things
    included), and no token at all on every operation: each request is refused, and
    nothing in the inventory, on the hosts or on the datastores changed."""
    schema = load_schema(lab.control_url, client_context(lab.ca_file))
    made = client.call("POST", "/v1/tokens", {"name": "fz-viewer", "role": "viewer"})
    try:
        viewer = Caller(lab.control_url, lab.ca_file,
                        headers={"Authorization": f"Bearer {made['token']}"})
        anonymous = Caller(lab.control_url, lab.ca_file)
        before = settled_snapshot(client, lab)
        found = Findings()
        # What a viewer may do (read, create viewer tokens, revoke its own) is not a
        # refused request; everything else is, even on the names of real things.
        allowed = {"POST /v1/tokens", "DELETE /v1/tokens/{token_id}",
                   "POST /v1/migrations/check", "POST /v1/enrol",
                   "POST /v1/agents/heartbeat"}
        real = {"name": fuzz_vm}
        for op in operations(schema):
            if op.method.upper() != "GET" and label(op) not in allowed:
                fuzz(op, BOTH, viewer, found, judge=refused)
                if "{name}" in op.path:
                    fuzz(op, BOTH, viewer, found, judge=refused,
                         path_parameters=real if "/vms/" in op.path else {"name": "host1"})
            if label(op) not in ("POST /v1/enrol", "POST /v1/agents/heartbeat"):
                fuzz(op, (POSITIVE,), anonymous, found, judge=refused, max_examples=4)
        print(report(found))
        assert found.sent() > 300, report(found)
        assert not found.problems, report(found)
        assert_unchanged(before, snapshot(client, lab), "refused requests")
    finally:
        client.call("DELETE", f"/v1/tokens/{made['info']['id']}")


# --- agent -----------------------------------------------------------------------------
# Operations that start, stop or move a QEMU, or create or delete an image, with valid
# input: sent only with names that do not exist on the host (and with URIs and NBD
# addresses that do not parse, so that nothing is ever sent anywhere).
_AGENT_ACTS = {
    "POST /v1/vms/{name}/stop", "POST /v1/vms/{name}/resume", "POST /v1/vms/{name}/migrate",
    "POST /v1/vms/{name}/migration/resume", "POST /v1/vms/{name}/incoming/recover",
    "POST /v1/vms/{name}/mirror", "POST /v1/vms/{name}/mirror/pivot",
    "POST /v1/vms/{name}/mirror/cancel", "POST /v1/vms/{name}/disk-mirrors",
}


_AGENT_WAITS = {"GET /v1/vms/{name}/migration", "GET /v1/vms/{name}/mirror/{job_id}"}


def test_agent_api_fuzzed_with_the_control_planes_certificate(
        lab: LabConfig, client: Client, fuzz_vm: str) -> None:
    """host1's agent, called as the control plane: reads (of a real VM too), harmless
    writes on a real VM (tune, cancel of no migration, progress of no mirror), and
    everything else with invalid input or names that do not exist. No 5xx; the lab as
    it was. Another host's certificate is refused on every operation."""
    pki = ControlPki(lab.pki_dir)
    schema = load_schema(lab.agent_url(AGENT_HOST), client_context(pki.ca_cert, pki.cert,
                                                                   pki.key))
    caller = control_plane_cert(lab)
    existing = lab_existing(client, lab)
    before = settled_snapshot(client, lab)
    found = Findings()

    def skip(op: APIOperation, case: Case) -> str | None:
        key = label(op)
        body = case.body
        if isinstance(body, dict):
            if _valid_endpoint(body.get("uri"), migration_endpoint) or _valid_endpoint(
                    body.get("nbd"), nbd_endpoint):
                return "a URI that parses"
            if existing.datastores & set(_strings(body)) and key != "POST /v1/images/info":
                return "names a real datastore"
        if op.method.upper() == "GET" or key == "POST /v1/images/info":
            return None
        if existing.touches(case) and key in _AGENT_ACTS:
            return "acts on a VM that exists"
        if _accepted_by(_AGENT_MODELS.get(key), body):
            return "a body the agent would act on"
        return None

    for op in operations(schema):
        key = label(op)
        if key in ("POST /v1/vms", "POST /v1/incoming", "PUT /v1/networks"):
            fuzz(op, (NEGATIVE,), caller, found, skip=skip)
            continue
        fuzz(op, BOTH, caller, found, skip=skip)
        if "{name}" in op.path and key not in _AGENT_ACTS:
            # (waits of up to 10 s for a migration or mirror event that never comes: 0)
            fuzz(op, BOTH, caller, found, skip=skip, path_parameters={"name": fuzz_vm},
                 query={"wait_s": "0"} if key in _AGENT_WAITS else None)
    # Another host's certificate: refused before anything runs, on every operation.
    other = HostTls(lab.host_tls_dir("host2"))
    stranger = Caller(lab.agent_url(AGENT_HOST), lab.ca_file,
                      cert=(str(other.cert), str(other.key)))
    for op in operations(schema):
        fuzz(op, (POSITIVE,), stranger, found, max_examples=3, coverage=False, path_parameters={
            "name": fuzz_vm}, judge=lambda _o, _c, r: None if r.status_code == 403
             else f"HTTP {r.status_code} for another host's certificate")

    print(report(found))
    assert found.sent() > 500, report(found)
    assert not found.problems, report(found)
    assert_unchanged(before, snapshot(client, lab), "fuzzing the agent")
    view = client.call("GET", f"/v1/vms/{fuzz_vm}")
    assert view["state"] == "running" and view["live"]["state"] == "running", view


# --- past the guards: valid requests that start real QEMUs, cleaned up after ----------
def test_vm_specs_the_control_plane_accepts_start_or_are_refused(
        lab: LabConfig, client: Client) -> None:
    """Generated variations of a bootable VM (machine, CPU model and count, memory,
    kernel and initrd among the datastore's files, kernel command line, NICs, disks)
    created and started on host1: each one runs or is refused with a 4xx, never a 5xx
    (QEMU failing at start on the spec's account is the request's fault). Every VM made
    is removed, and the lab is as it was."""
    facts = client.call("GET", "/v1/hosts/host1")["facts"]
    images = lab.images_dir
    before = settled_snapshot(client, lab)
    problems: list[str] = []
    made = itertools.count()
    outcomes: collections.Counter[str] = collections.Counter()

    @settings(max_examples=MAX_EXAMPLES * 4, deadline=None, database=None,
              derandomize=DERANDOMIZE, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(vcpus=st.integers(1, 6), memory=st.integers(32, 600),
           cpu=st.sampled_from([*facts["cpu_models"][:20], "max", "qemu64", "host"]),
           machine=st.sampled_from(["pc", "q35", "pc-i440fx-2.0", "pc-q35-7.2", "none",
                                    "microvm", "isapc"]),
           # (mostly what boots, so that the other fields get to QEMU)
           kernel=st.sampled_from(["vmlinuz"] * 4 + ["initrd.img", "", "nothing"]),
           initrd=st.sampled_from([None, "initrd.img", "initrd.img", "vmlinuz"]),
           append=st.text(max_size=40), nics=st.integers(0, 3),
           disks=st.lists(st.tuples(st.sampled_from(["shared", "local-host1", "nowhere"]),
                                    st.sampled_from(["images", "images/vmlinuz", "x.qcow2"]),
                                    st.sampled_from(["qcow2", "raw"])), max_size=1))
    def one(vcpus: int, memory: int, cpu: str, machine: str, kernel: str,
            initrd: str | None, append: str, nics: int,
            disks: list[tuple[str, str, str]]) -> None:
        n = next(made)
        name = f"fz-spec{n}"
        spec = probe_spec(lab, name, memory, 8, 0)
        spec.update(vcpus=vcpus, cpu_model=cpu, machine=machine)
        spec["kernel"] = {"kernel": str(images / kernel), "append": append,
                          "initrd": str(images / initrd) if initrd else None}
        spec["nics"] = [{"name": f"n{k}", "network": "vmnet",
                         "mac": f"52:54:00:7c:{n % 256:02x}:{k:02x}"} for k in range(nics)]
        spec["disks"] = [{"name": f"d{k}", "datastore": ds, "path": path, "format": fmt}
                         for k, (ds, path, fmt) in enumerate(disks)]
        try:
            client.call("POST", "/v1/vms", {"spec": spec, "host": "host1", "start": True})
            outcomes["started"] += 1
        except FerryError as exc:
            outcomes[exc.code] += 1
            if status_for(exc) >= 500:
                problems.append(f"{exc.code}: {exc.problem} for {spec}")
        finally:
            remove_vm(client, name)

    one()
    assert not problems, "\n".join(problems[:10])
    assert outcomes["started"] > 0 and outcomes["invalid_input"] > 0, outcomes
    assert_unchanged(before, snapshot(client, lab), "starting generated VMs")


def test_incoming_vms_the_agent_accepts_listen_or_are_refused(
        lab: LabConfig, client: Client) -> None:
    """Generated destinations of a migration, prepared on host1's agent as the control
    plane would (stream options, the peer allowed to connect, new disks to fill over
    NBD): each is made ready or refused with a 4xx, never a 5xx. Every QEMU and image
    made is removed, and the lab is as it was. (The tmpfs datastore "small" is left out:
    a raw image whose size is not a multiple of 4 KiB is exported read-only there, a
    502 not understood yet.)"""
    before = settled_snapshot(client, lab)
    problems: list[str] = []
    made = itertools.count()
    outcomes: collections.Counter[int] = collections.Counter()
    options = st.fixed_dictionaries({}, optional={
        "policy": st.sampled_from(["ferry", "nova", "nova-legacy", "kubevirt", "qemu"]),
        "allow_postcopy": st.booleans(), "allow_throttle": st.booleans(),
        "multifd_channels": st.integers(0, 16),
        "compression": st.sampled_from(["none", "zlib", "zstd"]),
        "max_bandwidth_bytes_s": st.integers(0, 2**63 - 1),
        "encryption": st.sampled_from(["required", "opportunistic", "disabled"])})

    @settings(max_examples=MAX_EXAMPLES * 2, deadline=None, database=None,
              derandomize=DERANDOMIZE, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(opts=options, peer=st.sampled_from([None, "host2", "host3", "ghost"]),
           disks=st.lists(st.tuples(st.sampled_from(["shared", "local-host1"]),
                                    st.integers(0, 1 << 17).map(lambda n: n * 512),
                                    st.sampled_from(["qcow2", "raw"]),
                                    st.sampled_from(["thin", "thick"])), max_size=2))
    def one(opts: dict[str, Any], peer: str | None,
            disks: list[tuple[str, int, str, str]]) -> None:
        n = next(made)
        name = f"fz-in{n}"
        spec = probe_spec(lab, name, 64, 8, 0, mac=f"52:54:00:7b:00:{n % 256:02x}")
        new = [{"disk": {"name": f"d{k}", "datastore": ds, "path": f"{name}-{k}.img",
                         "format": fmt, "provisioning": prov}, "size": size}
               for k, (ds, size, fmt, prov) in enumerate(disks)]
        spec["disks"] = [d["disk"] for d in new]
        with httpx.Client(base_url=lab.agent_url(AGENT_HOST), trust_env=False, timeout=60,
                          verify=client_context(pki.ca_cert, pki.cert, pki.key)) as agent:
            try:
                resp = agent.post("/v1/incoming", json={
                    "migration_id": f"fzin{n:04d}", "spec": spec, "options": opts,
                    "tls_peer": peer, "new_disks": new})
                outcomes[resp.status_code] += 1
                if resp.status_code >= 500:
                    problems.append(f"HTTP {resp.status_code}: {resp.text[:300]} for "
                                    f"{opts}, {peer}, {disks}")
            finally:
                agent.post(f"/v1/vms/{name}/stop", params={"force": True})
                for d in new:
                    agent.post("/v1/images/delete", json={"disk": d["disk"]})

    pki = ControlPki(lab.pki_dir)
    one()
    assert not problems, "\n".join(problems[:10])
    assert outcomes[200] > 0, outcomes
    assert_unchanged(before, snapshot(client, lab), "preparing generated destinations")
