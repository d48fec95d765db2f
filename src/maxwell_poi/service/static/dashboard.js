// Maxwell PoI dashboard: reads GET /v1/admin/dashboard every 5 s and draws tables and SVG plots.
// Plain JS, no library. Every value from the server goes into the page as text (textContent),
// never as HTML: agent ids and reasons are not trusted markup.
"use strict";

const TOKEN_KEY = "maxwell-poi-admin-token";
const REFRESH_MS = 5000;
const DATA_URL = "v1/admin/dashboard?limit=50";
const SVG_NS = "http://www.w3.org/2000/svg";
const VERDICTS = ["affirming", "warning", "contraindicated", "open"];
const PALETTE = ["#2f6fd6", "#e0712b", "#2a9d8f", "#c2407a", "#6a4fb3", "#8c6d1f", "#1f8ac0", "#d1495b",
  "#5b8c2a", "#7f7f7f"];
const MAX_SERIES = 16;

// -- the token: from the URL fragment (never sent to a server) into this tab's sessionStorage ------

function takeToken() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const given = fragment.get("token");
  if (given) {
    sessionStorage.setItem(TOKEN_KEY, given);
    history.replaceState(null, "", location.pathname + location.search); // out of the address bar
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

// -- small DOM helpers --------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function svgEl(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  return node;
}

function fillBody(table, rows, columns, emptyText) {
  const body = table.tBodies[0];
  body.replaceChildren();
  if (!rows.length) {
    body.append(el("tr", {}, el("td", { class: "empty", colspan: columns, text: emptyText })));
  }
  for (const row of rows) body.append(row);
}

// -- formatting -----------------------------------------------------------------------------------

const pad2 = (n) => String(n).padStart(2, "0");
function clock(unix) {
  if (unix === null || unix === undefined) return "—";
  const d = new Date(unix * 1000);
  return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
}
function dateTime(unix) {
  if (unix === null || unix === undefined) return "—";
  const d = new Date(unix * 1000);
  return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${clock(unix)}`;
}
function ago(unix, now) {
  if (unix === null || unix === undefined) return "never";
  const s = Math.max(0, now - unix);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}
const integer = (n) => (n === null || n === undefined ? "—" : Math.round(n).toLocaleString("en-US"));
function fixed(n, digits) {
  return n === null || n === undefined ? "—" : Number(n).toFixed(digits);
}
function compact(n) {
  const a = Math.abs(n);
  if (a >= 1e9) return `${+(n / 1e9).toFixed(2)}G`;
  if (a >= 1e6) return `${+(n / 1e6).toFixed(2)}M`;
  if (a >= 1e4) return `${+(n / 1e3).toFixed(1)}k`;
  return `${+n.toPrecision(4)}`;
}

function verdictPill(verdict) {
  const name = verdict || "open";
  return el("span", { class: `pill v-${name}`, text: verdict || "no verdict" });
}

// -- tables ---------------------------------------------------------------------------------------

function agentRow(agent) {
  const counts = VERDICTS.map((v) => {
    const n = agent.leases[v] || 0;
    return el("td", { class: `num ${n ? `c-${v}` : "zero"}`, "data-count": v, text: String(n) });
  });
  return el("tr", { "data-agent": agent.agent_id },
    el("td", { class: "id", text: agent.agent_id }),
    el("td", { class: "muted", text: dateTime(agent.enrolled_at) }),
    el("td", { class: "num", text: integer(agent.wallet_micro) }),
    el("td", { class: "num", text: integer(agent.escrow_micro) }),
    ...counts);
}

function nodeRow(node, now) {
  return el("tr", { "data-node": node.node_id },
    el("td", { class: "id", text: node.node_id }),
    el("td", { class: "muted", text: dateTime(node.enrolled_at) }),
    el("td", { text: ago(node.last_seen, now), title: dateTime(node.last_seen) }),
    el("td", { class: "num", text: integer(node.headroom_j) }));
}

function layerBadges(layers) {
  const cell = el("td", { class: "layers" });
  for (const layer of layers) {
    const short = layer.layer.split("-")[0];
    cell.append(el("span", { class: `s-${layer.status}`, title: `${layer.layer}: ${layer.status} — ${layer.reason}`,
      "data-layer": layer.layer, text: short }));
  }
  return cell;
}

function leaseRow(lease) {
  const verdict = el("td", { class: "verdict", "data-verdict": lease.verdict || "open" }, verdictPill(lease.verdict));
  if (lease.verdict && lease.final === false) verdict.append(el("span", { class: "muted", text: " audit pending" }));
  const stake = lease.stake_outcome || "—";
  return el("tr", { "data-lease": lease.lease_id },
    el("td", { class: "id", title: lease.lease_id, text: lease.lease_id.slice(0, 12) }),
    el("td", { text: lease.agent }),
    el("td", { text: lease.node }),
    el("td", { text: lease.model }),
    el("td", { text: lease.status }),
    el("td", { text: lease.tier }),
    verdict,
    layerBadges(lease.layers),
    el("td", { class: "num", text: fixed(lease.energy_j, 3) }),
    el("td", { class: "num", text: integer(lease.charge_micro) }),
    el("td", { class: `stake s-${stake}`, text: stake }),
    el("td", { class: "muted", text: clock(lease.appraised_at) }),
    el("td", { class: "reason", text: lease.reason || "" }));
}

function completionRow(c) {
  const paid = c.status === "paid";
  return el("tr", { "data-completion": c.lease_id },
    el("td", { class: "id", title: c.lease_id, text: c.lease_id.slice(0, 12) }),
    el("td", { text: c.requester }),
    el("td", { text: c.endpoint }),
    el("td", { class: `stake s-${paid ? "released" : c.status === "cut" ? "slashed" : "held"}`, text: c.status }),
    el("td", { class: "num", text: integer(c.tokens) }),
    el("td", { class: "num", text: integer(c.price_micro_per_token) }),
    el("td", { class: "num", text: integer(c.charge_micro) }),
    el("td", { class: "muted", text: clock(c.created_at) }),
    el("td", { class: "reason", text: c.reason || "" }));
}

// -- plots: axes, ticks and lines drawn by hand ---------------------------------------------------

function niceStep(span, target) {
  const raw = span / Math.max(1, target);
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * power >= raw) return m * power;
  return 10 * power;
}

function timeStep(span, target) {
  const raw = span / Math.max(1, target);
  for (const s of [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400]) {
    if (s >= raw) return s;
  }
  return niceStep(span, target);
}

function extent(values, padZero) {
  let lo = Math.min(...values), hi = Math.max(...values);
  if (padZero) lo = Math.min(lo, 0);
  if (hi === lo) { hi = lo + (Math.abs(lo) || 1) * 0.5; lo = padZero ? Math.min(0, lo) : lo - (hi - lo); }
  return [lo, hi];
}

function ticks(lo, hi, step) {
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

// opts: {height, x: {label, time, zero}, y: {label, zero, format}, series: [{key, color, dash, step, points, markers}]}
function drawPlot(svg, opts) {
  const width = Math.max(320, svg.parentNode.clientWidth || 600);
  const height = opts.height;
  const m = { left: 62, right: 14, top: 10, bottom: 38 };
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("height", height);
  const all = opts.series.flatMap((s) => s.points);
  if (!all.length) {
    svg.append(svgEl("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "no-data" },
      opts.empty || "no data yet"));
    return;
  }
  const [x0, x1] = extent(all.map((p) => p[0]), opts.x.zero);
  const pw = width - m.left - m.right, ph = height - m.top - m.bottom;
  const [yLo, yHi] = extent(all.map((p) => p[1]), opts.y.zero);
  const yStep = niceStep(yHi - yLo, ph / 40);
  const y0 = Math.floor(yLo / yStep) * yStep, y1 = Math.ceil(yHi / yStep) * yStep; // ends on a tick
  const sx = (x) => m.left + ((x - x0) / (x1 - x0)) * pw;
  const sy = (y) => m.top + ph - ((y - y0) / (y1 - y0)) * ph;

  const xStep = opts.x.time ? timeStep(x1 - x0, pw / 110) : niceStep(x1 - x0, pw / 80);
  for (const v of ticks(x0, x1, xStep)) {
    const x = sx(v);
    svg.append(svgEl("line", { x1: x, x2: x, y1: m.top, y2: m.top + ph, class: "grid-line" }));
    const label = opts.x.time ? clock(v) : compact(v);
    svg.append(svgEl("text", { x, y: m.top + ph + 15, "text-anchor": "middle", class: "tick" }, label));
  }
  for (const v of ticks(y0, y1, yStep)) {
    const y = sy(v);
    svg.append(svgEl("line", { x1: m.left, x2: m.left + pw, y1: y, y2: y, class: "grid-line" }));
    svg.append(svgEl("text", { x: m.left - 6, y: y + 4, "text-anchor": "end", class: "tick" },
      (opts.y.format || compact)(v)));
  }
  svg.append(svgEl("line", { x1: m.left, x2: m.left + pw, y1: m.top + ph, y2: m.top + ph, class: "axis" }));
  svg.append(svgEl("line", { x1: m.left, x2: m.left, y1: m.top, y2: m.top + ph, class: "axis" }));
  svg.append(svgEl("text", { x: m.left + pw / 2, y: height - 4, "text-anchor": "middle", class: "axis-title" },
    opts.x.label));
  const yMid = m.top + ph / 2;
  svg.append(svgEl("text", { x: 12, y: yMid, transform: `rotate(-90 12 ${yMid})`, "text-anchor": "middle",
    class: "axis-title" }, opts.y.label));

  for (const s of opts.series) {
    if (!s.points.length) continue;
    let d = "";
    s.points.forEach(([x, y], i) => {
      const px = sx(x).toFixed(1), py = sy(y).toFixed(1);
      if (i === 0) d += `M${px},${py}`;
      else if (s.step) d += `H${px}V${py}`; // a balance holds until the next entry
      else d += `L${px},${py}`;
    });
    const attrs = { d, class: "series", stroke: s.color, "data-series": s.key };
    if (s.dash) attrs["stroke-dasharray"] = s.dash;
    const line = svgEl("path", attrs);
    line.append(svgEl("title", {}, s.key)); // the browser's own tooltip names the line
    svg.append(line);
    if (s.markers) {
      for (const [x, y] of s.points) {
        svg.append(svgEl("circle", { cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: 2.2, fill: s.color,
          class: "marker" }));
      }
    }
  }
}

// -- balances over time ---------------------------------------------------------------------------

const DASH = { wallet: null, escrow: "6 4", revenue: "2 3" };

function balanceStyle(series, agentIndex) {
  const [, owner] = series.account.split(/:(.*)/s);
  if (series.kind === "revenue") {
    return { color: series.account.endsWith("slashed") ? "#b42323" : "#334155", dash: DASH.revenue, owner };
  }
  return { color: PALETTE[agentIndex.get(owner) % PALETTE.length], dash: DASH[series.kind], owner };
}

function swatch(dashClass, color) {
  const mark = el("span", { class: `swatch ${dashClass}` });
  mark.style.borderTopColor = color; // CSSOM, not a style attribute: the page's CSP allows no inline style
  return mark;
}

function balancePlot(svgId, legendId, series) {
  drawPlot(document.getElementById(svgId), {
    height: 250, series, empty: "no money has moved yet",
    x: { label: "time (local)", time: true },
    y: { label: "balance (µ)", zero: true },
  });
  const legend = document.getElementById(legendId);
  legend.replaceChildren();
  for (const s of series) {
    const dashClass = s.dash === DASH.escrow ? "dashed" : s.dash === DASH.revenue ? "dotted" : "";
    const now = s.points[s.points.length - 1][1];
    legend.append(el("span", { "data-series": s.key, title: `${s.key}: ${integer(now)} µ now` },
      swatch(dashClass, s.color), s.key, el("span", { class: "now", text: ` ${integer(now)}` })));
  }
}

function renderBalances(data) {
  const agentIndex = new Map(data.agents.map((a, i) => [a.agent_id, i]));
  const moving = data.balances.filter((s) => s.points.length > 1);
  // the busiest accounts first; the rest are counted, not drawn
  const drawn = moving.sort((a, b) => b.points.length - a.points.length).slice(0, MAX_SERIES)
    .sort((a, b) => a.account.localeCompare(b.account));
  const series = drawn.map((s) => {
    const style = balanceStyle(s, agentIndex);
    return { key: s.account, kind: s.kind, color: style.color, dash: style.dash, step: true, points: s.points };
  });
  balancePlot("balances-wallets", "legend-wallets", series.filter((s) => s.kind === "wallet"));
  balancePlot("balances-held", "legend-held", series.filter((s) => s.kind !== "wallet"));
  const hidden = moving.length - drawn.length;
  document.getElementById("balances-count").textContent = `${drawn.length} of ${data.balances.length} accounts` +
    (hidden > 0 ? ` (${hidden} busy accounts not drawn)` : "") + " · newest ledger entries, stepped to now";
}

// -- traces ---------------------------------------------------------------------------------------

function traceCard(trace) {
  const card = el("div", { class: "trace", "data-trace": trace.lease_id });
  card.append(el("header", {},
    el("span", { class: "id", title: trace.lease_id, text: trace.lease_id.slice(0, 12) }),
    el("span", { text: `${trace.agent} on ${trace.node}` }),
    el("span", { class: "muted", text: trace.model }),
    verdictPill(trace.verdict)));
  if (trace.error) {
    card.append(el("div", { class: "error", text: `evidence not readable: ${trace.error}` }));
    return card;
  }
  const t = trace.stream_t, cpu = trace.stream_cpu_s;
  const window = t.length > 1 ? t[t.length - 1] - t[0] : 0;
  const cpuWindow = cpu.length > 1 ? cpu[cpu.length - 1] - cpu[0] : 0;
  const perToken = trace.tokens > 1 ? `${(1000 * cpuWindow / (trace.tokens - 1)).toFixed(1)} ms CPU/token` : "";
  card.append(el("div", { class: "facts", text: [`${trace.tokens} tokens`, `decode ${window.toFixed(3)} s`,
    `CPU ${cpuWindow.toFixed(3)} s`, perToken, `lease wall ${fixed(trace.wall_s, 3)} s`,
    `accounting: ${trace.accounting}`].filter(Boolean).join(" · ") }));
  const tokens = el("div", {}, svgEl("svg", { class: "plot trace-tokens" }));
  const cpuPlot = el("div", {}, svgEl("svg", { class: "plot trace-cpu" }));
  card.append(el("div", { class: "pair" }, tokens, cpuPlot));
  card.plots = () => {
    drawPlot(tokens.firstChild, {
      height: 190, empty: "no streamed tokens",
      x: { label: "arrival (s since lease start)", zero: true }, y: { label: "token index", zero: true },
      series: [{ key: "tokens", color: "#2f6fd6", markers: t.length <= 200,
        points: t.map((x, i) => [x, trace.index[i]]) }],
    });
    drawPlot(cpuPlot.firstChild, {
      height: 190, empty: "no CPU readings",
      x: { label: "arrival (s since lease start)", zero: true }, y: { label: "sandbox CPU s", zero: true },
      series: [{ key: "cpu", color: "#e0712b", markers: cpu.length <= 200,
        points: cpu.map((c, i) => [t[i], c - cpu[0]]) }],
    });
  };
  return card;
}

function renderTraces(traces) {
  const box = document.getElementById("traces");
  box.replaceChildren();
  if (!traces.length) box.append(el("p", { class: "muted", text: "no receipts taken in yet" }));
  const cards = traces.map(traceCard);
  box.append(...cards);
  for (const card of cards) if (card.plots) card.plots(); // after insertion: the plots need a width
  document.getElementById("traces-count").textContent = `newest ${traces.length} leases with a receipt`;
}

// -- the whole page -------------------------------------------------------------------------------

function renderSummary(data) {
  const tally = { affirming: 0, warning: 0, contraindicated: 0, open: 0 };
  for (const lease of data.leases) tally[lease.verdict || "open"] += 1;
  const box = document.getElementById("summary");
  box.replaceChildren();
  const item = (k, v, id) => el("span", { id }, el("span", { class: "k", text: k }), el("b", { text: String(v) }));
  box.append(item("agents", data.agents.length, "sum-agents"), item("nodes", data.nodes.length, "sum-nodes"),
    item("leases shown", data.leases.length, "sum-leases"));
  for (const v of VERDICTS) box.append(el("span", { class: `pill v-${v}`, "data-total": v, text: `${tally[v]} ${v}` }));
}

function render(data) {
  const now = data.generated_at;
  renderSummary(data);
  fillBody(document.getElementById("agents-table"), data.agents.map(agentRow), 8, "no agents enrolled");
  fillBody(document.getElementById("nodes-table"), data.nodes.map((n) => nodeRow(n, now)), 4, "no nodes enrolled");
  fillBody(document.getElementById("leases-table"), data.leases.map(leaseRow), 13, "no leases issued yet");
  document.getElementById("agents-count").textContent = `${data.agents.length} (at most ${data.limits.agents})`;
  document.getElementById("nodes-count").textContent = `${data.nodes.length}`;
  document.getElementById("leases-count").textContent = `newest ${data.leases.length}, newest first`;
  const completions = data.completions || [];
  fillBody(document.getElementById("completions-table"), completions.map(completionRow), 9,
    "no completions through the OpenAI gateway yet");
  document.getElementById("completions-count").textContent = `newest ${completions.length}`;
  renderBalances(data);
  renderTraces(data.traces);
}

function setState(state, text) {
  document.body.dataset.state = state;
  document.getElementById("status").textContent = text;
}

function showNotice(title, ...paragraphs) {
  const box = document.getElementById("auth-message");
  box.replaceChildren(el("h3", { text: title }));
  for (const parts of paragraphs) {
    const p = el("p");
    for (const part of parts) p.append(typeof part === "string" ? part : el("code", { text: part.code }));
    box.append(p);
  }
  box.hidden = false;
  document.getElementById("content").hidden = true;
}

const HOW = [["Open this page as ", { code: "/dashboard#token=<admin token>" }, ". The part after ",
  { code: "#" }, " is never sent to the server; the page keeps the token in this tab's sessionStorage and sends it as ",
  { code: "Authorization: Bearer <admin token>" }, "."],
["The admin token is the one ", { code: "poi serve" }, " was started with (", { code: "--admin-token" }, " or ",
  { code: "POI_SERVE_ADMIN_TOKEN" }, "), else the file ", { code: "$POI_HOME/admin.token" }, " on its host."]];

function noToken() {
  setState("no-token", "no admin token");
  showNotice("No admin token: this dashboard expects one", ...HOW);
}

function refused(status, body) {
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("forget-token").hidden = true;
  const error = (body && body.error) || {};
  setState("refused", `token refused (${status})`);
  showNotice(`The admin token was refused (HTTP ${status})`,
    ["The server expected ", { code: error.expected || "Authorization: Bearer <the admin token>" }, " and got ",
      { code: error.got || "something else" }, "."], ...HOW);
}

async function refresh(token) {
  let response;
  try {
    response = await fetch(DATA_URL, { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
  } catch (exc) {
    setState("stale", `control plane unreachable (${exc.message}); retrying`);
    return true;
  }
  const body = await response.json().catch(() => null);
  if (response.status === 401 || response.status === 403) {
    refused(response.status, body);
    return false; // a refused token will not start working: stop asking
  }
  if (!response.ok || !body) {
    const why = body && body.error ? body.error.message : `HTTP ${response.status}`;
    setState("stale", `refresh failed: ${why}; retrying`);
    return true;
  }
  document.getElementById("auth-message").hidden = true;
  document.getElementById("content").hidden = false;
  render(body);
  setState("ok", `updated ${clock(body.generated_at)} · every ${REFRESH_MS / 1000} s`);
  return true;
}

async function loop(token) {
  if (await refresh(token)) setTimeout(() => loop(token), REFRESH_MS);
}

function start() {
  const token = takeToken();
  const forget = document.getElementById("forget-token");
  forget.addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); location.reload(); });
  if (!token) return noToken();
  forget.hidden = false;
  loop(token);
}

start();
