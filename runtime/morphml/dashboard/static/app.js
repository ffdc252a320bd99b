// MorphML dashboard: one experiment's trials, curves, choices, Pareto front, architectures and
// workers, drawn with Apache ECharts. Live pages poll the JSON API (server.py) for the rows
// changed since the last revision; report.html carries the same data inline
// (<script id="morphml-snapshot">) and makes no request at all.
"use strict";
(function () {
  const snapshotEl = document.getElementById("morphml-snapshot");
  const SNAPSHOT = snapshotEl ? JSON.parse(snapshotEl.textContent) : null;
  const params = new URLSearchParams(location.search);
  const POLL_MS = Number(params.get("poll")) || 2000;
  const PAGE_ROWS = 100;       // table rows in the DOM at once
  const MAX_CURVES = 200;      // learning curves drawn (the latest trials, plus the selected one)
  const MAX_AXES = 12;         // parallel-coordinate axes besides the objective
  const MAX_BARS = 3000;       // attempts drawn in the workers timeline (the latest ones)
  const RESOURCES = ["trials", "curves", "attempts", "losses"];
  const STATE_COLORS = {succeeded: "#38a169", failed: "#e53e3e", stale: "#a0aec0", leased: "#3182ce"};

  const state = {summary: null, since: -1, selected: null, detail: null, page: 0,
                 sort: {key: null, dir: 1}, filter: "", text: ""};
  for (const name of RESOURCES) state[name] = new Map();
  const charts = {};
  window.morphml = {state, charts};

  // --- data --------------------------------------------------------------------------------
  let token = sessionStorage.getItem("morphml-token");
  function takeTokenFromHash() {
    const found = location.hash.match(/token=([^&]+)/);
    if (!found) return false;
    // the fragment never reaches the server; keep it off the address bar (and history) too
    token = decodeURIComponent(found[1]);
    sessionStorage.setItem("morphml-token", token);
    history.replaceState(null, "", location.pathname + location.search);
    return true;
  }
  takeTokenFromHash();
  window.addEventListener("hashchange", () => { if (takeTokenFromHash()) poll(); });

  class AuthError extends Error {}

  async function api(path) {
    const response = await fetch("/api/" + path, {headers: token ? {Authorization: "Bearer " + token} : {},
                                                  cache: "no-store"});
    if (response.status === 401 || response.status === 403) {
      throw new AuthError(response.status === 403 ? "wrong token" : "");
    }
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response.json();
  }

  async function fetchChanged(resource, since) {
    const items = [];
    let offset = 0;
    for (;;) {
      const page = await api(`${resource}?since=${since}&offset=${offset}`);
      for (const item of page.items) items.push(item);
      if (page.next_offset === null) return items;
      offset = page.next_offset;
    }
  }

  const keyOf = {trials: r => r.id, curves: r => r.id, attempts: r => `${r.task_id}/${r.attempt}`, losses: r => r.seq};

  function merge(resource, rows) {
    const map = state[resource];
    for (const row of rows) map.set(keyOf[resource](row), row);
  }

  let timer = null, polling = false;
  // A page of 10,000 trials takes a while to draw: poll no more often than thrice a render.
  function schedule() { clearTimeout(timer); timer = setTimeout(poll, Math.max(POLL_MS, 3 * (window.morphml.renderMs || 0))); }

  async function poll() {
    if (polling) return;  // one poll at a time, whoever asks (timer, token form, new token in the URL)
    polling = true;
    clearTimeout(timer);
    try {
      const summary = await api("summary");
      if (summary.revision !== state.since) {
        // since = the revision read BEFORE the pages: a row changed meanwhile comes again next time
        const pages = await Promise.all(RESOURCES.map(r => fetchChanged(r, Math.max(state.since, 0))));
        RESOURCES.forEach((r, i) => merge(r, pages[i]));
        state.since = summary.revision;
        state.summary = summary;
        render();
        if (state.selected && pages[0].some(row => row.id === state.selected)) selectTrial(state.selected);
      }
      setFreshness(`updated ${new Date().toLocaleTimeString()} (revision ${summary.revision})`);
      document.getElementById("login").hidden = true;
      schedule();
    } catch (error) {
      if (error instanceof AuthError) {
        showLogin(error.message);  // polling resumes once a token is given
      } else {
        setFreshness(`update failed: ${error.message}; retrying`);
        schedule();
      }
    } finally {
      polling = false;
    }
  }

  function showLogin(message) {
    document.getElementById("login").hidden = false;
    document.getElementById("login-error").textContent = message;
  }

  document.getElementById("login").addEventListener("submit", event => {
    event.preventDefault();
    token = document.getElementById("token").value.trim();
    sessionStorage.setItem("morphml-token", token);
    poll();
  });

  function setFreshness(text) { document.getElementById("freshness").textContent = text; }

  // --- helpers -----------------------------------------------------------------------------
  const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const fmt = v => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : (v ?? ""));
  const better = (a, b) => (state.summary.goal === "minimize" ? a < b : a > b);
  const trials = () => Array.from(state.trials.values());
  const finishedInOrder = () => trials().filter(t => t.finished_at != null).sort((a, b) => a.finished_at - b.finished_at);

  function chart(name) {
    if (!charts[name]) charts[name] = echarts.init(document.getElementById("chart-" + name), null, {renderer: "canvas"});
    return charts[name];
  }
  function draw(name, option) { chart(name).setOption({animation: false, ...option}, {notMerge: true}); }
  window.addEventListener("resize", () => Object.values(charts).forEach(c => c.resize()));

  // --- rendering ---------------------------------------------------------------------------
  function render() {
    const started = performance.now();
    renderHeader();
    renderTable();
    renderConvergence();
    renderCurves();
    renderParallel();
    renderPareto();
    renderTimeline();
    document.body.dataset.revision = state.summary.revision;
    document.body.dataset.trials = state.trials.size;
    window.morphml.renderMs = performance.now() - started;  // benchmarks/bench_dashboard.py reads it
  }

  function renderHeader() {
    const s = state.summary;
    document.getElementById("experiment").textContent = s.experiment || "MorphML";
    const phase = document.getElementById("phase");
    phase.textContent = s.phase;
    phase.className = "phase " + s.phase;
    const done = s.counts.succeeded + s.counts.failed + s.counts.stopped;
    document.getElementById("counts").innerHTML =
      `<span>${done}/${s.budget ?? "?"} done</span>` +
      ["succeeded", "running", "pending", "stopped", "failed"].map(k => `<span>${k} ${s.counts[k]}</span>`).join("") +
      `<span>worker losses ${s.losses}</span>`;
    document.getElementById("best").textContent = s.best
      ? `best ${s.metric} ${fmt(s.best.value)} (${s.best.id}: ${s.best.summary})` : `best ${s.metric} --`;
  }

  const COLUMNS = [
    ["id", "trial", t => t.id], ["status", "status", t => t.status],
    ["value", null, t => t.value, true], ["summary", "architecture", t => t.summary],
    ["metrics", "other metrics", t => otherMetrics(t)], ["worker", "worker", t => t.worker],
    ["attempts", "attempts", t => t.attempts, true], ["retries", "retries", t => t.retries, true],
    ["duration", "seconds", t => t.duration, true], ["generation", "gen", t => t.generation, true],
    ["epochs", "epochs", t => t.epochs, true], ["error", "error", t => (t.error_kind ? `${t.error_kind}: ${t.error}` : "")],
  ];

  function otherMetrics(t) {
    return Object.entries(t.metrics || {}).filter(([k, v]) => k !== state.summary.metric && k !== "epochs" && typeof v === "number")
      .map(([k, v]) => `${k}=${fmt(v)}`).join(" ");
  }

  function tableRows() {
    let rows = trials();
    if (state.filter) rows = rows.filter(t => t.status === state.filter);
    if (state.text) {
      const q = state.text.toLowerCase();
      rows = rows.filter(t => `${t.id} ${t.summary} ${t.worker}`.toLowerCase().includes(q));
    }
    const column = COLUMNS.find(c => c[0] === state.sort.key);
    if (column) {
      const get = column[2], dir = state.sort.dir;
      rows.sort((a, b) => {
        const x = get(a), y = get(b);
        if (x == null || x === "") return 1;
        if (y == null || y === "") return -1;
        return (x < y ? -1 : x > y ? 1 : 0) * dir;
      });
    }
    return rows;
  }

  function renderTable() {
    const head = document.querySelector("#trials thead tr");
    head.innerHTML = COLUMNS.map(([key, label]) => {
      const sorted = state.sort.key === key ? (state.sort.dir > 0 ? "sorted-asc" : "sorted-desc") : "";
      return `<th data-key="${key}" class="${sorted}">${esc(label ?? state.summary.metric)}</th>`;
    }).join("");
    const rows = tableRows();
    const pages = Math.max(1, Math.ceil(rows.length / PAGE_ROWS));
    state.page = Math.min(state.page, pages - 1);
    const shown = rows.slice(state.page * PAGE_ROWS, (state.page + 1) * PAGE_ROWS);
    document.querySelector("#trials tbody").innerHTML = shown.map(t =>
      `<tr data-trial="${esc(t.id)}" class="${t.id === state.selected ? "selected" : ""}">` +
      COLUMNS.map(([key, , get, num]) => `<td class="${num ? "num" : ""} ${key === "status" ? "status-" + t.status : ""} col-${key}" title="${esc(fmt(get(t)))}">${esc(fmt(get(t)))}</td>`).join("") +
      "</tr>").join("");
    const table = document.getElementById("trials");
    table.dataset.total = rows.length;
    document.getElementById("table-info").textContent =
      `${rows.length} trials` + (pages > 1 ? `, page ${state.page + 1}/${pages}` : "");
  }

  document.querySelector("#trials thead").addEventListener("click", event => {
    const key = event.target.closest("th")?.dataset.key;
    if (!key) return;
    state.sort = {key, dir: state.sort.key === key ? -state.sort.dir : (key === "value" && state.summary.goal === "maximize" ? -1 : 1)};
    renderTable();
  });
  document.querySelector("#trials tbody").addEventListener("click", event => {
    const id = event.target.closest("tr")?.dataset.trial;
    if (id) selectTrial(id);
  });
  document.getElementById("filter-status").addEventListener("change", e => { state.filter = e.target.value; state.page = 0; renderTable(); });
  document.getElementById("filter-text").addEventListener("input", e => { state.text = e.target.value; state.page = 0; renderTable(); });
  document.getElementById("page-prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); renderTable(); });
  document.getElementById("page-next").addEventListener("click", () => { state.page += 1; renderTable(); });

  function renderConvergence() {
    const finished = finishedInOrder();
    // [x, y] only: a string per point would cost ECharts' large mode its typed arrays; ids by index
    const points = [], ids = [], bestLine = [];  // the best-so-far step line: where it changes, and the last
    const stopped = [], stoppedIds = [];  // stopped early: at their last reported value, not in the best line
    let best = null;
    finished.forEach((t, i) => {
      if (t.status === "succeeded" && t.value != null) {
        points.push([i + 1, t.value]);
        ids.push(t.id);
        if (best === null || better(t.value, best)) {
          best = t.value;
          bestLine.push([i + 1, best]);
        }
      } else if (t.status === "stopped" && t.value != null) {
        stopped.push([i + 1, t.value]);
        stoppedIds.push(t.id);
      }
    });
    if (best !== null && bestLine[bestLine.length - 1][0] !== finished.length) bestLine.push([finished.length, best]);
    const metric = state.summary.metric;
    draw("convergence", {
      tooltip: {trigger: "item", formatter: p => (p.seriesIndex === 0 ? `${ids[p.dataIndex]}: ${fmt(p.value[1])}`
        : p.seriesIndex === 2 ? `${stoppedIds[p.dataIndex]} (stopped early): ${fmt(p.value[1])}` : `best ${fmt(p.value[1])}`)},
      legend: {top: 0},
      grid: {left: 50, right: 20, top: 30, bottom: 40},
      xAxis: {type: "value", name: "finished trials", nameLocation: "middle", nameGap: 25, minInterval: 1, min: 1},
      yAxis: {type: "value", name: metric, scale: true},
      series: [
        {name: `trial ${metric}`, type: "scatter", symbolSize: points.length > 2000 ? 3 : 6, data: points,
          large: true, largeThreshold: 2000},
        {name: "best so far", type: "line", step: "end", showSymbol: false, data: bestLine},
        {name: "stopped early", type: "scatter", symbol: "emptyCircle", symbolSize: 6, data: stopped,
          itemStyle: {color: "#b7791f"}, large: true, largeThreshold: 2000},
      ],
    });
  }

  function renderCurves() {
    const all = Array.from(state.curves.values()).filter(c => c.points.length);
    document.getElementById("curves-empty").hidden = all.length > 0;
    let shown = all.slice(-MAX_CURVES);
    const selected = state.curves.get(state.selected);
    if (selected && !shown.includes(selected)) shown = shown.concat([selected]);
    draw("curves", {
      tooltip: {trigger: "item", formatter: p => `${p.seriesName} step ${p.value[0]}: ${fmt(p.value[1])}`},
      grid: {left: 50, right: 20, top: 20, bottom: 40},
      xAxis: {type: "value", name: "step (epoch)", nameLocation: "middle", nameGap: 25, minInterval: 1},
      yAxis: {type: "value", name: all[0]?.metric ?? state.summary.metric, scale: true},
      series: shown.map(c => ({name: c.id, type: "line", data: c.points, showSymbol: c.points.length === 1,
        lineStyle: {width: c.id === state.selected ? 3 : 1, opacity: c.id === state.selected ? 1 : 0.5},
        emphasis: {focus: "series"}})),
    });
  }

  function renderParallel() {
    const scored = trials().filter(t => t.value != null && t.status !== "failed");
    const keys = [];
    for (const t of scored) for (const k of Object.keys(t.choices || {})) if (!keys.includes(k)) keys.push(k);
    const axes = keys.filter(k => new Set(scored.map(t => t.choices[k])).size > 1).slice(0, MAX_AXES);
    const parallelAxis = axes.map((k, dim) => {
      const values = scored.map(t => t.choices[k]).filter(v => v != null);
      if (values.every(v => typeof v === "number")) return {dim, name: k};
      return {dim, name: k, type: "category", data: Array.from(new Set(values.map(String).concat(["none"]))).sort()};
    });
    const metric = state.summary.metric;
    parallelAxis.push({dim: axes.length, name: metric, scale: true});
    const data = scored.map(t => axes.map((k, i) => {
      const v = t.choices[k];
      if (parallelAxis[i].type === "category") return v == null ? "none" : String(v);
      return v ?? "-";
    }).concat([t.value]));
    const values = scored.map(t => t.value);
    draw("parallel", {
      parallel: {left: 60, right: 80, top: 40, bottom: 30},
      parallelAxis,
      visualMap: {show: false, dimension: axes.length, min: values.length ? Math.min(...values) : 0,
        max: values.length ? Math.max(...values) : 1,
        inRange: {color: ["#cbd5e0", "#3182ce", "#2c5282"]}},
      series: [{type: "parallel", data, lineStyle: {width: 1, opacity: 0.5}, progressive: 1000}],
    });
  }

  function renderPareto() {
    const objectives = state.summary.objectives || [];
    document.getElementById("pareto-card").hidden = objectives.length < 2;
    if (objectives.length < 2) return;
    const front = new Set(state.summary.pareto);
    const scored = trials().filter(t => t.objectives);
    const all = scored.map(t => [t.objectives[0], t.objectives[1], t.id]);
    const onFront = all.filter(p => front.has(p[2])).sort((a, b) => a[0] - b[0]);
    draw("pareto", {
      tooltip: {trigger: "item", formatter: p => `${p.value[2]}: ${fmt(p.value[0])}, ${fmt(p.value[1])}`},
      legend: {top: 0},
      grid: {left: 60, right: 20, top: 30, bottom: 40},
      xAxis: {type: "value", name: `${objectives[0].metric} (${objectives[0].goal})`, nameLocation: "middle", nameGap: 25, scale: true},
      yAxis: {type: "value", name: `${objectives[1].metric} (${objectives[1].goal})`, scale: true},
      series: [
        {name: `all trials (${all.length})`, type: "scatter", symbolSize: 5, itemStyle: {opacity: 0.4}, data: all},
        {name: `Pareto front (${onFront.length})`, type: "line", symbolSize: 8, data: onFront, itemStyle: {color: "#c53030"}},
      ],
    });
  }

  function renderTimeline() {
    const all = Array.from(state.attempts.values());
    const attempts = all.length > MAX_BARS ? all.sort((a, b) => a.leased_at - b.leased_at).slice(-MAX_BARS) : all;
    const since = attempts.length ? Math.min(...attempts.map(a => a.leased_at)) : 0;
    const losses = Array.from(state.losses.values()).filter(l => l.detected_at >= since);
    const workers = Array.from(new Set(attempts.map(a => a.worker).concat(losses.map(l => l.worker)))).sort();
    const index = new Map(workers.map((w, i) => [w, i]));
    const now = Date.now();
    const states = Object.keys(STATE_COLORS);
    const bars = attempts.map(a => [index.get(a.worker), a.leased_at * 1000, (a.ended_at ?? now / 1000) * 1000,
      states.indexOf(a.state), a.attempt, `${a.task_id} attempt ${a.attempt} (${a.state}${a.outcome ? ", " + a.outcome : ""})`]);
    const lossPoints = losses.map(l => [l.detected_at * 1000, index.get(l.worker),
      `loss #${l.seq}: ${l.worker} (${l.detected_by}), re-leased ${l.requeued.length}`]);
    draw("timeline", {
      tooltip: {trigger: "item", formatter: p => p.value[p.value.length - 1]},
      title: all.length > attempts.length ? {text: `latest ${attempts.length} of ${all.length} attempts`, right: 0,
        textStyle: {fontSize: 11, fontWeight: "normal"}} : undefined,
      legend: {top: 0, data: ["attempts (outlined: a re-lease)", "worker losses"]},
      grid: {left: 110, right: 20, top: 30, bottom: 40},
      xAxis: {type: "time"},
      yAxis: {type: "category", data: workers},
      dataZoom: [{type: "inside", xAxisIndex: 0}],
      series: [
        {name: "attempts (outlined: a re-lease)", type: "custom", renderItem: renderBar, data: bars, progressive: 2000,
          encode: {x: [1, 2], y: 0}, itemStyle: {color: STATE_COLORS.succeeded}},
        {name: "worker losses", type: "scatter", symbol: "triangle", symbolSize: 12, data: lossPoints,
          itemStyle: {color: "#c53030"}, z: 5},
      ],
    });
  }

  function renderBar(params, api) {
    const y = api.value(0), start = api.coord([api.value(1), y]), end = api.coord([api.value(2), y]);
    const height = api.size([0, 1])[1] * 0.6;
    const shape = echarts.graphic.clipRectByRect(
      {x: start[0], y: start[1] - height / 2, width: Math.max(end[0] - start[0], 1), height},
      {x: params.coordSys.x, y: params.coordSys.y, width: params.coordSys.width, height: params.coordSys.height});
    const color = Object.values(STATE_COLORS)[api.value(3)] || "#718096";
    return shape && {type: "rect", shape,
      style: {fill: color, stroke: api.value(4) > 1 ? "#1a202c" : null, lineWidth: api.value(4) > 1 ? 1.5 : 0}};
  }

  // --- one trial ---------------------------------------------------------------------------
  async function selectTrial(id) {
    state.selected = id;
    let detail;
    if (SNAPSHOT) {
      const row = state.trials.get(id);
      const arch = SNAPSHOT.architectures[id] || {nodes: [], edges: []};
      detail = {...row, architecture: {nodes: arch.nodes, edges: arch.edges}, params: arch.params, flops: arch.flops,
        attempt_rows: Array.from(state.attempts.values()).filter(a => a.task_id === id)};
    } else {
      try { detail = await api("trial/" + encodeURIComponent(id)); } catch (error) { setFreshness(error.message); return; }
    }
    state.detail = detail;
    renderTable();
    renderCurves();
    renderGraph(detail);
  }

  function layered(nodes, edges) {
    // x = longest path from an input (edges go left to right), y = order within that column
    const depth = new Map(nodes.map(n => [n.id, 0]));
    for (let pass = 0; pass < nodes.length; pass++) {
      let moved = false;
      for (const [a, b] of edges) {
        if (depth.get(b) < depth.get(a) + 1) { depth.set(b, depth.get(a) + 1); moved = true; }
      }
      if (!moved) break;
    }
    const rows = new Map();
    return nodes.map(n => {
      const d = depth.get(n.id), row = rows.get(d) || 0;
      rows.set(d, row + 1);
      return {x: d * 100, y: row * 70};
    });
  }

  function renderGraph(detail) {
    const {nodes, edges} = detail.architecture;
    const at = layered(nodes, edges);
    const label = n => [n.op].concat(Object.entries(n.params).map(([k, v]) => `${k}=${v}`)).join("\n");
    document.getElementById("arch-title").textContent = `${detail.id}: ${detail.summary}`;
    draw("graph", {
      tooltip: {formatter: p => (p.dataType === "node" ? esc(label(p.data.layer)).replace(/\n/g, "<br>") : "")},
      series: [{type: "graph", layout: "none", roam: true, edgeSymbol: ["none", "arrow"], edgeSymbolSize: 8,
        symbol: "roundRect", symbolSize: [78, 28],
        label: {show: true, formatter: p => p.data.layer.op, fontSize: 11},
        itemStyle: {color: "#bee3f8", borderColor: "#2b6cb0"},
        lineStyle: {color: "#4a5568", width: 1.5, curveness: 0.1},
        data: nodes.map((n, i) => ({name: n.id, x: at[i].x, y: at[i].y, layer: n})),
        links: edges.map(([source, target]) => ({source, target}))}],
    });
    const attempts = (detail.attempt_rows || []).map(a => `${a.attempt}: ${a.worker} ${a.state}${a.outcome ? " (" + a.outcome + ")" : ""}`);
    document.getElementById("trial-detail").innerHTML =
      `<div>${esc(detail.status)}; ${nodes.length} nodes; params ${fmt(detail.params)}; flops ${fmt(detail.flops)}</div>` +
      `<pre>${esc(JSON.stringify(detail.metrics))}</pre>` +
      `<div>attempts: ${esc(attempts.join("; "))}</div>` +
      (detail.error ? `<pre class="error">${esc(detail.error_kind)}: ${esc(detail.error)}</pre>` : "");
    document.getElementById("chart-graph").dataset.nodes = nodes.length;
  }

  // --- start -------------------------------------------------------------------------------
  if (SNAPSHOT) {
    state.summary = SNAPSHOT.summary;
    state.since = SNAPSHOT.summary.revision;
    for (const name of RESOURCES) merge(name, SNAPSHOT[name]);
    render();
    setFreshness(`report written ${new Date(SNAPSHOT.summary.read_at * 1000).toLocaleString()}`);
    const best = SNAPSHOT.summary.best;
    if (best) selectTrial(best.id);
  } else {
    poll();
  }
})();
