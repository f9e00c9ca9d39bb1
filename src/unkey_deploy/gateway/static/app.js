// unkey-deploy dashboard: every number on the page comes from the gateway's JSON API, called
// with the API key typed into the login form (kept in sessionStorage for this tab only).
"use strict";

const KEY = "unkey.apiKey";
const POLL_MS = 5000; // the real-time query (last 5 minutes per VM)
const SLOW_MS = 30000; // deployments and the bill
const LIVE_POINTS = 60; // points kept in a live chart (5 minutes at POLL_MS)
const MIB = 1 << 20;

const $ = (sel) => document.querySelector(sel);
const charts = new Map(); // vm_id -> {live, history}
let timers = [];

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function request(path, key, accept) {
  const res = await fetch(path, {
    headers: { Authorization: `Bearer ${key}`, Accept: accept },
    cache: "no-store",
  });
  if (!res.ok) {
    let msg = `HTTP ${res.status}`;
    try {
      const body = await res.json();
      if (body && body.error) msg = body.error.message;
    } catch (_) {
      // not JSON: keep the status
    }
    throw new ApiError(res.status, `${path}: ${msg}`);
  }
  return res;
}

async function api(path, key = sessionStorage.getItem(KEY)) {
  return (await request(path, key, "application/json")).json();
}

// A deployment's events so far (server-sent events, read once with follow=false).
async function events(id) {
  const res = await request(
    `/v1/deployments/${encodeURIComponent(id)}/events?follow=false`,
    sessionStorage.getItem(KEY),
    "text/event-stream",
  );
  const out = [];
  for (const block of (await res.text()).split("\n\n")) {
    const fields = {};
    for (const line of block.split("\n")) {
      const i = line.indexOf(":");
      if (i > 0) fields[line.slice(0, i)] = line.slice(i + 1).trim();
    }
    if (fields.data && fields.event !== "end") out.push(JSON.parse(fields.data));
  }
  return out;
}

function showError(err) {
  const box = $("#error");
  if (!err) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.textContent = err.message || String(err);
  box.hidden = false;
  if (err.status === 401) logout();
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

const mib = (bytes) => `${(Number(bytes) / MIB).toFixed(1)} MiB`;
const pct = (x) => `${Number(x).toFixed(1)} %`;
const time = (iso) => new Date(iso).toLocaleTimeString([], { hour12: false });
// amounts are decimal strings from the API, shown as they are (never computed with here)
const minus = (amount) => (/^[0.]+$/.test(amount) ? amount : `-${amount}`);
const thisMonth = () => new Date().toISOString().slice(0, 7); // UTC, as the API bills

// ---- deployments ---------------------------------------------------------------------------

async function refreshDeployments() {
  const { deployments } = await api("/v1/deployments");
  const body = $("#deployments tbody");
  body.replaceChildren();
  if (deployments.length === 0) {
    cell(body.insertRow(), "No deployments yet: unkey deploy app.yaml").colSpan = 5;
  }
  for (const d of deployments) {
    const row = body.insertRow();
    row.dataset.id = d.id;
    row.tabIndex = 0;
    cell(row, d.name, "name");
    cell(row, d.state, `state state-${d.state}`);
    cell(row, d.image, "image");
    cell(row, d.url || "—", "url");
    cell(row, new Date(d.created_at).toLocaleString(), "created");
    row.addEventListener("click", () => showDeployment(d.id).catch(showError));
  }
}

async function showDeployment(id) {
  const [{ deployment: d }, evs] = await Promise.all([
    api(`/v1/deployments/${encodeURIComponent(id)}`),
    events(id),
  ]);
  const box = $("#deployment-detail");
  box.replaceChildren();
  const h = document.createElement("h3");
  h.textContent = `${d.name} (${d.id})`;
  const dl = document.createElement("dl");
  const res = d.spec.resources || {};
  const rows = [
    ["State", d.state],
    ["Image", d.image],
    ["Resources", `${res.cpu ?? "?"} vCPU, ${res.memory ?? "?"}`],
    ["URL", d.url || "—"],
    ["Asset", d.asset_id || "—"],
    ["Updated", new Date(d.updated_at).toLocaleString()],
    ["Error", d.error ? d.error.message || JSON.stringify(d.error) : "—"],
  ];
  for (const [k, v] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = String(v);
    dl.append(dt, dd);
  }
  // its VMs, from the deployer's "vm" events, with whether each reports usage now
  const vms = evs.filter((e) => e.phase === "vm" && e.data && e.data.vm_id);
  const vmList = document.createElement("ul");
  vmList.className = "dep-vms";
  for (const e of vms) {
    const li = document.createElement("li");
    const live = document.querySelector(`#vms tr[data-vm="${CSS.escape(e.data.vm_id)}"]`);
    li.textContent = `${e.data.vm_id}: ${e.message}${live ? " (reporting usage)" : ""}`;
    vmList.append(li);
  }
  if (vms.length === 0) {
    const li = document.createElement("li");
    li.textContent = "no VM launched yet";
    vmList.append(li);
  }
  const evList = document.createElement("ol");
  evList.className = "events";
  for (const e of evs) {
    const li = document.createElement("li");
    li.textContent = `${new Date(e.at).toLocaleTimeString([], { hour12: false })} ${e.phase}: ${e.message}`;
    evList.append(li);
  }
  const vmH = document.createElement("h4");
  vmH.textContent = "VMs";
  const evH = document.createElement("h4");
  evH.textContent = `Events (${evs.length})`;
  box.append(h, dl, vmH, vmList, evH, evList);
  box.hidden = false;
}

// ---- VMs: status, live charts (real-time query), usage over time (5-minute rollups) --------

function lineChart(canvas, datasets) {
  return new Chart(canvas, {
    type: "line",
    data: { labels: [], datasets },
    options: {
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      interaction: { mode: "index", intersect: false },
      elements: { point: { radius: 2 } },
      scales: {
        pct: { type: "linear", position: "left", min: 0, title: { display: true, text: "%" } },
        mib: {
          type: "linear",
          position: "right",
          min: 0,
          grid: { drawOnChartArea: false },
          title: { display: true, text: "MiB" },
        },
      },
    },
  });
}

function seriesSet() {
  return [
    { label: "CPU %", yAxisID: "pct", borderColor: "#2563eb", data: [] },
    { label: "Memory %", yAxisID: "pct", borderColor: "#16a34a", data: [] },
    { label: "Network MiB", yAxisID: "mib", borderColor: "#ea580c", data: [] },
    { label: "Disk MiB", yAxisID: "mib", borderColor: "#9333ea", data: [] },
  ];
}

function chartsFor(vmId) {
  let c = charts.get(vmId);
  if (c) return c;
  const card = document.createElement("article");
  card.className = "vm-card";
  card.dataset.vm = vmId;
  const title = document.createElement("h3");
  title.textContent = vmId;
  const make = (caption, cls) => {
    const fig = document.createElement("figure");
    const cap = document.createElement("figcaption");
    cap.textContent = caption;
    const wrap = document.createElement("div");
    wrap.className = "chart";
    const canvas = document.createElement("canvas");
    canvas.className = cls;
    wrap.append(canvas);
    fig.append(cap, wrap);
    card.append(fig);
    return canvas;
  };
  card.append(title);
  const live = lineChart(make("Live (last 5 minutes, every 5 s)", "live"), seriesSet());
  const history = lineChart(make("Usage over time (5-minute rollups)", "history"), seriesSet());
  $("#vm-charts").append(card);
  c = { live, history };
  charts.set(vmId, c);
  return c;
}

function pushLive(chart, label, values) {
  chart.data.labels.push(label);
  values.forEach((v, i) => chart.data.datasets[i].data.push(v));
  if (chart.data.labels.length > LIVE_POINTS) {
    chart.data.labels.shift();
    chart.data.datasets.forEach((ds) => ds.data.shift());
  }
  chart.update("none");
}

async function pollUsage() {
  const since = $("#since").value;
  const u = await api(`/v1/usage?since=${encodeURIComponent(since)}`);
  const totals = new Map(u.vms.map((v) => [v.vm_id, v.memory_total_bytes]));
  const body = $("#vms tbody");
  body.replaceChildren();
  if (u.vms.length === 0) {
    cell(body.insertRow(), "No VM reported usage in the last 5 minutes").colSpan = 7;
  }
  const label = time(u.until);
  for (const v of u.vms) {
    const row = body.insertRow();
    row.dataset.vm = v.vm_id;
    cell(row, v.vm_id, "vm");
    cell(row, pct(v.avg_cpu), "num");
    cell(row, pct(v.max_cpu), "num");
    cell(row, `${mib(v.max_memory_bytes)} of ${mib(v.memory_total_bytes)}`, "num");
    cell(row, mib(v.network_rx_bytes + v.network_tx_bytes), "num");
    cell(row, mib(v.disk_read_bytes + v.disk_write_bytes), "num");
    cell(row, time(v.last_seen));
    const memPct = v.memory_total_bytes ? (100 * v.max_memory_bytes) / v.memory_total_bytes : 0;
    pushLive(chartsFor(v.vm_id).live, label, [
      v.avg_cpu,
      memPct,
      (v.network_rx_bytes + v.network_tx_bytes) / MIB,
      (v.disk_read_bytes + v.disk_write_bytes) / MIB,
    ]);
  }
  // usage over time: rebuilt from the rollup points on every poll
  const perVm = new Map();
  for (const p of u.points) {
    if (!perVm.has(p.vm_id)) perVm.set(p.vm_id, []);
    perVm.get(p.vm_id).push(p);
  }
  for (const [vmId, points] of perVm) {
    points.sort((a, b) => a.t.localeCompare(b.t));
    const total = totals.get(vmId);
    const h = chartsFor(vmId).history;
    h.data.labels = points.map((p) => time(p.t));
    const cols = [
      points.map((p) => p.avg_cpu),
      points.map((p) => (total ? (100 * p.avg_memory_bytes) / total : null)),
      points.map((p) => (p.network_rx_bytes + p.network_tx_bytes) / MIB),
      points.map((p) => (p.disk_read_bytes + p.disk_write_bytes) / MIB),
    ];
    cols.forEach((col, i) => (h.data.datasets[i].data = col));
    h.update("none");
  }
  $("#usage-updated").textContent = `updated ${label}`;
  $("#usage-updated").dataset.until = u.until; // which answer the table shows
}

// ---- bill ------------------------------------------------------------------------------------

async function refreshBill() {
  const month = thisMonth();
  const { invoice: inv } = await api(`/v1/bill?month=${month}`);
  $("#bill-month").textContent = `${inv.month} (${inv.currency})`;
  const body = $("#bill tbody");
  body.replaceChildren();
  if (inv.lines.length === 0) cell(body.insertRow(), "No usage billed this month").colSpan = 5;
  for (const ln of inv.lines) {
    const row = body.insertRow();
    row.className = "line";
    cell(row, ln.item, "item");
    cell(row, ln.quantity, "num");
    cell(row, ln.unit);
    cell(row, ln.unit_price, "num");
    cell(row, ln.amount, "num amount");
  }
  const foot = $("#bill tfoot");
  foot.replaceChildren();
  const sums = [
    ["Subtotal", inv.subtotal, "subtotal"],
    [`Discount (${inv.discount_pct} %)`, minus(inv.discount), "discount"],
    [`Credits applied (balance ${inv.credit_balance})`, minus(inv.credits_applied), "credits"],
    ["Total", inv.total, "total"],
  ];
  for (const [name, value, cls] of sums) {
    const row = foot.insertRow();
    row.className = cls;
    cell(row, name).colSpan = 4;
    cell(row, `${value} ${inv.currency}`, "num");
  }
}

// ---- session ---------------------------------------------------------------------------------

function every(ms, fn) {
  const run = () => fn().catch(showError);
  run();
  timers.push(setInterval(run, ms));
}

async function start() {
  const who = await api("/v1/whoami");
  $("#whoami").textContent = who.customer_id || "";
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#logout").hidden = false;
  if (typeof Chart === "undefined") {
    showError(new Error("Chart.js did not load (is Debian's libjs-chart.js installed?)"));
  } else {
    every(POLL_MS, pollUsage);
  }
  every(SLOW_MS, refreshDeployments);
  every(SLOW_MS, refreshBill);
}

function logout() {
  sessionStorage.removeItem(KEY);
  timers.forEach(clearInterval);
  timers = [];
  charts.forEach((c) => {
    c.live.destroy();
    c.history.destroy();
  });
  charts.clear();
  $("#vm-charts").replaceChildren();
  $("#app").hidden = true;
  $("#logout").hidden = true;
  $("#whoami").textContent = "";
  $("#login").hidden = false;
}

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const key = $("#api-key").value.trim();
  showError(null);
  try {
    await api("/v1/whoami", key); // check the key before keeping it
  } catch (err) {
    showError(err.status === 401 ? new Error("That API key was not accepted.") : err);
    return;
  }
  sessionStorage.setItem(KEY, key);
  $("#api-key").value = "";
  start().catch(showError);
});

$("#logout").addEventListener("click", logout);
$("#since").addEventListener("change", () => {
  charts.forEach((c) => {
    c.history.data.labels = [];
    c.history.update("none");
  });
  pollUsage().catch(showError);
});

if (sessionStorage.getItem(KEY)) start().catch(showError);
