// lmforge dashboard page: the runs list, live curves (uPlot), compare view. Talks to /api/* only.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const MAX_CLIENT_POINTS = 20000; // per kind and run: halve (every other point) beyond this
  const CHARTS = [
    {id: "loss", title: "loss (train, val, val per source)", pick: (kind, key) =>
      (kind === "train" && key === "loss") || (kind === "eval" && (key === "val_loss" || key.startsWith("val_loss/")))},
    {id: "bpb", title: "validation bits per byte", pick: (kind, key) =>
      kind === "eval" && (key === "val_bpb" || key.startsWith("val_bpb/"))},
    {id: "lr", title: "learning rate", pick: (kind, key) => kind === "train" && key === "lr"},
    {id: "grad_norm", title: "grad norm", pick: (kind, key) => kind === "train" && key === "grad_norm"},
    {id: "throughput", title: "throughput (tokens/s)", pick: (kind, key) => kind === "train" && key === "tok_per_s"},
    {id: "mfu", title: "MFU", pick: (kind, key) => kind === "train" && key === "mfu"},
    {id: "memory", title: "memory (GB)", pick: (kind, key) => kind === "train" && (key === "mem_gb" || key === "peak_mem_gb")},
  ];
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"];
  const state = {runs: [], selected: new Set(), view: null, data: {}, streams: {}, plots: {}, dirty: false,
                 sort: null};

  // ---- HTTP ------------------------------------------------------------------------------------------------
  function headers() {
    const key = localStorage.getItem("lmforge-dashboard-key");
    return key ? {Authorization: "Bearer " + key} : {};
  }
  async function api(path) {
    const r = await fetch(path, {headers: headers()});
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error((body.error && body.error.message) || ("HTTP " + r.status));
    return body;
  }
  function showError(e) { $("error").textContent = e ? String(e.message || e) : ""; }
  const q = (id) => "id=" + encodeURIComponent(id);

  // ---- formatting ------------------------------------------------------------------------------------------
  function fmtNum(v, digits = 4) {
    if (v === null || v === undefined || Number.isNaN(v)) return "";
    if (Math.abs(v) >= 1e5) return v.toExponential(2);
    return Number(v.toPrecision(digits)).toString();
  }
  function fmtBytes(n) {
    if (n === null || n === undefined) return "";
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return n.toFixed(i ? 1 : 0) + " " + u[i];
  }
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  // ---- runs list -------------------------------------------------------------------------------------------
  async function loadRuns() {
    try {
      const body = await api("/api/runs");
      state.runs = body.runs;
      renderRuns();
      showError(null);
    } catch (e) { showError(e); }
  }
  function renderRuns() {
    const tbody = $("runs").querySelector("tbody");
    tbody.replaceChildren();
    for (const run of state.runs) {
      const tr = document.createElement("tr");
      tr.dataset.id = run.id;
      tr.dataset.state = run.status.state;
      if (state.view && state.view.ids.includes(run.id)) tr.className = "focused";
      const box = el("input");
      box.type = "checkbox";
      box.checked = state.selected.has(run.id);
      box.addEventListener("click", (ev) => {
        ev.stopPropagation();
        if (box.checked) state.selected.add(run.id); else state.selected.delete(run.id);
        $("compare").disabled = state.selected.size < 2;
      });
      const td0 = el("td"); td0.appendChild(box); tr.appendChild(td0);
      const name = el("td", run.title); name.title = run.path + (run.data ? "\ndata: " + run.data : "");
      if (run.model) { name.appendChild(document.createElement("br")); name.appendChild(el("small", run.model)); }
      tr.appendChild(name);
      const st = el("td"); const badge = el("span", run.status.state, "status " + run.status.state);
      badge.title = run.status.reason || "";
      st.appendChild(badge);
      if (run.status.state === "running" && run.status.steps_per_s) st.appendChild(el("small", " " + fmtNum(run.status.steps_per_s, 3) + " steps/s"));
      tr.appendChild(st);
      const step = el("td", (run.step ?? "") + (run.total_steps ? " / " + run.total_steps : ""));
      if (run.tokens) step.title = run.tokens.toLocaleString("en-US") + " tokens";
      tr.appendChild(step);
      const vl = run.last_eval.val_loss, best = run.best.val_loss, bpb = run.last_eval.val_bpb;
      const val = el("td", vl === undefined ? "" : fmtNum(vl) + (best ? " (" + fmtNum(best.value) + ")" : ""));
      if (bpb !== undefined) val.title = fmtNum(bpb) + " bits/byte";
      tr.appendChild(val);
      const disk = el("td", fmtBytes(run.disk_bytes));
      if (run.bad_lines) disk.title = run.bad_lines + " unreadable metrics lines skipped";
      tr.appendChild(disk);
      tr.addEventListener("click", () => openRuns([run.id]));
      tbody.appendChild(tr);
    }
    $("runs-count").textContent = "(" + state.runs.length + ")";
  }

  // ---- series data -----------------------------------------------------------------------------------------
  function emptyKind() { return {x: {step: [], tokens: [], _t: [], _line: []}, y: {}, n: 0}; }
  function fromServer(kindSeries) {
    const k = emptyKind();
    for (const x of Object.keys(k.x)) k.x[x] = (kindSeries.x[x] || []).slice();
    for (const [key, col] of Object.entries(kindSeries.y)) k.y[key] = col.slice();
    k.n = k.x.step.length;
    return k;
  }
  function appendRow(kind, row) {
    for (const x of Object.keys(kind.x)) kind.x[x].push(typeof row[x] === "number" ? row[x] : null);
    for (const [key, v] of Object.entries(row)) {
      if (key in kind.x || typeof v !== "number" || key === "kind") continue;
      if (!(key in kind.y)) kind.y[key] = new Array(kind.n).fill(null);
    }
    for (const [key, col] of Object.entries(kind.y)) col.push(typeof row[key] === "number" ? row[key] : null);
    kind.n++;
    if (kind.n > MAX_CLIENT_POINTS) { // keep the last point: drop every other one before it
      const keep = (arr) => arr.filter((_, i) => i % 2 === 0 || i === arr.length - 1);
      for (const x of Object.keys(kind.x)) kind.x[x] = keep(kind.x[x]);
      for (const key of Object.keys(kind.y)) kind.y[key] = keep(kind.y[key]);
      kind.n = kind.x.step.length;
    }
  }
  async function loadSeries(id) {
    const body = await api("/api/series?" + q(id));
    state.data[id] = {train: fromServer(body.series.train), eval: fromServer(body.series.eval),
                      events: body.events, lines: body.cursor.line, cursor: body.cursor};
    return body;
  }

  // ---- live stream (server-sent events over fetch, so the API key can go in a header) ----------------------
  function stopStreams() {
    for (const s of Object.values(state.streams)) s.abort();
    state.streams = {};
  }
  function startStream(id) {
    const d = state.data[id];
    const ctl = new AbortController();
    state.streams[id] = ctl;
    const c = d.cursor;
    const url = "/api/stream?" + q(id) + "&ino=" + c.ino + "&offset=" + c.offset + "&line=" + c.line + "&bad=" + c.bad +
      "&t=" + c.t + "&last_step=" + c.last_step;
    (async () => {
      try {
        const r = await fetch(url, {headers: headers(), signal: ctl.signal});
        if (!r.ok) throw new Error("stream: HTTP " + r.status);
        const reader = r.body.getReader();
        const dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const {value, done} = await reader.read();
          if (done) break;
          buf += dec.decode(value, {stream: true});
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            let event = "message", data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("event: ")) event = line.slice(7);
              else if (line.startsWith("data: ")) data += line.slice(6);
            }
            if (event === "rows") onRows(id, JSON.parse(data));
            else if (event === "reset") { await onReset(id); return; }
          }
        }
      } catch (e) {
        if (e.name !== "AbortError") showError(e);
      }
    })();
  }
  function onRows(id, msg) {
    const d = state.data[id];
    if (!d) return;
    for (const row of msg.rows) {
      if (row._line < d.lines) continue; // already have it (never twice)
      d.lines = row._line + 1;
      if (row.kind === "train") appendRow(d.train, row);
      else if (row.kind === "eval") appendRow(d.eval, row);
      else if (row.kind === "event") d.events.push(row);
    }
    d.cursor = msg.cursor;
    d.lines = Math.max(d.lines, msg.cursor.line);
    state.dirty = true;
  }
  async function onReset(id) {
    // metrics.jsonl was rewritten (resume / rollback): start over from the server's series
    if (!state.view || !state.view.ids.includes(id)) return;
    await loadSeries(id);
    state.dirty = true;
    startStream(id);
  }

  // ---- charts ----------------------------------------------------------------------------------------------
  function smooth(ys, alpha) {
    if (!alpha) return ys;
    const out = new Array(ys.length);
    let acc = null, w = 0;
    for (let i = 0; i < ys.length; i++) {
      const v = ys[i];
      if (v === null || !Number.isFinite(v)) { out[i] = null; continue; }
      acc = acc === null ? v * (1 - alpha) : acc * alpha + v * (1 - alpha);
      w = w * alpha + (1 - alpha);
      out[i] = acc / w; // bias-corrected EMA
    }
    return out;
  }
  function seriesFor(chart) {
    const xKey = $("x-axis").value, alpha = Number($("smoothing").value), log = $("log-scale").checked;
    const out = [];
    for (const id of state.view.ids) {
      const d = state.data[id];
      if (!d) continue;
      const prefix = state.view.ids.length > 1 ? shortName(id) + ": " : "";
      for (const kind of ["train", "eval"]) {
        for (const key of Object.keys(d[kind].y).sort()) {
          if (!chart.pick(kind, key)) continue;
          const xs = d[kind].x[xKey];
          let ys = d[kind].y[key];
          if (kind === "train") ys = smooth(ys, alpha);
          if (log) ys = ys.map((v) => (v !== null && v > 0 ? v : null));
          out.push({label: prefix + key, xs, ys, kind});
        }
      }
    }
    return out;
  }
  function shortName(id) {
    const run = state.runs.find((r) => r.id === id);
    return run ? run.title : id;
  }
  function align(list) {
    // uPlot wants one x array: the union of every series' x, each y null where its series has no point
    const xsAll = new Set();
    for (const s of list) for (const x of s.xs) if (x !== null) xsAll.add(x);
    const xs = Float64Array.from(xsAll).sort();
    const index = new Map();
    xs.forEach((x, i) => index.set(x, i));
    const cols = list.map((s) => {
      const col = new Array(xs.length).fill(null);
      s.xs.forEach((x, i) => { if (x !== null && s.ys[i] !== null && s.ys[i] !== undefined) col[index.get(x)] = s.ys[i]; });
      return col;
    });
    return [Array.from(xs), ...cols];
  }
  function eventXs() {
    const xKey = $("x-axis").value, out = [];
    for (const id of state.view.ids) {
      const d = state.data[id];
      if (!d) continue;
      for (const ev of d.events) {
        if (!["start", "resume", "end", "spike", "nonfinite", "checkpoint", "rollback"].includes(ev.event)) continue;
        let x = ev[xKey];
        if (x === undefined && xKey === "tokens") { // events carry no tokens: the train row at their step
          const i = d.train.x.step.findIndex((s) => s >= ev.step);
          x = i >= 0 ? d.train.x.tokens[i] : null;
        }
        if (typeof x === "number") out.push({x, label: ev.event + (ev.reason ? " (" + ev.reason + ")" : "")});
      }
    }
    return out;
  }
  function markerPlugin() {
    return {hooks: {draw: [(u) => {
      const ctx = u.ctx;
      ctx.save();
      ctx.strokeStyle = "rgba(120,120,120,0.6)";
      ctx.fillStyle = "#666";
      ctx.setLineDash([4, 4]);
      ctx.font = (10 * devicePixelRatio) + "px sans-serif";
      for (const m of u._lmforgeEvents || []) {
        const x = Math.round(u.valToPos(m.x, "x", true));
        if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
        ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
        ctx.fillText(m.label, x + 3, u.bbox.top + 12 * devicePixelRatio);
      }
      ctx.restore();
    }]}};
  }
  function renderCharts(rebuild) {
    const box = $("charts");
    if (!state.view) return;
    const events = eventXs();
    for (const chart of CHARTS) {
      let wrap = $("chart-" + chart.id);
      if (!wrap) {
        wrap = el("div", null, "chart");
        wrap.id = "chart-" + chart.id;
        wrap.appendChild(el("h4", chart.title));
        const area = el("div"); area.className = "area"; wrap.appendChild(area);
        box.appendChild(wrap);
      }
      const area = wrap.querySelector(".area");
      const list = seriesFor(chart);
      const data = align(list);
      const points = list.reduce((n, s) => n + s.ys.filter((v) => v !== null).length, 0);
      wrap.dataset.series = String(list.length);
      wrap.dataset.points = String(points);
      const signature = list.map((s) => s.label).join("|") + "|" + $("log-scale").checked + "|" + $("x-axis").value;
      let plot = state.plots[chart.id];
      if (!list.length) {
        if (plot) { plot.destroy(); delete state.plots[chart.id]; }
        area.replaceChildren(el("p", "no data yet", "empty"));
        continue;
      }
      if (plot && (rebuild || plot._signature !== signature)) { plot.destroy(); plot = null; }
      if (!plot) {
        area.replaceChildren();
        const width = Math.max(260, wrap.clientWidth - 10);
        const opts = {
          width, height: 220, plugins: [markerPlugin()],
          scales: {x: {time: false}, y: $("log-scale").checked ? {distr: 3} : {}},
          axes: [{label: {step: "step", tokens: "tokens", _t: "seconds"}[$("x-axis").value]}, {size: 60}],
          series: [{label: $("x-axis").value}, ...list.map((s, i) => ({
            label: s.label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
            points: {show: s.kind === "eval"}}))],
          legend: {live: true},
        };
        plot = new uPlot(opts, data, area);
        plot._signature = signature;
        state.plots[chart.id] = plot;
      } else {
        plot.setData(data);
      }
      plot._lmforgeEvents = events;
      plot.redraw(false, false);
    }
  }
  setInterval(() => { if (state.dirty) { state.dirty = false; renderCharts(false); } }, 500);
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => renderCharts(true), 200);
  });

  // ---- views -----------------------------------------------------------------------------------------------
  async function openRuns(ids) {
    stopStreams();
    for (const p of Object.values(state.plots)) p.destroy();
    state.plots = {};
    $("charts").replaceChildren();
    state.data = {};
    state.view = {ids};
    document.body.dataset.view = ids.length > 1 ? "compare" : "run";
    $("view-title").textContent = ids.length > 1 ? "Compare " + ids.length + " runs" : shortName(ids[0]);
    renderRuns();
    try {
      for (const id of ids) await loadSeries(id);
      renderCharts(true);
      for (const id of ids) startStream(id);
      if (ids.length > 1) await loadCompare(ids); else await loadRun(ids[0]);
      showError(null);
    } catch (e) { showError(e); }
  }
  async function loadRun(id) {
    const run = await api("/api/run?" + q(id));
    const st = run.status;
    $("stop").hidden = !run.stoppable;
    $("stop").disabled = false;
    $("stop").textContent = "stop (SIGTERM: checkpoint and exit)";
    $("view-status").textContent = st.state + (st.reason ? " — " + st.reason : "") +
      (st.steps_per_s ? " — " + fmtNum(st.steps_per_s, 3) + " steps/s" : "") +
      (run.bad_lines ? " — " + run.bad_lines + " unreadable metrics lines skipped" : "") +
      (run.data ? " — data " + run.data : "");
    const tbody = $("checkpoints").querySelector("tbody");
    tbody.replaceChildren();
    for (const c of run.checkpoints) {
      const tr = document.createElement("tr");
      tr.appendChild(el("td", c.step));
      tr.appendChild(el("td", fmtBytes(c.bytes)));
      const v = el("td", c.verified ? "yes" : "no"); if (c.problem) v.title = c.problem; tr.appendChild(v);
      tr.appendChild(el("td", c.latest ? "LATEST" : ""));
      tbody.appendChild(tr);
    }
    const evs = $("events"); evs.replaceChildren();
    for (const ev of run.events) {
      evs.appendChild(el("li", "step " + ev.step + ": " + ev.event + (ev.reason ? " (" + ev.reason + ")" : "") +
                                (ev.action ? " — " + ev.action : "")));
    }
    const er = $("eval-results"); er.replaceChildren();
    if (!run.eval_results.length) er.appendChild(el("p", "none (lmforge eval writes RUN/model/eval/*.json)", "empty"));
    for (const r of run.eval_results) {
      er.appendChild(el("h4", r.file));
      er.appendChild(el("pre", JSON.stringify(r.result, null, 1).slice(0, 4000)));
    }
    showSampleFiles(id, run.samples || []);
    const rep = $("report"); rep.replaceChildren();
    if (run.report_png) {
      const img = el("img"); img.alt = "report.png";
      fetch("/api/file?" + q(id) + "&name=report.png", {headers: headers()})
        .then((r) => r.blob()).then((b) => { img.src = URL.createObjectURL(b); });
      rep.appendChild(img);
    }
    if (run.report_md) rep.appendChild(el("pre", run.report_md));
    if (!run.report_png && !run.report_md) rep.appendChild(el("p", "written at the end of a run", "empty"));
  }
  // ---- sample generations (GRPO's RUN/completions/step_N.jsonl) ----------------------------------------------
  function showSampleFiles(id, files) {
    const sel = $("samples-file"), rows = $("samples-rows");
    const names = files.map((f) => f.name);
    if (sel.dataset.id === id && sel.dataset.names === names.join("|")) return; // unchanged: keep the shown file
    sel.dataset.id = id; sel.dataset.names = names.join("|");
    sel.hidden = !files.length;
    sel.replaceChildren(...files.slice().reverse().map((f) => {
      const o = el("option", "step " + f.step + " (" + fmtBytes(f.bytes) + ")"); o.value = f.name; return o;
    }));
    if (!files.length) {
      rows.replaceChildren(el("p", "none (GRPO writes RUN/completions/step_N.jsonl every grpo.sample_interval steps)",
                              "empty"));
      return;
    }
    loadSamples(id, sel.value);
  }
  async function loadSamples(id, name) {
    const box = $("samples-rows");
    let body;
    try { body = await api("/api/samples?" + q(id) + "&name=" + encodeURIComponent(name)); } catch (e) {
      box.replaceChildren(el("p", "error: " + e.message, "error")); return;
    }
    const table = el("table"); table.id = "samples-table";
    const cols = ["step", "prompt", "completion", "reward", "advantage"];
    const head = el("tr"); cols.forEach((c) => head.appendChild(el("th", c)));
    table.appendChild(el("thead")).appendChild(head);
    const tb = table.appendChild(el("tbody"));
    for (const r of body.rows) {
      const tr = el("tr");
      for (const c of cols) {
        const v = r[c];
        tr.appendChild(el("td", v === undefined || v === null ? "" : typeof v === "number" ? fmtNum(v, 4) :
                                 typeof v === "object" ? JSON.stringify(v) : String(v), "sample-" + c));
      }
      tb.appendChild(tr);
    }
    const wrap = el("div", "", "table-wrap"); wrap.appendChild(table);
    const note = (body.truncated ? "first " + body.rows.length + " rows shown" : body.rows.length + " rows") +
      (body.bad_lines ? ", " + body.bad_lines + " unreadable lines skipped" : "");
    box.replaceChildren(el("p", note, "hint"), wrap);
  }
  $("samples-file").addEventListener("change", () => {
    const sel = $("samples-file");
    loadSamples(sel.dataset.id, sel.value);
  });
  async function refreshRun() { // the focused run's status and checkpoints, as the runs list refreshes
    if (state.view && state.view.ids.length === 1) {
      try { await loadRun(state.view.ids[0]); } catch (e) { showError(e); }
    }
  }
  async function loadCompare(ids) {
    const body = await api("/api/compare?" + ids.map(q).join("&"));
    $("view-status").textContent = "";
    // final metrics: sortable columns
    const cols = ["run", "status", "step", "tokens", "loss", "val_loss", "best val_loss", "val_bpb", "tok/s"];
    const rows = ids.map((id) => {
      const r = body.runs[id];
      return [r.title, r.status.state, r.step, r.tokens, r.last_train.loss, r.last_eval.val_loss,
              r.best.val_loss ? r.best.val_loss.value : null, r.last_eval.val_bpb, r.last_train.tok_per_s];
    });
    const table = $("final-table");
    const head = document.createElement("tr");
    cols.forEach((c, i) => {
      const th = el("th", c); th.dataset.sort = String(i);
      th.addEventListener("click", () => {
        const dir = state.sort && state.sort[0] === i ? -state.sort[1] : 1;
        state.sort = [i, dir];
        fill();
      });
      head.appendChild(th);
    });
    table.querySelector("thead").replaceChildren(head);
    function fill() {
      const sorted = rows.slice();
      if (state.sort) {
        const [i, dir] = state.sort;
        sorted.sort((a, b) => (a[i] === b[i] ? 0 : a[i] === null || a[i] === undefined ? 1 :
          b[i] === null || b[i] === undefined ? -1 : (a[i] < b[i] ? -dir : dir)));
      }
      const tb = table.querySelector("tbody"); tb.replaceChildren();
      for (const r of sorted) {
        const tr = document.createElement("tr");
        r.forEach((v) => tr.appendChild(el("td", typeof v === "number" ? fmtNum(v) : (v ?? ""))));
        tb.appendChild(tr);
      }
    }
    fill();
    const diff = $("config-diff");
    const dh = document.createElement("tr");
    dh.appendChild(el("th", "key"));
    ids.forEach((id) => dh.appendChild(el("th", body.runs[id].title)));
    diff.querySelector("thead").replaceChildren(dh);
    const db = diff.querySelector("tbody"); db.replaceChildren();
    for (const row of body.config_diff) {
      const tr = document.createElement("tr");
      tr.appendChild(el("td", row.key));
      for (const id of ids) {
        const missing = row.missing.includes(id);
        tr.appendChild(el("td", missing ? "(absent)" : JSON.stringify(row.values[id]), missing ? "diff-missing" : ""));
      }
      db.appendChild(tr);
    }
    if (!body.config_diff.length) db.appendChild(el("tr", "the configs are the same"));
  }

  // ---- launch and stop (with --allow-launch) ----------------------------------------------------------------
  async function post(path, body) {
    const r = await fetch(path, {method: "POST", headers: {...headers(), "Content-Type": "application/json"},
                                 body: JSON.stringify(body)});
    const out = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error((out.error && out.error.message) || ("HTTP " + r.status));
    return out;
  }
  async function setupLaunch() {
    let info;
    try { info = await api("/api/launch"); } catch (e) { return; }
    if (!info.allowed) return;
    $("launch-pane").hidden = false;
    const sel = $("launch-recipe");
    sel.replaceChildren(...info.recipes.map((r) => { const o = el("option", r); o.value = r; return o; }));
    if (info.recipes.includes("pretrain/tiny")) sel.value = "pretrain/tiny";
    sel.addEventListener("change", loadFields);
    await loadFields();
  }
  async function loadFields() {
    const box = $("launch-fields");
    box.replaceChildren();
    const body = await api("/api/launch/fields?recipe=" + encodeURIComponent($("launch-recipe").value));
    for (const f of body.fields) {
      const label = el("label", f.key); label.htmlFor = "field-" + f.key; label.title = f.type;
      const input = el("input"); input.id = "field-" + f.key; input.dataset.key = f.key;
      const text = f.value === null ? "null" : typeof f.value === "object" ? JSON.stringify(f.value) : String(f.value);
      input.value = text; input.dataset.default = text;
      input.addEventListener("input", () => {
        input.classList.toggle("changed", input.value !== input.dataset.default);
        unplanned();
      });
      box.appendChild(label); box.appendChild(input);
    }
  }
  // The launch button opens only once the planner's verdict for exactly these values is shown.
  function unplanned() {
    $("launch-submit").disabled = true;
    $("launch-plan").textContent = "";
    $("launch-plan").className = "";
  }
  function launchBody() {
    const overrides = {};
    for (const input of $("launch-fields").querySelectorAll("input")) {
      if (input.value !== input.dataset.default) overrides[input.dataset.key] = input.value;
    }
    const recipe = $("launch-recipe").value;
    return {verb: recipe.split("/")[0], recipe, name: $("launch-name").value, overrides};
  }
  $("launch-name").addEventListener("input", unplanned);
  $("launch-recipe").addEventListener("change", unplanned);
  $("launch-check").addEventListener("click", async () => {
    unplanned();
    const result = $("launch-result"), plan = $("launch-plan");
    result.className = ""; result.textContent = "checking…";
    try {
      const out = await post("/api/launch/plan", launchBody());
      plan.textContent = "memory plan: " + out.verdict;
      plan.className = out.fits ? "" : "error";
      result.textContent = "";
      $("launch-submit").disabled = false;
    } catch (e) {
      result.className = "error"; result.textContent = "error: " + e.message;
    }
  });
  $("launch-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if ($("launch-submit").disabled) return;
    const result = $("launch-result");
    result.className = ""; result.textContent = "launching…";
    try {
      const out = await post("/api/launch", launchBody());
      result.textContent = "started pid " + out.pid + ": " + out.command;
      result.dataset.id = out.id;
      await loadRuns();
    } catch (e) {
      result.className = "error"; result.textContent = "error: " + e.message;
    }
  });
  $("stop").addEventListener("click", async () => {
    const id = state.view && state.view.ids[0];
    if (!id) return;
    try {
      await post("/api/stop", {id});
      $("stop").disabled = true;
      $("stop").textContent = "stopping…";
    } catch (e) { showError(e); }
  });

  // ---- controls --------------------------------------------------------------------------------------------
  $("x-axis").addEventListener("change", () => renderCharts(true));
  $("log-scale").addEventListener("change", () => renderCharts(true));
  $("smoothing").addEventListener("input", () => {
    $("smoothing-value").textContent = $("smoothing").value;
    renderCharts(false);
  });
  $("compare").addEventListener("click", () => openRuns(Array.from(state.selected)));
  $("api-key").value = localStorage.getItem("lmforge-dashboard-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("lmforge-dashboard-key", $("api-key").value);
    loadRuns();
  });
  window.lmforgeDash = {state, openRuns, loadRuns, refreshRun};
  loadRuns();
  setupLaunch();
  setInterval(() => { loadRuns(); refreshRun(); }, 5000);
})();
