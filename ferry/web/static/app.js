// Ferry's dashboard: a view of the cluster and its actions, over the same REST API as
// the CLI, with the operator's bearer token. No framework and no build step, so what
// ships in the package is what runs.
//
// Safety: API data (VM names are user input) only ever reaches the page as text
// (textContent, createTextNode) or as attribute values set one by one, never as markup.
import { chart, MIB, mib, pct, stageLines, summary, TERMINAL } from "./view.js";

// The token lives in this tab only (sessionStorage): it is gone when the tab is closed,
// never in a URL (history, logs, Referer) and never in a cookie (the API reads none).
const TOKEN_KEY = "ferry.token";
const POLL_MS = 3000;

const $ = (id) => document.getElementById(id);

// --- building DOM from data, as text only ------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined && v !== false) node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function say(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

// --- the API ---------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, body) {
    const err = body && body.error;
    super(err ? `${err.problem}${err.fix ? ` (${err.fix})` : ""}` : `HTTP ${status}`);
    this.status = status;
  }
}

const token = () => sessionStorage.getItem(TOKEN_KEY) || "";
const authHeaders = () => ({ Authorization: `Bearer ${token()}` });

// A read that never reached the control plane (fetch rejects: the browser dropped it,
// e.g. ERR_NETWORK_CHANGED when this machine's interfaces change) is tried again a few
// times, as is a call that changes nothing (a migration's check); a write never is,
// since it may have been applied before the connection broke.
const READ_RETRIES_MS = [250, 750, 1500];
const pause = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

async function send(path, init, changesNothing) {
  const waits = changesNothing ? READ_RETRIES_MS : [];
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await fetch(path, init);
    } catch (err) {
      if (attempt >= waits.length) {
        throw new Error(`could not reach the control plane (${err.message}): `
          + "check that it is running and this machine can reach it, then try again");
      }
      await pause(waits[attempt]);
    }
  }
}

// `readOnly`: a POST that changes nothing, so it may be sent again like a GET.
async function api(method, path, body, readOnly) {
  const headers = authHeaders();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await send(path, {
    method, headers, cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  }, method === "GET" || readOnly === true);
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (resp.status === 401) logout("the control plane refused the token: log in again");
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

// Server-sent events over fetch(): EventSource cannot send an Authorization header.
// Calls onRecord with each event's JSON until the stream ends or is aborted.
async function stream(path, onRecord, signal) {
  const resp = await fetch(path, {
    headers: { ...authHeaders(), Accept: "text/event-stream" }, signal, cache: "no-store",
  });
  if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => null));
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    // A CR at the end may be half of a CRLF: keep it until the next chunk.
    const keep = buf.endsWith("\r") ? "\r" : "";
    buf = buf.slice(0, buf.length - keep.length).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      // Only data lines matter; comments (keep-alives), ids and event names do not.
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) onRecord(JSON.parse(data));
    }
    buf += keep;
  }
}

// --- state ----------------------------------------------------------------------------
const state = {
  hosts: [], vms: [], load: {}, networks: [], relocations: [], ha: null,
  migrations: new Map(), // id -> latest record (from polls and streams)
};
const streams = new Map(); // migration id -> AbortController of its event stream
const cards = new Map(); // migration id -> its card's parts (running or watched here)
let pollTimer = null;

// --- login --------------------------------------------------------------------------
function showApp(on) {
  $("login-view").hidden = on;
  $("app").hidden = !on;
  $("logout").hidden = !on;
}

function logout(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(pollTimer);
  pollTimer = null;
  for (const ctrl of streams.values()) ctrl.abort();
  streams.clear();
  showApp(false);
  $("login-error").textContent = message || "";
  $("whoami").textContent = "";
}

async function login(event) {
  event.preventDefault();
  const value = $("token").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token").value = "";
  try {
    await api("GET", "/v1/hosts"); // a read any valid token may do
  } catch (err) {
    logout(`not logged in: ${err.message}`);
    return;
  }
  start();
}

function start() {
  $("login-error").textContent = "";
  $("whoami").textContent = "logged in (token kept in this tab)";
  showApp(true);
  refresh();
}

// --- polling the cluster ---------------------------------------------------------------
// One refresh at a time: an action asking for one while a poll runs gets one right after
// it, so actions never start a second chain of polls.
let refreshing = false;
let refreshAgain = false;

async function refresh() {
  if (refreshing) { refreshAgain = true; return; }
  refreshing = true;
  clearTimeout(pollTimer);
  try {
    const [hosts, vms, load, networks, migrations, relocations, ha] = await Promise.all([
      api("GET", "/v1/hosts"), api("GET", "/v1/vms"), api("GET", "/v1/load"),
      api("GET", "/v1/networks"), api("GET", "/v1/migrations"),
      api("GET", "/v1/relocations"),
      // HA's view of each host (connected, isolated, dead); a control plane without HA
      // still gets the rest of the page.
      api("GET", "/v1/cluster/ha").catch(() => null)]);
    Object.assign(state, { hosts, vms, load, networks, relocations, ha });
    for (const m of migrations) {
      const known = state.migrations.get(m.id);
      if (!known || known.version <= m.version) state.migrations.set(m.id, m);
      if (!TERMINAL.has(m.phase) && !m.check_only) follow(m.id);
    }
    render();
  } catch (err) {
    if (token()) say(`could not refresh: ${err.message}`, true); // else: logged out
  } finally {
    refreshing = false;
  }
  if (!token()) return;
  if (refreshAgain) { refreshAgain = false; refresh(); return; }
  pollTimer = setTimeout(refresh, POLL_MS);
}

function follow(id) {
  if (streams.has(id)) return;
  const ctrl = new AbortController();
  streams.set(id, ctrl);
  stream(`/v1/migrations/${encodeURIComponent(id)}/events`, (rec) => {
    state.migrations.set(rec.id, rec);
    renderMigration(rec);
    if (TERMINAL.has(rec.phase)) renderFinished();
  }, ctrl.signal).catch((err) => {
    if (!ctrl.signal.aborted) say(`lost the event stream of ${id}: ${err.message}`, true);
  }).finally(() => {
    // A stream that ended before its migration did is taken up again by the next poll.
    streams.delete(id);
  });
}

// --- rendering: hosts, datastores, networks --------------------------------------------
// A load is best low, free space best high: the meter's colours follow its optimum.
function bar(tag, value, label, goodHigh) {
  const v = Math.max(0, value);
  const attrs = { value: Math.min(v, 1), max: 1, "aria-label": label };
  if (tag === "meter") {
    Object.assign(attrs, goodHigh ? { low: 0.1, high: 0.25, optimum: 1 }
      : { low: 0.7, high: 0.9, optimum: 0 });
  }
  return el("span", {}, el(tag, attrs), el("span", { class: "bar-text" }, pct(v)));
}

function haHealth(host) {
  const ha = state.ha;
  const health = ha && ha.hosts ? ha.hosts[host] : undefined;
  if (!health) return el("span", { class: "muted" }, "—");
  return el("span", {}, el("span", { class: `state state-${health}` }, health),
    ha.settings.enabled ? "" : el("span", { class: "muted" }, " (HA off)"));
}

function renderHaSummary() {
  const ha = state.ha;
  const box = $("ha-summary");
  if (!ha) { box.textContent = ""; return; }
  const r = ha.reserve;
  box.textContent = !ha.settings.enabled ? "HA is off (ferry cluster ha --enable turns it on)." :
    `HA on: tolerates ${r.failures} host failure${r.failures === 1 ? "" : "s"}; ` +
    (r.ok ? `reserve ok (${r.spare_mib} MiB spare in the worst case)` :
      `reserve short: ${r.reason}`);
}

function renderHosts() {
  const rows = state.hosts.map((h) => {
    const facts = h.facts || {};
    const mine = state.vms.filter((v) => v.host === h.name);
    const placed = mine.filter((v) => v.state !== "defined");
    const vcpus = placed.reduce((n, v) => n + v.spec.vcpus, 0);
    const mem = placed.reduce((n, v) => n + v.spec.memory_mib, 0);
    const load = state.load[h.name];
    const flags = [h.maintenance && h.state !== "maintenance" ? "maintenance" : null,
      h.standby && h.state !== "standby" ? "standby" : null].filter(Boolean);
    return el("tr", {},
      el("th", { scope: "row" }, h.name),
      el("td", {}, el("span", { class: `state state-${h.state}` }, h.state),
        flags.length ? ` (${flags.join(", ")})` : ""),
      el("td", {}, haHealth(h.name)),
      el("td", {}, load ? bar("meter", load.cpu, `${h.name} CPU load`) : "—",
        facts.cpus ? el("div", { class: "muted" }, `${facts.cpus} cores`) : null),
      el("td", {}, load ? bar("meter", load.memory, `${h.name} memory load`) : "—",
        facts.memory_mib ? el("div", { class: "muted" },
          `${facts.memory_mib} MiB, ${facts.memory_free_mib} free on the host`) : null),
      el("td", {}, `${vcpus}/${facts.cpus ?? "?"} vCPUs, ${mem}/${facts.memory_mib ?? "?"} MiB`),
      el("td", {}, mine.length ? el("ul", { class: "plain" }, mine.map((v) =>
        el("li", {}, v.spec.name, el("span", { class: "muted" }, ` ${v.state}`)))) : "none"));
  });
  $("hosts").tBodies[0].replaceChildren(...rows);
  renderHaSummary();
}

// Datastores as the hosts report them: one row per datastore, with who sees it.
function datastores() {
  const byName = new Map();
  for (const h of state.hosts) {
    for (const d of (h.facts && h.facts.datastores) || []) {
      const row = byName.get(d.name) || { ...d, hosts: [] };
      row.hosts.push(h.name);
      byName.set(d.name, row);
    }
  }
  return [...byName.values()].sort((a, b) => a.name.localeCompare(b.name));
}

function renderDatastores() {
  const rows = datastores().map((d) => el("tr", {},
    el("th", { scope: "row" }, d.name, d.shared ? el("span", { class: "muted" }, " shared") : ""),
    el("td", {}, d.hosts.join(", ")),
    el("td", {}, bar("meter", d.total_bytes ? d.free_bytes / d.total_bytes : 0,
      `${d.name} free space`, true), el("span", { class: "bar-text" },
      `${mib(d.free_bytes)} of ${mib(d.total_bytes)} MiB free`))));
  $("datastores").tBodies[0].replaceChildren(...rows);
}

function renderNetworks() {
  const rows = state.networks.map((n) => el("tr", {},
    el("th", { scope: "row" }, n.spec.name),
    el("td", {}, n.spec.vni ?? ""), el("td", {}, n.spec.mtu ?? ""),
    el("td", {}, Object.entries(n.hosts).map(([h, s]) => `${h}: ${s}`).join("; ")),
    el("td", {}, n.vms.join(", ") || "none")));
  $("networks").tBodies[0].replaceChildren(...rows);
}

// --- rendering: migrations ----------------------------------------------------------------

function newCard(rec) {
  const parts = {
    root: el("article", { class: "migration", "data-migration-id": rec.id,
      "aria-labelledby": `mig-${rec.id}-title` }),
    title: el("h3", { id: `mig-${rec.id}-title` }),
    cause: el("p", { class: "muted" }),
    stages: el("ul", { class: "plain stages" }),
    chart: el("div", { class: "chart-box" }),
    legend: el("p", { class: "legend" },
      el("span", { class: "legend-remaining" }, "solid: memory remaining (MiB, left axis)"),
      " · ", el("span", { class: "legend-dirty" }, "dashed: dirty rate (MiB/s, right axis)")),
    levers: el("ul", { class: "levers" }),
    outcome: el("p", { class: "outcome", role: "status" }),
    cancel: el("button", { type: "button", class: "cancel" }, "Cancel migration"),
  };
  parts.cancel.addEventListener("click", () => act(`cancel of ${rec.id} asked`,
    () => api("POST", `/v1/migrations/${encodeURIComponent(rec.id)}/cancel`)));
  parts.root.append(parts.title, parts.cause, parts.stages, parts.chart, parts.legend,
    el("h4", {}, "Levers the policy used"), parts.levers, parts.outcome, parts.cancel);
  $("running").prepend(parts.root);
  $("no-running").hidden = true;
  cards.set(rec.id, parts);
  return parts;
}

function renderMigration(rec) {
  if (rec.check_only) return;
  const parts = cards.get(rec.id) || newCard(rec);
  parts.root.dataset.phase = rec.phase;
  parts.title.textContent = `${rec.vm}: ${rec.source} → ${rec.target} (${rec.phase})`;
  parts.cause.textContent = `started by: ${rec.cause || "an operator"}; policy ` +
    `${rec.options.policy}, downtime target ${rec.downtime_limit_ms ?? rec.options.max_downtime_ms} ms` +
    (rec.throttle_pct ? `, guest throttled ${rec.throttle_pct}%` : "");
  parts.stages.replaceChildren(...stageLines(rec).map((l) => {
    const attrs = { max: 1, "aria-label": `${l.stage} ${l.status}` };
    if (l.fraction !== null) attrs.value = Math.min(1, Math.max(0, l.fraction));
    return el("li", { "data-stage": l.stage }, el("span", {}, l.stage.replace(/_/g, " ")),
      el("span", {}, el("progress", attrs), el("span", { class: "bar-text" }, l.status)),
      el("span", { class: "muted" }, l.detail));
  }));
  parts.chart.replaceChildren(chart(rec.iterations));
  const actions = rec.actions || [];
  parts.levers.replaceChildren(...(actions.length ? actions.map((a) => el("li", {},
    `at ${(a.at_ms / 1000).toFixed(1)} s: ${a.kind}${a.value === null || a.value === undefined ? "" : ` ${a.value}`}`,
    a.reason ? ` — ${a.reason}` : "")) : [el("li", { class: "muted" },
      TERMINAL.has(rec.phase) ? "none" : "none so far")]));
  const done = TERMINAL.has(rec.phase);
  parts.outcome.textContent = done ? summary(rec) : "";
  parts.outcome.className = `outcome state-${rec.phase}`;
  parts.cancel.hidden = done || !["pending", "checking", "preparing_target", "disk_copy",
    "precopy"].includes(rec.phase);
}

// Finished cards stay for a while (their chart is worth a look), not for a whole day of
// DRS moves: past this many, the oldest finished ones go (the table below keeps them).
const KEEP_FINISHED_CARDS = 6;

function pruneCards() {
  const finished = [...cards.keys()].filter((id) => TERMINAL.has(state.migrations.get(id)?.phase));
  // Cards are prepended: the oldest come last in the container, and first in `cards`.
  for (const id of finished.slice(0, Math.max(0, finished.length - KEEP_FINISHED_CARDS))) {
    cards.get(id).root.remove();
    cards.delete(id);
  }
  $("no-running").hidden = cards.size > 0;
}

function renderFinished() {
  const done = [...state.migrations.values()].filter((m) => TERMINAL.has(m.phase) && !m.check_only)
    .sort((a, b) => b.created_at - a.created_at).slice(0, 50);
  $("finished").tBodies[0].replaceChildren(...done.map((m) => el("tr", { "data-migration-id": m.id },
    el("th", { scope: "row" }, m.vm), el("td", {}, `${m.source} → ${m.target}`),
    el("td", {}, el("span", { class: `state state-${m.phase}` }, m.phase)),
    el("td", {}, summary(m)), el("td", {}, m.cause || ""))));
}

function renderRelocations() {
  const rows = state.relocations.slice().sort((a, b) => b.created_at - a.created_at)
    .slice(0, 20).map((r) => el("tr", {},
      el("th", { scope: "row" }, r.vm), el("td", {}, r.disk),
      el("td", {}, `${r.target.datastore}:${r.target.path}`),
      el("td", {}, TERMINAL.has(r.phase) ? `${r.phase}${r.reason ? `: ${r.reason}` : ""}` :
        el("span", {}, el("progress", { max: 1, value: r.total_bytes ? r.copied_bytes / r.total_bytes : 0,
          "aria-label": `relocation of ${r.vm} ${r.disk}` }),
        el("span", { class: "bar-text" }, `${r.phase}, ${mib(r.copied_bytes)} of ${mib(r.total_bytes)} MiB`)))));
  $("relocations").tBodies[0].replaceChildren(...rows);
}

// --- rendering: the action forms' choices ------------------------------------------
// Refill a <select> keeping the operator's choice when it is still offered.
function fill(select, values, blank) {
  // Unchanged choices are left alone: replacing them would close an open list.
  const key = JSON.stringify([blank, values]);
  if (select.dataset.choices === key) return;
  select.dataset.choices = key;
  const keep = select.value;
  const options = values.map((v) => el("option", { value: v }, v));
  if (blank !== undefined) options.unshift(el("option", { value: "" }, blank));
  select.replaceChildren(...options);
  if ([...select.options].some((o) => o.value === keep)) select.value = keep;
}

function renderChoices() {
  const vmNames = state.vms.map((v) => v.spec.name).sort();
  const hostNames = state.hosts.map((h) => h.name);
  const dsNames = datastores().map((d) => d.name);
  fill($("mig-vm"), vmNames);
  fill($("mig-target"), hostNames);
  fill($("mig-datastore"), dsNames, "(disks stay where they are)");
  fill($("rel-vm"), vmNames);
  fill($("rel-datastore"), dsNames);
  fill($("maint-host"), hostNames);
}

function render() {
  renderHosts();
  renderDatastores();
  renderNetworks();
  for (const m of state.migrations.values()) {
    if (!m.check_only && (!TERMINAL.has(m.phase) || cards.has(m.id))) renderMigration(m);
  }
  pruneCards();
  renderFinished();
  renderRelocations();
  renderChoices();
}

// --- actions ------------------------------------------------------------------------
async function act(what, call) {
  say(`${what}…`);
  try {
    const result = await call();
    say(`${what}: done`);
    refresh();
    return result;
  } catch (err) {
    say(`${what}: ${err.message}`, true);
    return undefined;
  }
}

function migrateBody() {
  const body = { vm: $("mig-vm").value, target: $("mig-target").value };
  if ($("mig-datastore").value) body.datastore = $("mig-datastore").value;
  const limit = Number($("mig-bandwidth").value);
  if (limit > 0) body.options = { max_bandwidth_bytes_s: Math.round(limit) * MIB };
  return body;
}

// The start button is enabled only by a check that passed for exactly these choices.
let checked = null;
function invalidateCheck() {
  checked = null;
  $("mig-start").disabled = true;
  $("mig-result").replaceChildren();
}

async function checkMigration() {
  invalidateCheck();
  const body = migrateBody();
  const box = $("mig-result");
  box.replaceChildren(el("p", {}, `checking ${body.vm} → ${body.target}…`));
  try {
    const result = await api("POST", "/v1/migrations/check", body, true);
    if (result.ok) {
      box.replaceChildren(el("p", { class: "ok check-ok" },
        `${result.vm} can move to ${result.target}: every check passed.`));
      checked = JSON.stringify(body);
      $("mig-start").disabled = false;
    } else {
      box.replaceChildren(el("p", { class: "error" },
        `${result.vm} cannot move to ${result.target}:`),
        el("ul", { class: "refusals" }, result.refusals.map((r) =>
          el("li", { "data-reason": r.reason }, `${r.reason}: ${r.message}`))));
    }
  } catch (err) {
    box.replaceChildren(el("p", { class: "error" }, `check failed: ${err.message}`));
  }
}

async function startMigration(event) {
  event.preventDefault();
  const body = migrateBody();
  if (checked !== JSON.stringify(body)) { invalidateCheck(); return; }
  const rec = await act(`migration of ${body.vm} to ${body.target}`,
    () => api("POST", "/v1/migrations", body));
  invalidateCheck();
  if (rec) {
    state.migrations.set(rec.id, rec);
    renderMigration(rec);
    follow(rec.id);
    cards.get(rec.id).root.scrollIntoView({ block: "nearest" });
  }
}

async function relocate(event) {
  event.preventDefault();
  const body = { vm: $("rel-vm").value, datastore: $("rel-datastore").value };
  await act(`relocation of ${body.vm} to ${body.datastore}`,
    () => api("POST", "/v1/relocations", body));
}

async function maintenance(event) {
  event.preventDefault();
  const on = event.submitter ? event.submitter.value !== "off" : true;
  const host = $("maint-host").value;
  const result = await act(`${on ? "entering" : "leaving"} maintenance on ${host}`, () =>
    api("POST", `/v1/hosts/${encodeURIComponent(host)}/maintenance?on=${on}`));
  if (result && result.evacuation) showPlan(result.evacuation.plan, result.evacuation.results);
}

function showPlan(plan, results) {
  const box = $("drs-plan");
  const rows = plan.moves.map((m, i) => {
    const r = results ? results[i] : null;
    return el("tr", {}, el("td", {}, m.vm), el("td", {}, `${m.source} → ${m.target}`),
      el("td", {}, m.reason), el("td", {}, m.gain.toFixed(3)), el("td", {}, m.cost.toFixed(3)),
      el("td", {}, `cpu ${pct(m.target_after.cpu)}, mem ${pct(m.target_after.memory)}`),
      results ? el("td", {}, r.migration_id || (r.deferred ? "starts once the moves it needs end" :
        `refused: ${r.error}`)) : null);
  });
  box.replaceChildren(el("div", {},
    el("p", {}, `imbalance ${plan.imbalance_before.toFixed(3)} → ${plan.imbalance_after.toFixed(3)}, ` +
      `${plan.moves.length} move${plan.moves.length === 1 ? "" : "s"}`),
    plan.moves.length ? el("table", {}, el("thead", {}, el("tr", {},
      ["VM", "from → to", "reason", "gain", "cost", "target after"].concat(results ? ["migration"] : [])
        .map((c) => el("th", { scope: "col" }, c)))), el("tbody", {}, rows)) : null,
    plan.conflicts.map((c) => el("p", { class: "error" }, `rule conflict: ${c}`)),
    plan.unplaced.map((u) => el("p", { class: "error" }, `no room: ${u}`))));
}

async function previewPlan() {
  $("drs-apply").disabled = true;
  const plan = await act("DRS plan preview", () => api("GET", "/v1/drs/plan"));
  if (plan) {
    showPlan(plan);
    $("drs-apply").disabled = plan.moves.length === 0;
  }
}

async function applyPlan(event) {
  event.preventDefault();
  $("drs-apply").disabled = true;
  // The control plane plans again when applying: the cluster may have changed since.
  const applied = await act("DRS apply", () => api("POST", "/v1/drs/apply"));
  if (applied) showPlan(applied.plan, applied.results);
}

// --- wiring ---------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", login);
  $("logout").addEventListener("click", () => logout("logged out"));
  for (const id of ["mig-vm", "mig-target", "mig-datastore", "mig-bandwidth"]) {
    $(id).addEventListener("change", invalidateCheck);
    $(id).addEventListener("input", invalidateCheck);
  }
  $("mig-check").addEventListener("click", checkMigration);
  $("migrate-form").addEventListener("submit", startMigration);
  $("relocate-form").addEventListener("submit", relocate);
  $("maint-form").addEventListener("submit", maintenance);
  $("drs-preview").addEventListener("click", previewPlan);
  $("drs-form").addEventListener("submit", applyPlan);
  if (token()) start(); else showApp(false);
});
