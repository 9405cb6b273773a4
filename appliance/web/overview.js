// Portico dashboard, Overview: GET /overview every few seconds while the view is shown (and not paused).
// The chart is SVG drawn here (no library): one bar per hour of the last 24 hours.
"use strict";

(function () {
  const P = window.Portico;
  const $ = P.$;
  const SVG = "http://www.w3.org/2000/svg";
  const POLL_MS = 5000;
  let timer = null;
  let paused = false;
  let shown = false;

  function bytes(n) {
    if (n === null || n === undefined) {
      return "unknown";
    }
    const units = ["B", "KB", "MB", "GB", "TB"];
    let value = n;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return value.toFixed(unit ? 1 : 0) + " " + units[unit];
  }

  function age(seconds) {
    if (seconds < 90) {
      return Math.round(seconds) + " s";
    }
    if (seconds < 5400) {
      return Math.round(seconds / 60) + " min";
    }
    return (seconds / 3600).toFixed(1) + " h";
  }

  function svg(name, attrs, text) {
    const el = document.createElementNS(SVG, name);
    for (const key of Object.keys(attrs)) {
      el.setAttribute(key, String(attrs[key]));
    }
    if (text !== undefined) {
      el.textContent = text;
    }
    return el;
  }

  function hourLabel(seconds) {
    const d = new Date(seconds * 1000);
    return String(d.getHours()).padStart(2, "0") + ":00";
  }

  function drawChart(chart) {
    const box = $("ov-chart");
    box.textContent = "";
    const counts = chart.instances;
    const max = Math.max(1, ...counts);
    const width = 720;
    const height = 180;
    const left = 40;
    const bottom = 24;
    const top = 10;
    const slot = (width - left) / counts.length;
    const scale = (height - bottom - top) / max;
    box.append(svg("line", { x1: left, y1: height - bottom, x2: width, y2: height - bottom, class: "axis" }));
    box.append(svg("text", { x: left - 6, y: top + 10, "text-anchor": "end", class: "tick" }, String(max)));
    box.append(svg("text", { x: left - 6, y: height - bottom, "text-anchor": "end", class: "tick" }, "0"));
    counts.forEach((n, i) => {
      const start = chart.start + i * chart.hour_seconds;
      const h = n * scale;
      const bar = svg("rect", { x: (left + i * slot + 1).toFixed(1), y: (height - bottom - h).toFixed(1),
        width: Math.max(1, slot - 2).toFixed(1), height: h.toFixed(1), class: "bar" });
      bar.append(svg("title", {}, hourLabel(start) + ": " + n + " instance(s), " + chart.studies[i] + " new study(ies)"));
      box.append(bar);
      if (i % 3 === 0) {
        box.append(svg("text", { x: (left + i * slot + slot / 2).toFixed(1), y: height - 6, "text-anchor": "middle",
          class: "tick" }, hourLabel(start)));
      }
    });
    const busiest = counts.indexOf(Math.max(...counts));
    $("ov-chart-summary").textContent = counts.reduce((a, b) => a + b, 0) === 0
      ? "Nothing was received in the last 24 hours."
      : "Busiest hour " + hourLabel(chart.start + busiest * chart.hour_seconds) + " with " + counts[busiest] +
        " instance(s); " + counts[counts.length - 1] + " so far this hour.";
  }

  function render(o) {
    const total = (list) => list.reduce((a, b) => a + b, 0);
    $("ov-instances").textContent = total(o.received.instances);
    $("ov-studies").textContent = total(o.received.studies);
    const disk = o.disk;
    $("ov-disk").textContent = bytes(disk.free_bytes) + (disk.total_bytes ? " of " + bytes(disk.total_bytes) : "");
    $("ov-disk").classList.toggle("state-failed", disk.free_bytes !== null && disk.min_free_bytes > 0 &&
      disk.free_bytes < disk.min_free_bytes * 2);
    $("ov-sessions").textContent = o.sessions_loaded === null ? "–" : o.sessions_loaded;
    P.fillCounts($("ov-jobs"), o.jobs);
    const body = $("ov-outbox").tBodies[0];
    body.textContent = "";
    const names = Object.keys(o.outbox);
    if (names.length === 0) {
      P.cell(body.insertRow(), "no destination", true).colSpan = 5;
    }
    for (const name of names) {
      const d = o.outbox[name];
      const row = body.insertRow();
      P.cell(row, name, true);
      P.cell(row, d.pending);
      P.cell(row, d.held);
      P.cell(row, d.failed).className = d.failed ? "state-failed" : "";
      P.cell(row, d.oldest_pending === null ? "–" : age(o.now - d.oldest_pending));
    }
    drawChart(o.received);
    $("ov-updated").textContent = "Updated " + new Date(o.now * 1000).toLocaleTimeString() +
      (paused ? "; updates paused." : "; updates every " + POLL_MS / 1000 + " s.");
  }

  function stop() {
    if (timer !== null) {
      clearTimeout(timer);
      timer = null;
    }
  }

  async function load() {
    stop();
    shown = true;
    try {
      render(await P.api("/overview"));
    } finally {
      // the next poll is set only after this one answered: never two at once
      if (shown && !paused) {
        timer = setTimeout(() => { load().catch(P.showError); }, POLL_MS);
      }
    }
  }

  function leave() {
    shown = false;
    stop();
  }

  function clear() {
    for (const id of ["ov-instances", "ov-studies", "ov-disk", "ov-sessions", "ov-updated", "ov-chart-summary"]) {
      $(id).textContent = "";
    }
    $("ov-chart").textContent = "";
    $("ov-jobs").tBodies[0].textContent = "";
    $("ov-outbox").tBodies[0].textContent = "";
  }

  $("ov-pause").addEventListener("click", () => {
    paused = !paused;
    $("ov-pause").setAttribute("aria-pressed", String(paused));
    $("ov-pause").textContent = paused ? "Resume updates" : "Pause updates";
    if (paused) {
      stop();
      $("ov-updated").textContent = "Updates paused.";
    } else if (shown) {
      load().catch(P.showError);
    }
  });

  P.registerView("overview", { permission: "status.read", load: load, leave: leave, clear: clear });
})();
