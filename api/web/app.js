// The registry's relay explorer. It reads the public JSON API only
// (/v1/market, /v1/relays, /v1/relays/{key}) and renders with textContent
// and DOM nodes, never HTML strings, because relays choose some of the text
// it shows.
"use strict";

/** Relays per listing request (the API's largest page). */
const PAGE_LIMIT = 500;
/** At most this many pages are read: 10,000 relays. */
const MAX_PAGES = 20;
/** How often the open view is read again. */
const REFRESH_MS = 30000;
const SVG = "http://www.w3.org/2000/svg";

const view = {
  relays: [],
  sort: { key: "price", direction: 1 },
  refreshTimer: null,
};

/** The value each sortable column orders by; ties go by key. */
const SORT_KEYS = {
  region: (r) => r.region,
  price: (r) => r.pricePerGib,
  reputation: (r) => r.reputation,
  value: (r) => r.value,
  load: (r) => r.load,
  sessions: (r) => r.sessions,
};

async function getJson(path) {
  const response = await fetch(path, { headers: { accept: "application/json" } });
  if (!response.ok) {
    let reason = `HTTP ${response.status}`;
    try {
      const body = await response.json();
      if (body && body.message) reason = `${body.code}: ${body.message}`;
    } catch (_) {
      // The status is reason enough.
    }
    throw new Error(`${path}: ${reason}`);
  }
  return response.json();
}

/** Every registered relay, live or not, from the paged listing. */
async function fetchRelays() {
  const relays = [];
  let cursor = null;
  for (let page = 0; page < MAX_PAGES; page += 1) {
    const query = new URLSearchParams({ live: "false", sort: "price", limit: String(PAGE_LIMIT) });
    if (cursor) query.set("cursor", cursor);
    const body = await getJson(`/v1/relays?${query}`);
    relays.push(...body.relays.map(relayRow));
    cursor = body.next_cursor;
    if (!cursor) break;
  }
  return relays;
}

/** The fields the explorer shows, from one listed relay. */
function relayRow(listed) {
  const advert = listed.advert.advert;
  return {
    key: advert.relay,
    region: advert.region,
    address: advert.address,
    priceText: listed.price_per_gib,
    // Numbers only order and place the dots; the text shown is the exact decimal.
    pricePerGib: Number(listed.price_per_gib),
    reputation: listed.reputation.score,
    value: listed.value_score,
    load: listed.load_bytes_per_sec,
    sessions: listed.sessions,
    live: listed.live,
  };
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function svgElement(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

function shortKey(key) {
  return `${key.slice(0, 8)}…${key.slice(-4)}`;
}

function formatRate(bytesPerSec) {
  const units = ["B/s", "kB/s", "MB/s", "GB/s"];
  let value = bytesPerSec;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}

function formatBytes(bytes) {
  return formatRate(bytes).replace("/s", "");
}

function formatScore(score) {
  return Number(score).toFixed(3);
}

function relayLink(key, text) {
  const link = element("a", text);
  link.href = `#/relays/${key}`;
  return link;
}

function showError(error) {
  const banner = document.getElementById("error");
  if (error) {
    banner.textContent = `Cannot read the registry: ${error.message}`;
    banner.hidden = false;
  } else {
    banner.hidden = true;
  }
}

// ---- The explorer: totals, chart and table ----

function renderTotals(totals) {
  const list = document.getElementById("totals");
  const items = [
    ["Live relays", `${totals.live_relays} of ${totals.relays}`],
    ["Load now", formatRate(totals.load_bytes_per_sec)],
    ["Active channels", `${totals.open_channels} open, ${totals.closing_channels} closing`],
    ["In escrow", totals.in_escrow],
    ["Settled", totals.settled],
    ["Registry fees", totals.fees],
    ["Deposited", totals.deposited],
  ];
  list.replaceChildren(
    ...items.map(([label, value]) => {
      const item = element("div");
      item.append(element("dt", label), element("dd", value));
      return item;
    }),
  );
}

function sortedRelays() {
  const { key, direction } = view.sort;
  const valueOf = SORT_KEYS[key];
  return [...view.relays].sort((a, b) => {
    const x = valueOf(a);
    const y = valueOf(b);
    const order = x < y ? -1 : x > y ? 1 : 0;
    return order * direction || (a.key < b.key ? -1 : 1);
  });
}

function renderTable() {
  for (const header of document.querySelectorAll("#relays th[data-sort]")) {
    const sorted = header.dataset.sort === view.sort.key;
    header.setAttribute("aria-sort", sorted ? (view.sort.direction > 0 ? "ascending" : "descending") : "none");
  }
  const rows = sortedRelays().map((relay) => {
    const row = element("tr");
    row.dataset.key = relay.key;
    const name = element("td");
    name.append(relayLink(relay.key, shortKey(relay.key)));
    const status = relay.live ? element("td", "live", "status-live") : element("td", "down", "status-down");
    row.append(
      name,
      element("td", relay.region),
      element("td", relay.priceText, "num"),
      element("td", formatScore(relay.reputation), "num"),
      element("td", Number(relay.value).toPrecision(3), "num"),
      element("td", formatRate(relay.load), "num"),
      element("td", relay.sessions, "num"),
      status,
    );
    return row;
  });
  document.querySelector("#relays tbody").replaceChildren(...rows);
  document.getElementById("relay-count").textContent = `(${view.relays.length})`;
}

/** A scale from a domain to a pixel range; logarithmic for wide price ranges. */
function scale(min, max, from, to, logarithmic) {
  const f = logarithmic ? Math.log10 : (x) => x;
  const low = f(min);
  const span = f(max) - low || 1;
  return (x) => from + ((f(x) - low) / span) * (to - from);
}

function renderChart() {
  const width = 720;
  const height = 300;
  const margin = { left: 56, right: 20, top: 16, bottom: 44 };
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "Price per GiB against reputation" });
  const prices = view.relays.map((r) => r.pricePerGib).filter((p) => p > 0);
  let minPrice = prices.length ? Math.min(...prices) : 0.001;
  let maxPrice = prices.length ? Math.max(...prices) : 1;
  const logarithmic = maxPrice / minPrice > 50;
  if (!logarithmic) minPrice = 0;
  if (maxPrice === minPrice) maxPrice = minPrice + 1;
  const x = scale(minPrice, maxPrice, margin.left, width - margin.right, logarithmic);
  const y = scale(0, 1, height - margin.bottom, margin.top, false);

  for (const score of [0, 0.25, 0.5, 0.75, 1]) {
    svg.append(svgElement("line", { class: "grid", x1: margin.left, x2: width - margin.right, y1: y(score), y2: y(score) }));
    const label = svgElement("text", { x: margin.left - 8, y: y(score) + 4, "text-anchor": "end" });
    label.textContent = score.toFixed(2);
    svg.append(label);
  }
  const ticks = logarithmic
    ? Array.from({ length: Math.floor(Math.log10(maxPrice)) - Math.ceil(Math.log10(minPrice)) + 1 }, (_, i) => 10 ** (Math.ceil(Math.log10(minPrice)) + i))
    : [0, 0.25, 0.5, 0.75, 1].map((t) => minPrice + t * (maxPrice - minPrice));
  for (const tick of ticks) {
    const label = svgElement("text", { x: x(tick), y: height - margin.bottom + 16, "text-anchor": "middle" });
    label.textContent = Number(tick.toPrecision(3)).toString();
    svg.append(label);
  }
  svg.append(svgElement("line", { class: "axis", x1: margin.left, x2: width - margin.right, y1: y(0), y2: y(0) }));
  svg.append(svgElement("line", { class: "axis", x1: margin.left, x2: margin.left, y1: y(0), y2: y(1) }));
  const xTitle = svgElement("text", { x: (margin.left + width - margin.right) / 2, y: height - 6, "text-anchor": "middle" });
  xTitle.textContent = `price per GiB${logarithmic ? " (log scale)" : ""}`;
  const yTitle = svgElement("text", { x: 14, y: (margin.top + height - margin.bottom) / 2, "text-anchor": "middle", transform: `rotate(-90 14 ${(margin.top + height - margin.bottom) / 2})` });
  yTitle.textContent = "reputation";
  svg.append(xTitle, yTitle);

  for (const relay of view.relays) {
    const dot = svgElement("circle", {
      class: `dot ${relay.live ? "live" : "down"}`,
      cx: x(Math.max(relay.pricePerGib, logarithmic ? minPrice : 0)),
      cy: y(relay.reputation),
      r: 6,
      "data-key": relay.key,
    });
    const title = svgElement("title", {});
    title.textContent = `${shortKey(relay.key)} (${relay.region}): ${relay.priceText} per GiB, reputation ${formatScore(relay.reputation)}`;
    dot.append(title);
    dot.addEventListener("click", () => {
      window.location.hash = `#/relays/${relay.key}`;
    });
    svg.append(dot);
  }
  document.getElementById("chart").replaceChildren(svg);
}

async function showExplorer() {
  const [totals, relays] = await Promise.all([getJson("/v1/market"), fetchRelays()]);
  view.relays = relays;
  renderTotals(totals);
  renderChart();
  renderTable();
}

// ---- One relay ----

function factRows(table, rows) {
  table.replaceChildren(
    ...rows.map(([label, value]) => {
      const row = element("tr");
      row.append(element("th", label), value instanceof Node ? wrap("td", value) : element("td", value));
      return row;
    }),
  );
}

function wrap(tag, child) {
  const node = element(tag);
  node.append(child);
  return node;
}

function renderUptime(history) {
  // The API lists only hours with a heartbeat; the chart shows all 24.
  const byHour = new Map(history.map((h) => [new Date(h.hour).getTime(), h.minutes_up]));
  const hourMs = 3600 * 1000;
  const thisHour = Math.floor(Date.now() / hourMs) * hourMs;
  const width = 720;
  const height = 140;
  const margin = { left: 36, right: 8, top: 8, bottom: 24 };
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "Minutes up per hour" });
  const slot = (width - margin.left - margin.right) / 24;
  const plot = height - margin.top - margin.bottom;
  for (let i = 0; i < 24; i += 1) {
    const hour = thisHour - (23 - i) * hourMs;
    const minutes = byHour.get(hour) || 0;
    const barHeight = Math.max((minutes / 60) * plot, 2);
    const kind = minutes >= 60 ? "" : minutes > 0 ? " partial" : " none";
    const bar = svgElement("rect", { class: `bar${kind}`, x: margin.left + i * slot + 2, width: slot - 4, y: margin.top + plot - barHeight, height: barHeight });
    const title = svgElement("title", {});
    title.textContent = `${new Date(hour).toISOString().slice(0, 16).replace("T", " ")} UTC: ${minutes} of 60 minutes`;
    bar.append(title);
    svg.append(bar);
    if (i % 6 === 5 || i === 23) {
      const label = svgElement("text", { x: margin.left + i * slot + slot / 2, y: height - 6, "text-anchor": "middle" });
      label.textContent = i === 23 ? "now" : `-${23 - i} h`;
      svg.append(label);
    }
  }
  for (const minutes of [0, 60]) {
    const label = svgElement("text", { x: margin.left - 6, y: margin.top + plot - (minutes / 60) * plot + 4, "text-anchor": "end" });
    label.textContent = `${minutes}`;
    svg.append(label);
  }
  document.getElementById("uptime").replaceChildren(svg);
}

async function showRelay(key) {
  const relay = await getJson(`/v1/relays/${encodeURIComponent(key)}`);
  const advert = relay.advert.advert;
  const reputation = relay.reputation;
  document.getElementById("relay-key").textContent = advert.relay;
  const status = relay.live ? element("span", "live", "status-live") : element("span", "down", "status-down");
  factRows(document.getElementById("relay-facts"), [
    ["Status", status],
    ["Address", advert.address],
    ["Region", advert.region],
    ["Price per GiB", relay.price_per_gib],
    ["Price per byte", advert.price_per_byte],
    ["Credit window", formatBytes(advert.credit_window_bytes)],
    ["Capacity", formatRate(advert.capacity_bytes_per_sec)],
    ["Load now", formatRate(relay.load_bytes_per_sec)],
    ["Sessions now", relay.sessions],
    ["Last heartbeat", relay.last_heartbeat ? new Date(relay.last_heartbeat).toLocaleString() : "never"],
  ]);
  factRows(document.getElementById("relay-reputation"), [
    ["Score", formatScore(reputation.score)],
    ["Value (score discounted by price)", Number(relay.value_score).toPrecision(3)],
    ["Uptime, 24 h", formatScore(reputation.uptime_24h)],
    ["Reachability in probes, 24 h", formatScore(reputation.reachability_24h)],
    ["Probe round trip (median)", reputation.probe_rtt_ms === null ? "no probe yet" : `${reputation.probe_rtt_ms.toFixed(2)} ms`],
    ["Paid volume, 30 days", reputation.paid_volume_30d],
    ["Paying clients, 30 days", reputation.paying_clients_30d],
    ["Settled vouchers, 30 days", reputation.settled_vouchers_30d],
    ["Rejected vouchers, 30 days", reputation.rejected_vouchers_30d],
    ["Age", `${reputation.age_days.toFixed(2)} days`],
    ["Newcomer floor", reputation.newcomer ? "yes: new, reachable and up in the registry's own probes" : "no"],
  ]);
  renderUptime(relay.uptime_history);
}

// ---- Routing ----

/** Renders the view the address names: `#/relays/{key}` or the explorer. */
async function render() {
  const main = document.getElementById("main");
  const match = /^#\/relays\/([0-9a-f]{64})$/.exec(window.location.hash);
  document.getElementById("explorer").hidden = Boolean(match);
  document.getElementById("relay").hidden = !match;
  document.body.dataset.view = match ? "relay" : "explorer";
  try {
    if (match) {
      await showRelay(match[1]);
    } else {
      await showExplorer();
    }
    showError(null);
  } catch (error) {
    showError(error);
  }
  main.setAttribute("aria-busy", "false");
  // Tests and scripts wait for this: the view named here has been drawn.
  main.dataset.rendered = document.body.dataset.view;
}

function scheduleRefresh() {
  clearInterval(view.refreshTimer);
  view.refreshTimer = setInterval(render, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  for (const header of document.querySelectorAll("#relays th[data-sort]")) {
    header.querySelector("button").addEventListener("click", () => {
      const key = header.dataset.sort;
      view.sort = { key, direction: view.sort.key === key ? -view.sort.direction : 1 };
      renderTable();
    });
  }
  window.addEventListener("hashchange", () => {
    document.getElementById("main").dataset.rendered = "";
    window.scrollTo(0, 0);
    render();
    scheduleRefresh();
  });
  render();
  scheduleRefresh();
});
