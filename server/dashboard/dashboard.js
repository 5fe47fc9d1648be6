// loraplex ops dashboard: polls /v1/stats and draws tiles, SVG line charts and tables.
// No build step, no third-party code, no innerHTML: every value from the server is set as text.
"use strict";

const REFRESH_MS = 2000;
const KEY_STORAGE = "loraplex.adminKey";
const SVG_NS = "http://www.w3.org/2000/svg";
const state = { window: 300, search: "", timer: null, inFlight: false };

const $ = (id) => document.getElementById(id);

// ---- formatting ----
function fmtNumber(x, digits = 1) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (Math.abs(x) >= 1e6) return (x / 1e6).toFixed(digits) + "M";
  if (Math.abs(x) >= 1e4) return (x / 1e3).toFixed(digits) + "k";
  return Number.isInteger(x) ? String(x) : x.toFixed(digits);
}
function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms";
  return s.toFixed(2) + " s";
}
function fmtPercent(x) {
  return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%";
}
function fmtBytes(b) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i += 1; }
  return (i === 0 ? b : b.toFixed(1)) + " " + units[i];
}
function fmtDuration(s) {
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min` : `${Math.floor(s)} s`;
}
function setText(id, text) { $(id).textContent = text; }

// ---- fetching ----
function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: "Bearer " + key } : {};
}

async function refresh() {
  if (state.inFlight) return;
  state.inFlight = true;
  const params = new URLSearchParams({ window: String(state.window), top: "10" });
  if (state.search) params.set("search", state.search);
  try {
    const response = await fetch("/v1/stats?" + params, { headers: authHeaders(), cache: "no-store" });
    const body = await response.json().catch(() => null);
    if (response.status === 401 || response.status === 403) {
      askForKey(body && body.error ? body.error.message : "An admin key is needed.");
      return;
    }
    if (!response.ok) throw new Error(body && body.error ? body.error.message : "HTTP " + response.status);
    $("key-form").hidden = true;
    render(body);
    setStatus("ok", "live");
  } catch (err) {
    setStatus("error", "unreachable: " + err.message);
  } finally {
    state.inFlight = false;
  }
}

function setStatus(kind, text) {
  const el = $("status");
  el.dataset.state = kind;
  el.textContent = text;
}

function askForKey(message) {
  setStatus("error", "needs an admin key");
  setText("key-error", message);
  $("key-form").hidden = false;
  $("key-input").focus();
}

// ---- rendering ----
function render(s) {
  setText("model", s.model + " · up " + fmtDuration(s.uptime_s));
  renderTiles(s);
  renderCharts(s.series);
  renderAdapterRows("busiest-adapters", s.adapters.busiest);
  renderTenants(s.tenants);
  renderMerged(s.adapters.merged);
  renderSearch(s.adapters);
  setText("updated", new Date(s.now * 1000).toLocaleTimeString());
}

function renderTiles(s) {
  const t = s.totals, e = s.engine, a = s.adapters;
  setText("requests-per-s", fmtNumber(t.requests_per_s, 2));
  setText("requests-total", `${t.requests} in ${fmtDuration(s.window_s)}`);
  setText("error-ratio", fmtPercent(t.error_ratio));
  setText("errors-total", `${t.errors} errors`);
  setText("tokens-per-s", fmtNumber(t.tokens_per_s, 1));
  setText("tokens-total", `${fmtNumber(t.generated_tokens)} tokens`);
  setText("ttft", `${fmtSeconds(t.ttft.p50_s)} / ${fmtSeconds(t.ttft.p99_s)}`);
  setText("itl", `${fmtSeconds(t.itl.p50_s)} / ${fmtSeconds(t.itl.p99_s)}`);
  setText("waiting", String(e.waiting));
  setText("running", `${e.running} / ${e.max_num_seqs}`);
  setText("running-max", `max ${Math.max(0, ...s.series.running)} in window`);
  setText("kv-usage", fmtPercent(e.kv_cache_usage));
  setText("preemptions", `${e.preemptions} preemptions`);
  setText("prefix-hit-rate", fmtPercent(e.prefix_cache_hit_rate_window));
  setText("prefix-cached", `${fmtPercent(e.prefix_cache_hit_rate)} since start · ${fmtBytes(e.prefix_cache_bytes)} cached`);
  setText("adapters-registered", fmtNumber(a.registered, 1));
  setText("tiers", `slot ${a.tiers.slot} · host ${a.tiers.host} · disk ${a.tiers.disk}` +
    (a.tiers.failed ? ` · failed ${a.tiers.failed}` : ""));
  setText("hit-rate", fmtPercent(a.hit_rate));
  setText("hit-rate-total", `${fmtPercent(a.hit_rate_total)} since start`);
  setText("load-latency", `${fmtSeconds(a.load_p50_s)} / ${fmtSeconds(a.load_p99_s)}`);
  setText("loads", `${a.loads} loads, ${a.slot_loads} into slots, ${a.load_failures} failed`);
  setText("merged-count", String(a.merged.length));
  setText("merged-bytes", fmtBytes(a.merged.reduce((sum, c) => sum + c.bytes, 0)));
}

function renderCharts(series) {
  const t = series.t;
  lineChart($("chart-requests"), t, [["requests/s", series.requests_per_s], ["errors/s", series.errors_per_s]], fmtNumber);
  lineChart($("chart-tokens"), t, [["tokens/s", series.tokens_per_s]], fmtNumber);
  lineChart($("chart-ttft"), t, [["p50", series.ttft_p50_s], ["p99", series.ttft_p99_s]], fmtSeconds);
  lineChart($("chart-itl"), t, [["p50", series.itl_p50_s], ["p99", series.itl_p99_s]], fmtSeconds);
  lineChart($("chart-queue"), t, [["waiting", series.waiting], ["running", series.running],
    ["merged copies", series.merged_copies]], fmtNumber);
  lineChart($("chart-kv"), t, [["KV used", series.kv_cache_usage.map((x) => 100 * x)]], (x) => (x > 0 && x < 1 ? x.toFixed(2) : fmtNumber(x, 1)) + "%");
}

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

// Draws named series (arrays aligned with t; null = no data) with a shared y axis from 0.
function lineChart(svg, t, named, format) {
  const width = svg.clientWidth || 400, height = svg.clientHeight || 160;
  const pad = { left: 52, right: 8, top: 16, bottom: 18 };
  const plotW = width - pad.left - pad.right, plotH = height - pad.top - pad.bottom;
  const values = named.flatMap(([, v]) => v.filter((x) => x !== null));
  const yMax = niceMax(Math.max(0, ...values));
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const x = (i) => pad.left + (t.length > 1 ? (i / (t.length - 1)) * plotW : plotW);
  const y = (v) => pad.top + plotH - (v / yMax) * plotH;
  for (const frac of [0, 0.5, 1]) {
    const yy = y(frac * yMax);
    svg.append(svgEl("line", { class: "grid", x1: pad.left, x2: width - pad.right, y1: yy, y2: yy }));
    svg.append(svgEl("text", { class: "axis", x: pad.left - 4, y: yy + 3, "text-anchor": "end" }, format(frac * yMax)));
  }
  if (t.length) {
    const label = (i, anchor) => svgEl("text", { class: "axis", x: x(i), y: height - 4, "text-anchor": anchor },
      new Date(t[i] * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }));
    svg.append(label(0, "start"), label(t.length - 1, "end"));
  }
  named.forEach(([name, series], k) => {
    for (const run of runsOf(series)) {
      const points = run.map((i) => `${x(i).toFixed(1)},${y(series[i]).toFixed(1)}`).join(" ");
      svg.append(svgEl(run.length > 1 ? "polyline" : "circle",
        run.length > 1 ? { class: `line s${k}`, points } : { class: `s${k}`, cx: x(run[0]), cy: y(series[run[0]]), r: 2 }));
    }
    const last = [...series].reverse().find((v) => v !== null);
    svg.append(svgEl("text", { class: `legend s${k}`, x: pad.left + 4 + k * 120, y: 11 },
      `${name}: ${last === undefined ? "–" : format(last)}`));
  });
  svg.setAttribute("aria-label", named.map(([name]) => name).join(", "));
}

function runsOf(series) {  // index runs without nulls, so gaps stay gaps
  const runs = [];
  let run = [];
  series.forEach((v, i) => {
    if (v === null) { if (run.length) runs.push(run); run = []; } else run.push(i);
  });
  if (run.length) runs.push(run);
  return runs;
}

function niceMax(v) {
  if (v <= 0) return 1;
  const step = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= v) return m * step;
  return 10 * step;
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function renderAdapterRows(tableId, adapters) {
  const rows = adapters.map((a) => {
    const tr = document.createElement("tr");
    const id = a.tenant === null ? `${a.name} (base)` : `${a.tenant}/${a.name}`;
    const badges = document.createElement("td");
    for (const [on, label] of [[a.merged, "merged"], [a.pinned, "pinned"]]) {
      if (!on) continue;
      const span = document.createElement("span");
      span.className = "badge";
      span.textContent = label;
      badges.append(span);
    }
    tr.append(cell(id, "id"), cell(a.version === null ? "" : "v" + a.version), cell(a.tier ?? ""),
      cell(String(a.requests), "num"), cell(fmtNumber(a.tokens), "num"), badges);
    tr.dataset.adapter = a.id;
    return tr;
  });
  fillBody(tableId, rows, 6, "no traffic in this window");
}

function renderTenants(tenants) {
  const rows = tenants.map((t) => {
    const tr = document.createElement("tr");
    tr.append(cell(t.tenant, "id"), cell(String(t.requests), "num"), cell(fmtNumber(t.tokens), "num"),
      cell(String(t.limit_hits), "num"), cell(fmtSeconds(t.queue_s_mean), "num"), cell(t.limits));
    return tr;
  });
  fillBody("busiest-tenants", rows, 6, "no traffic in this window");
}

function renderMerged(copies) {
  const rows = copies.map((c) => {
    const tr = document.createElement("tr");
    tr.append(cell(c.id + (c.pinned ? " (pinned)" : ""), "id"), cell(c.state), cell(fmtBytes(c.bytes), "num"),
      cell(String(c.leases), "num"));
    return tr;
  });
  fillBody("merged-copies", rows, 4, "none");
}

function renderSearch(adapters) {
  if (!state.search) {
    setText("search-count", "");
    fillBody("search-results", [], 6, "type to search all registered adapters");
    return;
  }
  const shown = adapters.matches ? adapters.matches.length : 0;
  setText("search-count", `${adapters.matches_total} match${adapters.matches_total === 1 ? "" : "es"}` +
    (adapters.matches_total > shown ? `, showing the ${shown} busiest` : ""));
  renderAdapterRows("search-results", adapters.matches || []);
}

function fillBody(tableId, rows, columns, emptyText) {
  const body = $(tableId).tBodies[0];
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = cell(emptyText, "muted");
    td.colSpan = columns;
    tr.append(td);
    rows = [tr];
  }
  body.replaceChildren(...rows);
}

// ---- wiring ----
function start() {
  setText("refresh-s", String(REFRESH_MS / 1000));
  $("window").addEventListener("change", (e) => { state.window = Number(e.target.value); refresh(); });
  let debounce = null;
  $("search").addEventListener("input", (e) => {
    clearTimeout(debounce);
    debounce = setTimeout(() => { state.search = e.target.value.trim(); refresh(); }, 250);
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key-input").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
    $("key-input").value = "";
    refresh();
  });
  $("change-key").addEventListener("click", () => askForKey(""));
  refresh();
  state.timer = setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", start);
