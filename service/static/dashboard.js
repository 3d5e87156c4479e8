// The operator's live page: polls dashboard/cluster (the /health/cluster report with every worker's
// heartbeat) and derives rates from successive counter values, so the service counts nothing extra.
"use strict";
(() => {
  const POLL_MS = 1500;
  const WINDOW_S = 300; // the most the charts show; they start with a minute and widen as points come
  const MIN_SPAN_S = 60;
  const FETCH_TIMEOUT_MS = 5000;
  const COLOURS = ["#e0611a", "#1f9d55", "#9b4fd0", "#c23b6b", "#0f8b8d", "#8a6d1f", "#5a6b84"];
  const SVG_NS = "http://www.w3.org/2000/svg";
  // Per worker, the counters whose rates the page shows.
  const RATED = {
    deliveries: (w) => counter(w, "counters", "delivered"),
    http: (w) => counter(w, "counters", "published_http"),
    redis: (w) => counter(w, "counters", "received_redis"),
  };

  const $ = (id) => document.getElementById(id);
  const samples = new Map(); // worker key -> {ts, values, rates}
  const points = []; // {t, connections, workers: Map(key -> connections), deliveries}
  const colours = new Map();

  function counter(w, group, name) {
    const g = w[group];
    return g && typeof g[name] === "number" ? g[name] : 0;
  }

  // A pid can come back on a restarted host: the start time tells two lives of one pid apart.
  const workerKey = (w) => `${w.worker.id}@${w.worker.started_at ?? ""}`;

  // A worker keeps its colour while it is on the charts; a replaced worker's colour is freed.
  function colour(key) {
    if (!colours.has(key)) {
      const used = new Set(colours.values());
      colours.set(key, COLOURS.find((c) => !used.has(c)) || COLOURS[colours.size % COLOURS.length]);
    }
    return colours.get(key);
  }

  // Heartbeats change once per HEARTBEAT_INTERVAL, polls come more often: a rate is the counter's
  // growth between two different heartbeats of one worker, over their own timestamps.
  function updateRates(workers) {
    const seen = new Set();
    for (const w of workers) {
      const key = workerKey(w);
      seen.add(key);
      const values = {};
      for (const [name, read] of Object.entries(RATED)) values[name] = read(w);
      const prev = samples.get(key);
      if (!prev) {
        samples.set(key, { ts: w.ts, values, rates: null });
        continue;
      }
      const dt = w.ts - prev.ts;
      if (dt <= 0) continue;
      const rates = {};
      for (const name of Object.keys(values)) rates[name] = Math.max(0, values[name] - prev.values[name]) / dt;
      samples.set(key, { ts: w.ts, values, rates });
    }
    for (const key of [...samples.keys()]) if (!seen.has(key)) samples.delete(key);
  }

  function rate(w, name) {
    const s = samples.get(workerKey(w));
    return s && s.rates ? s.rates[name] : null;
  }

  function totalRate(workers, name) {
    let sum = 0;
    let known = false;
    for (const w of workers) {
      const r = rate(w, name);
      if (r !== null) {
        sum += r;
        known = true;
      }
    }
    return known ? sum : null;
  }

  const sum = (workers, read) => workers.reduce((total, w) => total + read(w), 0);
  const fmtInt = (n) => Math.round(n).toLocaleString("en-US");
  const fmtRate = (r) => (r === null ? "–" : r < 10 && r > 0 ? r.toFixed(1) : fmtInt(r));
  const MIB = 1048576;
  const fmtMiB = (bytes) =>
    bytes >= 1024 * MIB ? `${(bytes / (1024 * MIB)).toFixed(1)} GiB` : `${(bytes / MIB).toFixed(bytes < 100 * MIB ? 1 : 0)} MiB`;
  const fmtAxis = (v) => (Number.isInteger(v) ? fmtInt(v) : v.toFixed(1));
  const staleAfter = (interval) => interval + Math.max(interval / 2, 1);

  function setTile(id, value, text, sub) {
    const el = $(id);
    el.dataset.value = value === null || value === undefined ? "" : String(value);
    el.textContent = text;
    $(`${id}-sub`).textContent = sub || "";
  }

  function renderTotals(doc, workers) {
    const t = doc.totals;
    if (!t) {
      for (const id of ["t-workers", "t-hosts", "t-connections", "t-publications", "t-deliveries", "t-drops",
        "t-gaps", "t-recoveries"]) setTile(id, null, "–", "");
      bar($("t-connections-bar"), 0);
      return;
    }
    const rss = fmtMiB(t.rss_bytes);
    setTile("t-workers", t.workers, fmtInt(t.workers), `${rss} RSS in all`);
    setTile("t-hosts", t.hosts, fmtInt(t.hosts), t.invalid_heartbeats ? `${t.invalid_heartbeats} invalid heartbeat keys` : "");
    const share = t.limit ? t.connections / t.limit : 0;
    setTile("t-connections", t.connections, fmtInt(t.connections),
      `of ${fmtInt(t.limit)} (${(share * 100).toFixed(share < 0.1 ? 1 : 0)}%)`);
    bar($("t-connections-bar"), share);
    const http = totalRate(workers, "http");
    const redis = totalRate(workers, "redis");
    setTile("t-publications", http, fmtRate(http), `over HTTP; workers get ${fmtRate(redis)}/s from Redis`);
    const deliveries = totalRate(workers, "deliveries");
    setTile("t-deliveries", deliveries, fmtRate(deliveries),
      `${fmtInt(sum(workers, (w) => counter(w, "counters", "delivered")))} delivered`);
    const dropped = sum(workers, (w) => counter(w, "counters", "dropped"));
    const slow = sum(workers, (w) => counter(w, "counters", "slow_closed"));
    setTile("t-drops", dropped, fmtInt(dropped), `frames dropped; ${fmtInt(slow)} slow clients closed`);
    const gaps = sum(workers, (w) => counter(w, "history", "gaps_sent"));
    const holes = sum(workers, (w) => counter(w, "history", "holes"));
    const filled = sum(workers, (w) => counter(w, "history", "holes_filled"));
    setTile("t-gaps", gaps, fmtInt(gaps), `holes ${fmtInt(holes)}, filled ${fmtInt(filled)}`);
    const recovered = sum(workers, (w) => counter(w, "history", "recovered"));
    const lost = sum(workers, (w) => counter(w, "history", "not_recovered"));
    setTile("t-recoveries", recovered, fmtInt(recovered), `${fmtInt(lost)} could not recover`);
  }

  function bar(el, share) {
    el.firstElementChild.style.width = `${Math.min(100, share * 100).toFixed(1)}%`;
    el.classList.toggle("high", share > 0.9);
  }

  function cell(row, text, cls) {
    const td = row.insertCell();
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  function renderWorkers(workers, known) {
    const body = $("workers").tBodies[0];
    body.replaceChildren();
    for (const w of workers) {
      const row = body.insertRow();
      row.dataset.worker = w.worker.id;
      cell(row, w.worker.host);
      cell(row, String(w.worker.pid), "num");
      const status = cell(row, "");
      const badge = document.createElement("span");
      badge.className = `badge ${w.status}`;
      badge.textContent = w.status;
      status.appendChild(badge);
      for (const reason of w.reasons || []) {
        const line = document.createElement("div");
        line.className = "reason";
        line.textContent = reason;
        status.appendChild(line);
      }
      const c = w.connections;
      const effective = c.effective_limit ?? c.limit;
      const conns = cell(row, `${fmtInt(c.current)} / ${fmtInt(effective)}`, "num");
      conns.dataset.value = String(c.current);
      if (effective !== c.limit) conns.title = `MAX_CONNECTIONS ${c.limit}; memory or file descriptors allow ${effective}`;
      const m = w.memory || {};
      const rss = m.limit_bytes
        ? `${fmtMiB(m.rss_bytes)} / ${fmtMiB(m.limit_bytes)} (${((m.rss_bytes / m.limit_bytes) * 100).toFixed(0)}%)`
        : fmtMiB(m.rss_bytes);
      cell(row, rss, m.pressure ? "num late" : "num");
      cell(row, fmtRate(rate(w, "deliveries")), "num");
      const age = typeof w.age === "number" ? w.age : 0;
      cell(row, `${age.toFixed(1)} s`, age > staleAfter(w.heartbeat_interval) ? "num late" : "num");
    }
    if (!workers.length) {
      const row = body.insertRow();
      const td = cell(row, known ? "no live workers" : "unknown: the heartbeats could not be read");
      td.colSpan = 7;
    }
    const intervals = [...new Set(workers.map((w) => w.heartbeat_interval))];
    $("note").textContent = intervals.length
      ? `Figures are as fresh as each worker's heartbeat (every ${intervals.join(", ")} s: HEARTBEAT_INTERVAL); ` +
        "counts are those of the live workers since they started; charts cover what this page has seen."
      : "";
  }

  function renderStatus(status, reasons) {
    const badge = $("status");
    badge.className = `badge ${status}`;
    badge.textContent = status;
    document.title = `${status} · wsbroadcast`;
    const list = $("reasons");
    list.className = status;
    list.replaceChildren();
    for (const reason of reasons) {
      const item = document.createElement("li");
      item.textContent = reason;
      list.appendChild(item);
    }
  }

  // --- charts: inline SVG, redrawn whole on each poll (a few hundred points at most) ---------------

  function svg(tag, attrs, parent) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, value);
    parent.appendChild(el);
    return el;
  }

  function niceCeil(v) {
    if (!(v > 0)) return 1;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  // lines: [{values: [number|null per point], cls, colour, area}]
  function tickStep(span) {
    for (const step of [10, 15, 30, 60, 120]) if (span / step <= 6) return step;
    return 300;
  }

  const ago = (s) => (s === 0 ? "now" : s < 60 ? `−${s} s` : `−${s / 60} min`);

  function drawChart(el, lines, now, span) {
    const W = Math.max(200, el.clientWidth || 600);
    const H = el.clientHeight || 180;
    const L = 52, R = 10, T = 8, B = 20;
    el.setAttribute("viewBox", `0 0 ${W} ${H}`);
    el.replaceChildren();
    let max = 0;
    for (const line of lines) for (const v of line.values) if (v !== null && v > max) max = v;
    const top = niceCeil(max);
    const x = (t) => L + (W - L - R) * (1 - (now - t) / span);
    const y = (v) => T + (H - T - B) * (1 - v / top);
    for (const f of [0, 0.5, 1]) {
      const yy = y(top * f);
      svg("line", { x1: L, x2: W - R, y1: yy, y2: yy, class: "grid" }, el);
      svg("text", { x: L - 6, y: yy + 4, "text-anchor": "end", class: "axis" }, el).textContent = fmtAxis(top * f);
    }
    const step = tickStep(span);
    for (let s = Math.floor(span / step) * step; s >= 0; s -= step) {
      const anchor = s === 0 ? "end" : x(now - s) < L + 20 ? "start" : "middle";
      svg("text", { x: x(now - s), y: H - 4, "text-anchor": anchor, class: "axis" }, el).textContent = ago(s);
    }
    for (const line of lines) {
      let d = "";
      let area = "";
      let open = false;
      let first = 0;
      let last = 0;
      line.values.forEach((v, i) => {
        if (v === null) {
          if (open && line.area) area += `L${last},${y(0)}L${first},${y(0)}Z`;
          open = false;
          return;
        }
        const px = x(points[i].t).toFixed(1);
        const py = y(v).toFixed(1);
        d += `${open ? "L" : "M"}${px},${py}`;
        if (line.area) area += `${open ? "L" : "M"}${px},${py}`;
        if (!open) first = px;
        last = px;
        open = true;
      });
      if (open && line.area) area += `L${last},${y(0)}L${first},${y(0)}Z`;
      if (line.area && area) svg("path", { d: area, class: "area" }, el);
      if (d) {
        const path = svg("path", { d, class: line.cls }, el);
        if (line.colour) path.setAttribute("stroke", line.colour);
      }
    }
  }

  function legend(el, entries) {
    el.replaceChildren();
    for (const [label, colour] of entries) {
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = colour;
      item.append(swatch, label);
      el.appendChild(item);
    }
  }

  function renderCharts() {
    const now = Date.now() / 1000;
    while (points.length && points[0].t < now - WINDOW_S) points.shift();
    const span = Math.min(WINDOW_S, Math.max(MIN_SPAN_S, points.length ? now - points[0].t : 0));
    const keys = [];
    for (const p of points) for (const key of p.workers.keys()) if (!keys.includes(key)) keys.push(key);
    for (const key of [...colours.keys()]) if (!keys.includes(key)) colours.delete(key);
    const perWorker = keys.map((key) => ({
      values: points.map((p) => (p.workers.has(key) ? p.workers.get(key) : null)),
      cls: "worker",
      colour: colour(key),
    }));
    const total = { values: points.map((p) => p.connections), cls: "total" };
    drawChart($("chart-connections"), [...perWorker, total], now, span);
    const live = new Set(points.length ? points[points.length - 1].workers.keys() : []);
    legend($("legend-connections"), [
      ["total", "var(--total)"],
      ...keys.filter((k) => live.has(k)).map((k) => [k.split("@")[0], colour(k)]),
    ]);
    const deliveries = { values: points.map((p) => p.deliveries), cls: "rate", area: true };
    drawChart($("chart-deliveries"), [deliveries], now, span);
    const last = points.length ? points[points.length - 1].deliveries : null;
    legend($("legend-deliveries"), [[`all workers: ${fmtRate(last)}/s now`, "var(--accent)"]]);
  }

  // --- the poll ------------------------------------------------------------------------------------

  function record(doc, workers) {
    const perWorker = new Map(workers.map((w) => [workerKey(w), w.connections.current]));
    points.push({
      t: Date.now() / 1000,
      connections: doc.totals ? doc.totals.connections : null,
      workers: perWorker,
      deliveries: totalRate(workers, "deliveries"),
    });
  }

  function show(doc) {
    const workers = Array.isArray(doc.workers) ? doc.workers : [];
    updateRates(workers);
    record(doc, workers);
    document.body.classList.remove("stale");
    renderStatus(doc.status, doc.reasons || []);
    renderTotals(doc, workers);
    renderWorkers(workers, Boolean(doc.totals));
    renderCharts();
    $("updated").textContent = `updated ${new Date().toLocaleTimeString("en-GB")} · every ${POLL_MS / 1000} s`;
  }

  function unreachable(why) {
    document.body.classList.add("stale");
    points.push({ t: Date.now() / 1000, connections: null, workers: new Map(), deliveries: null });
    renderStatus("unreachable", [`${why}; retrying every ${POLL_MS / 1000} s (figures below are the last seen)`]);
    renderCharts();
  }

  async function poll() {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
    try {
      const response = await fetch("dashboard/cluster", { cache: "no-store", credentials: "same-origin",
        signal: abort.signal });
      if (response.status === 401) unreachable("not authorised any more (ADMIN_TOKEN changed?): reload the page");
      else if (!response.ok) unreachable(`the service answered ${response.status}`);
      else show(await response.json());
    } catch (err) {
      unreachable(`the service did not answer (${err.name === "AbortError" ? "timeout" : err.message})`);
    } finally {
      clearTimeout(timer);
      setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
