"""The dashboard in a real browser (Debian's chromium, headless, driven by Playwright):
log in with the lab's admin token, see the hosts, check and start a migration of a probe
VM from the page, watch its chart fill from the event stream, see it complete, and find
the guest intact afterwards."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ferry.cli.client import Client
from ferry.cli.demo import wait_heartbeat
from ferry.lab.config import LabConfig
from tests.integration.helpers import assert_intact, boot_probe, remove_vm
from tests.integration.test_storage import assert_disk_intact, boot_disk_probe

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "artifacts"
VM = "dash1"


def chromium() -> str:
    """Debian's chromium; its absence fails the test (`make test` installs it), as a
    missing guest image does: a browser test that skips would pass without a browser."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("no chromium: run scripts/install-deps.sh as root (`make test` does)")
    return path


# Chromium drops requests in flight when this machine's interfaces change, which other
# tests' labs do (namespaces, veths, bridges); the page retries its reads (a test below
# drops one on purpose), so the drop itself is the machine's doing, not a page problem.
NETWORK_CHANGED = "net::ERR_NETWORK_CHANGED"


@dataclass
class Tab:
    page: Any  # playwright's Page (imported lazily: its absence must fail, not error)
    problems: list[str]  # errors the page logged: script errors, CSP violations
    blips: list[str]  # requests Chromium dropped as the machine's interfaces changed


def on_console(tab: Tab, message: Any) -> None:
    if message.type != "error":
        return
    (tab.blips if NETWORK_CHANGED in message.text else tab.problems).append(message.text)


@pytest.fixture
def tab(lab: LabConfig) -> Iterator[Tab]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -c constraints.txt -e '.[dev]'")
    exe = chromium()
    with sync_playwright() as pw:
        # The system chromium, never a downloaded one; no proxy: the lab is local.
        browser = pw.chromium.launch(executable_path=exe, headless=True,
                                     args=["--no-proxy-server"])
        # The lab's CA is not in the browser's store; the page's own checks are the
        # point here, the TLS setup has its own tests (test_security.py).
        context = browser.new_context(ignore_https_errors=True,
                                      viewport={"width": 1280, "height": 900})
        page = context.new_page()
        tab = Tab(page, [], [])
        page.on("console", lambda m: on_console(tab, m))
        page.on("pageerror", lambda exc: tab.problems.append(f"page error: {exc}"))
        try:
            yield tab
        finally:
            context.close()
            browser.close()


def save_screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / name)
    return shot


def open_dashboard(tab: Tab, lab: LabConfig) -> None:
    """Load the page; a load Chromium dropped as the machine's interfaces changed is
    loaded again, as a user would (the page itself then retries its reads)."""
    from playwright.sync_api import Error

    for attempt in range(3):
        try:
            tab.page.goto(f"{lab.control_url}/")
            return
        except Error as exc:
            if NETWORK_CHANGED not in str(exc) or attempt == 2:
                raise
            tab.blips.append(str(exc))


def log_in(tab: Tab, lab: LabConfig) -> None:
    from playwright.sync_api import expect

    page = tab.page
    open_dashboard(tab, lab)
    # Logged out: only the login form is shown, and the page's data needs a token.
    expect(page.locator("#login-view")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()
    page.get_by_label("API token").fill(lab.admin_token_file.read_text().strip())
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#app")).to_be_visible()


def test_migrate_from_the_dashboard(client: Client, lab: LabConfig, tab: Tab,
                                    tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = tab.page
    boot_probe(client, lab, VM, "host1", dirty=5)
    try:
        before = wait_heartbeat(client, VM)
        log_in(tab, lab)
        hosts = page.locator("#hosts tbody tr")
        expect(hosts).to_have_count(len(lab.hosts), timeout=15_000)
        for host in lab.hosts:
            row = hosts.filter(has=page.get_by_role("rowheader", name=host.name))
            expect(row).to_contain_text("connected")
        expect(page.locator("#hosts tbody")).to_contain_text(VM)
        expect(page.locator("#ha-summary")).to_contain_text("HA ")  # on or off, it says
        expect(page.locator("#datastores tbody tr").first).to_contain_text("MiB free")
        assert page.evaluate("sessionStorage.getItem('ferry.token')") is not None
        assert "token" not in page.url

        # A refused check shows its reason and leaves the start button disabled. The
        # browser drops the first try: a check changes nothing, so the page sends it again.
        checks: list[str] = []

        def drop_first(route: Any) -> None:
            checks.append(route.request.method)
            if len(checks) == 1:
                route.abort("failed")
            else:
                route.continue_()

        page.route("**/v1/migrations/check", drop_first)
        page.select_option("#mig-vm", VM)
        page.select_option("#mig-target", "host1")
        page.get_by_role("button", name="Check").click()
        expect(page.locator("#mig-result .refusals li[data-reason=same_host]")) \
            .to_contain_text("same_host")
        expect(page.locator("#mig-start")).to_be_disabled()
        assert len(checks) >= 2, checks  # dropped, then sent again
        page.unroute("**/v1/migrations/check")
        dropped = tab.problems[:]
        assert len(dropped) == 1 and "ERR_FAILED" in dropped[0], dropped
        tab.problems.clear()

        # A passing check enables it; slow enough (bandwidth) for several events.
        page.select_option("#mig-target", "host2")
        page.fill("#mig-bandwidth", "16")
        page.get_by_role("button", name="Check").click()
        expect(page.locator("#mig-result .check-ok")).to_contain_text("every check passed")
        expect(page.locator("#mig-start")).to_be_enabled()
        page.locator("#mig-start").click()

        card = page.locator("article.migration").filter(has_text=f"{VM}: host1 → host2")
        expect(card).to_have_count(1, timeout=15_000)
        # The chart gets its points from the event stream while pre-copy runs.
        expect(card.locator("svg.chart circle.remaining").first).to_be_attached(
            timeout=120_000)
        expect(card.locator("svg.chart circle.dirty").first).to_be_attached()
        expect(card).to_have_attribute("data-phase", "completed", timeout=300_000)
        expect(card.locator(".outcome")).to_contain_text("completed in")
        expect(card.locator("[data-stage=switchover]")).to_contain_text("done")
        migration_id = card.get_attribute("data-migration-id")
        assert migration_id
        rec = client.call("GET", f"/v1/migrations/{migration_id}")
        assert rec["phase"] == "completed" and rec["options"]["max_bandwidth_bytes_s"] \
            == 16 << 20
        if rec.get("memory_check"):  # the check of the destination's RAM, when it ran
            expect(card.locator(".outcome")).to_contain_text("memory ")
        points = card.locator("svg.chart circle.remaining").count()
        assert 1 <= points == len(rec["iterations"]), (points, rec["iterations"])
        expect(card.locator("[data-stage=precopy] progress")).to_have_attribute("value", "1")
        expect(page.locator(f"#finished tr[data-migration-id='{migration_id}']")) \
            .to_contain_text("completed")
        expect(page.locator("#hosts tbody tr").filter(
            has=page.get_by_role("rowheader", name="host2"))).to_contain_text(VM,
                                                                            timeout=15_000)
        shot = save_screenshot(page, tmp_path, "dashboard-migration.png")
        assert shot.stat().st_size > 10_000
        assert not tab.problems, tab.problems  # CSP violations show up here too
        assert_intact(client, VM, "host2", lab, before)

        # The other actions go through the same API: a DRS preview, maintenance on/off.
        page.get_by_role("button", name="Preview plan").click()
        expect(page.locator("#drs-plan")).to_contain_text("imbalance")
        host3 = page.locator("#hosts tbody tr").filter(
            has=page.get_by_role("rowheader", name="host3"))
        page.select_option("#maint-host", "host3")
        page.get_by_role("button", name="Enter maintenance").click()
        expect(host3).to_contain_text("maintenance", timeout=30_000)
        assert client.call("GET", "/v1/hosts/host3")["maintenance"] is True
        page.get_by_role("button", name="Leave maintenance").click()
        expect(host3).not_to_contain_text("maintenance", timeout=30_000)
        assert client.call("GET", "/v1/hosts/host3")["maintenance"] is False
        assert not tab.problems, tab.problems
    finally:
        remove_vm(client, VM)


def test_relocate_storage_from_the_dashboard(client: Client, lab: LabConfig, tab: Tab
                                            ) -> None:
    from playwright.sync_api import expect

    page = tab.page
    before = boot_disk_probe(client, lab, "dash2", "host1", "local-host1", size_mib=32,
                             disk_mib=8)
    try:
        log_in(tab, lab)
        page.select_option("#rel-vm", "dash2")
        page.select_option("#rel-datastore", "shared")
        page.get_by_role("button", name="Relocate").click()
        row = page.locator("#relocations tbody tr").filter(
            has=page.get_by_role("rowheader", name="dash2"))
        expect(row).to_contain_text("shared:", timeout=15_000)
        expect(row).to_contain_text("completed", timeout=180_000)
        assert client.call("GET", "/v1/vms/dash2")["spec"]["disks"][0]["datastore"] \
            == "shared"
        assert_disk_intact(client, lab, "dash2", "host1", before)
        assert not tab.problems, tab.problems
    finally:
        remove_vm(client, "dash2")


def test_a_viewer_sees_but_cannot_act_and_the_token_stays_out_of_urls(
        client: Client, lab: LabConfig, tab: Tab) -> None:
    from playwright.sync_api import expect

    page = tab.page
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    made = client.call("POST", "/v1/tokens", {"name": "dash-viewer", "role": "viewer"})
    try:
        open_dashboard(tab, lab)
        page.get_by_label("API token").fill(made["token"])
        page.get_by_role("button", name="Log in").click()
        expect(page.locator("#hosts tbody tr")).to_have_count(len(lab.hosts))
        page.select_option("#maint-host", "host3")
        page.get_by_role("button", name="Enter maintenance").click()
        expect(page.locator("#status")).to_contain_text("lacks the privilege")
        expect(page.locator("#status")).to_have_class("error")
        assert client.call("GET", "/v1/hosts/host3")["maintenance"] is False
        # The browser logs the refused call (HTTP 403) and nothing else.
        assert all("403" in p for p in tab.problems), tab.problems
        page.get_by_role("button", name="Log out").click()
        expect(page.locator("#login-view")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('ferry.token')") is None
        assert urls and not [u for u in urls if made["token"] in u]
    finally:
        client.call("DELETE", f"/v1/tokens/{made['info']['id']}")


def test_a_dropped_read_is_retried_and_a_dropped_write_is_not(
        client: Client, lab: LabConfig, tab: Tab) -> None:
    """The browser drops a request when the machine's network changes under it: the login
    and the polls try their reads again, while an action (which may have been applied
    before the drop) is reported, never sent twice."""
    from playwright.sync_api import expect

    page = tab.page
    dropped: list[str] = []
    writes: list[str] = []

    def drop_twice(route: Any) -> None:
        if len(dropped) < 2:
            dropped.append(route.request.url)
            route.abort("failed")
        else:
            route.continue_()

    def drop_writes(route: Any) -> None:
        writes.append(route.request.method)
        route.abort("failed")

    page.route("**/v1/hosts", drop_twice)
    page.route("**/v1/hosts/host3/maintenance*", drop_writes)
    log_in(tab, lab)
    expect(page.locator("#hosts tbody tr")).to_have_count(len(lab.hosts))
    assert len(dropped) == 2, dropped
    page.select_option("#maint-host", "host3")
    page.get_by_role("button", name="Enter maintenance").click()
    expect(page.locator("#status")).to_contain_text("could not reach the control plane")
    expect(page.locator("#status")).to_have_class("error")
    assert writes == ["POST"], writes
    assert client.call("GET", "/v1/hosts/host3")["maintenance"] is False
    expect(page.locator("#app")).to_be_visible()  # still logged in
    # Chromium logs each dropped request; nothing else went wrong.
    assert all("ERR_FAILED" in p for p in tab.problems), tab.problems


def test_chromium_is_there_for_root() -> None:
    """Without it the browser test above cannot run: as root (the suite's user, who can
    install it) that is a failure, never a skip."""
    if os.geteuid() == 0:
        chromium()
