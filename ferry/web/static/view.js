// Pure views of a migration record for the dashboard: its stages with how far each is,
// the pre-copy chart (an SVG built node by node, so no data is ever parsed as markup)
// and its one-line summary. No state and no calls: app.js owns those.

export const MIB = 1048576;
const SVG_NS = "http://www.w3.org/2000/svg";
const STAGES = ["checking", "preparing_target", "disk_copy", "precopy", "postcopy",
  "switchover", "resuming_target"];
const OPTIONAL = new Set(["disk_copy", "postcopy"]); // shown only once reached
export const TERMINAL = new Set(["completed", "failed"]);

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

export const mib = (bytes) => (bytes === null || bytes === undefined) ? "?" :
  (bytes / MIB).toFixed(bytes < 10 * MIB ? 1 : 0);
export const pct = (x) => `${Math.round(x * 100)}%`;
const secs = (t0, t1) => `${(t1 - t0).toFixed(1)} s`;

function stagesOf(rec) {
  const times = rec.phase_times || {};
  let shown = STAGES.filter((s) => !OPTIONAL.has(s) || s in times);
  // After post-copy there is no separate switchover: the switch happened as it began.
  if ("postcopy" in times) shown = shown.filter((s) => s !== "switchover" && s !== "resuming_target");
  return shown;
}

// One line per stage: its state and, while it runs, how far it is (a fraction or null).
export function stageLines(rec) {
  const times = rec.phase_times || {};
  const reached = STAGES.filter((s) => s in times);
  const last = reached[reached.length - 1];
  const failing = rec.phase === "rolling_back" || rec.phase === "failed";
  return stagesOf(rec).map((s) => {
    let status = "waiting", fraction = 0, detail = "";
    if (s in times) {
      const running = s === rec.phase;
      status = running ? "running" : "done";
      fraction = running ? null : 1;
      if (failing && s === last) { status = "failed"; fraction = 1; }
    }
    if (s === "disk_copy" && s in times && rec.disk_total_bytes) {
      if (status === "running") fraction = rec.disk_copied_bytes / rec.disk_total_bytes;
      detail = `${mib(rec.disk_copied_bytes)} of ${mib(rec.disk_total_bytes)} MiB copied`;
    }
    if (s === "precopy" && s in times) {
      const its = rec.iterations || [];
      const it = its[its.length - 1] || {};
      const sent = rec.transferred_bytes || 0, left = rec.remaining_bytes;
      if (status === "running" && left !== null && left !== undefined && sent + left > 0) {
        fraction = sent / (sent + left);
      }
      detail = `pass ${it.number ?? 0}, ${mib(left)} MiB left, ${mib(sent)} MiB sent, ` +
        `dirty ${mib(it.dirty_rate_bytes_s)} MiB/s`;
    }
    return { stage: s, status, fraction, detail };
  });
}

// Remaining memory and dirty rate per pre-copy pass, each on its own scale (left and
// right axes), so a dirty rate that stays high while the remainder shrinks is visible.
export function chart(iterations) {
  const W = 440, H = 170, L = 48, R = 64, T = 12, B = 28;
  const its = iterations || [];
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
    "aria-label": its.length ? `pre-copy: ${its.length} passes, last ${mib(its[its.length - 1].remaining_bytes)} MiB remaining` : "pre-copy: no pass yet" });
  root.append(svg("title", {}, "Remaining memory (solid) and dirty rate (dashed) per pre-copy pass"));
  const maxRem = Math.max(1, ...its.map((i) => i.remaining_bytes));
  const maxDirty = Math.max(1, ...its.map((i) => i.dirty_rate_bytes_s));
  const n = its.length;
  const x = (k) => L + (n <= 1 ? (W - L - R) / 2 : (k * (W - L - R)) / (n - 1));
  const y = (v, max) => T + (H - T - B) * (1 - v / max);
  root.append(
    svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    svg("line", { class: "axis", x1: W - R, y1: T, x2: W - R, y2: H - B }),
    svg("text", { x: 2, y: T + 8 }, `${mib(maxRem)} MiB`),
    svg("text", { x: 2, y: H - B }, "0"),
    svg("text", { x: W - R + 3, y: T + 8 }, `${mib(maxDirty)} MiB/s`),
    svg("text", { x: W / 2 - 20, y: H - 6 }, n ? `pass ${its[0].number}–${its[n - 1].number}` : "pass"));
  for (const [cls, key, max] of [["remaining", "remaining_bytes", maxRem],
    ["dirty", "dirty_rate_bytes_s", maxDirty]]) {
    const pts = its.map((it, k) => [x(k), y(it[key], max)]);
    if (pts.length > 1) {
      root.append(svg("polyline", { class: cls, points: pts.map((p) => p.join(",")).join(" ") }));
    }
    its.forEach((it, k) => {
      const dot = svg("circle", { class: cls, cx: pts[k][0], cy: pts[k][1], r: 3,
        "data-pass": it.number });
      dot.append(svg("title", {}, `pass ${it.number}: ${cls === "remaining" ?
        `${mib(it.remaining_bytes)} MiB remaining` : `dirty ${mib(it.dirty_rate_bytes_s)} MiB/s`}`));
      root.append(dot);
    });
  }
  return root;
}

// What the check of the destination's RAM before it ran found, when it ran.
function memoryText(check) {
  if (!check) return "";
  if (check.skipped) return `; memory not verified (${check.skipped})`;
  if (check.repaired_pages) {
    return `; memory verified, ${check.repaired_pages} stale pages copied again (${check.ms} ms)`;
  }
  return `; memory verified (${check.ms} ms)`;
}

export function summary(rec) {
  const t = rec.phase_times || {};
  const end = t.completed ?? t.failed;
  const took = end !== undefined && t.pending !== undefined ? ` in ${secs(t.pending, end)}` : "";
  if (rec.phase === "completed") {
    const levers = [...new Set((rec.actions || []).map((a) => a.kind))];
    const cv = rec.client_view;
    return `completed${took}: downtime ${rec.downtime_ms} ms (QEMU)` +
      (cv ? `, ${Math.round(cv.gap_ms)} ms as a client saw it` : "") +
      `, ${(rec.iterations || []).length} passes, ${mib(rec.transferred_bytes)} MiB sent` +
      `${rec.encrypted ? ", encrypted" : ""}, levers: ${levers.join(", ") || "none"}` +
      memoryText(rec.memory_check);
  }
  if (rec.phase === "failed") return `failed${took}: ${rec.reason ?? "no reason recorded"}`;
  return rec.phase;
}
