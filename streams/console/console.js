// The pipeline page: polls /console/api/pipeline once a second and draws its series as SVG lines.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function shown(value, digits) {
  if (value === null || value === undefined) return "–";
  return Number(value).toLocaleString("en", { maximumFractionDigits: digits });
}

function line(svg, points, colour, top) {
  const path = document.createElementNS(SVG, "polyline");
  const usable = points.filter((p) => p[1] !== null);
  path.setAttribute("points", usable.map(([x, y]) => `${x},${110 - (100 * y) / top}`).join(" "));
  path.setAttribute("fill", "none");
  path.setAttribute("stroke", colour);
  path.setAttribute("stroke-width", "1.5");
  svg.appendChild(path);
}

function chart(id, at, series) {
  const svg = document.getElementById(id);
  svg.replaceChildren();
  if (!at.length) return;
  const span = Math.max(at[at.length - 1] - at[0], 1);
  const values = series.flatMap(([values]) => values.filter((v) => v !== null));
  const top = Math.max(...values, 1e-9) * 1.1;
  for (const [values, colour] of series) {
    line(svg, values.map((v, i) => [(580 * (at[i] - at[0])) / span + 10, v]), colour, top);
  }
  const label = document.createElementNS(SVG, "text");
  label.setAttribute("x", "12");
  label.setAttribute("y", "10");
  label.textContent = `max ${shown(top / 1.1, 1)}`;
  svg.appendChild(label);
}

function table(id, rows, empty) {
  const body = rows.length
    ? rows.map(([k, v]) => `<tr><td>${k}</td><td>${shown(v, 0)}</td></tr>`).join("")
    : `<tr><td>${empty}</td></tr>`;
  document.getElementById(id).innerHTML = body;
}

function escaped(text) {
  const span = document.createElement("span");
  span.textContent = text;
  return span.innerHTML;
}

async function refresh() {
  const answer = await fetch("/console/api/pipeline");
  if (!answer.ok) return;
  const feed = await answer.json();
  const set = (id, value, digits) => (document.getElementById(id).textContent = shown(value, digits));
  set("events-per-s", feed.now.events_per_s, 0);
  set("lists-per-s", feed.now.lists_per_s, 0);
  set("dead-letters-per-s", feed.now.dead_letters_per_s, 1);
  set("p50", feed.latency.p50_ms === null ? null : feed.latency.p50_ms, 0);
  set("p99", feed.latency.p99_ms === null ? null : feed.latency.p99_ms, 0);
  for (const id of ["p50", "p99"]) {
    const card = document.getElementById(id);
    if (card.textContent !== "–") card.textContent += " ms";
  }
  set("total-events", feed.totals.events, 0);
  set("total-lists", feed.totals.lists, 0);
  const s = feed.series;
  chart("chart-rates", s.at, [[s.events_per_s, "#1f77d0"], [s.lists_per_s, "#17803d"]]);
  chart("chart-latency", s.at, [[s.p50_ms, "#1f77d0"], [s.p99_ms, "#b3261e"]]);
  chart("chart-batch", s.at, [[s.batch_mean, "#6a4fb3"]]);
  chart("chart-dead", s.at, [[s.dead_letters_per_s, "#b3261e"]]);
  table("lag", Object.entries(feed.lag).map(([k, v]) => [escaped(k), v]), "no partition assigned yet");
  table("reasons", Object.entries(feed.dead_letters_by_reason).map(([k, v]) => [escaped(k), v]), "none so far");
}

if (document.body.dataset.page === "pipeline") {
  refresh();
  setInterval(refresh, 1000);
}
