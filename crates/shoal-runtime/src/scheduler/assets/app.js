// Shoal's dashboard: one page, no dependencies. Live, it follows the
// scheduler's server-sent events (/api/events, every second, with the
// task stream entries since the last update, already merged into blocks by
// the scheduler) and asks for the graph, profile and logs only while their
// tab is shown. In a performance report, window.SHOAL_REPORT holds the data
// and nothing is fetched.
"use strict";
(function () {
  const REPORT = window.SHOAL_REPORT || null;
  const STREAM_KEEP = 50000; // entries (blocks) kept in the page
  const LANE_H = 16;
  const KIND = { TASK: 0, ERROR: 1, TRANSFER: 2, SPILL: 3 };
  const ACTIVITY_LANE = 4294967295;

  const st = {
    stream: [], // [seq, task, group, worker, thread, start_us, dur_us, kind, bytes, count]
    seq: 0,
    groups: [],
    workers: [],
    workerNames: {},
    counters: {},
    nowUs: 0,
    history: {},
    rate: 0,
    lastFinished: null,
    follow: !REPORT,
    viewEnd: 0, // microseconds
    viewSpan: 10e6,
    tab: "status",
    graphAt: 0,
    profileAt: 0,
    logsAt: 0,
  };

  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "style") e.style.cssText = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    return e;
  };
  const fmtBytes = (b) => {
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
    return (i ? b.toFixed(1) : b) + " " + u[i];
  };
  const fmtDur = (us) => us < 0 ? "-" + fmtDur(-us) : us < 1000 ? us + " µs" : us < 1e6 ? (us / 1e3).toFixed(2) + " ms" : (us / 1e6).toFixed(3) + " s";
  const groupName = (id) => {
    const g = st.groups.find((g) => g.id === id);
    return g ? g.name : "?";
  };

  // One colour per task group, stable across updates.
  const PALETTE = ["#4e79a7", "#59a14f", "#9c755f", "#b07aa1", "#76b7b2", "#edc948", "#af7aa1", "#ff9da7", "#86bcb6", "#8cd17d", "#499894", "#d4a6c8", "#a0cbe8", "#f1ce63", "#79706e", "#b6992d"];
  const colour = (r) => {
    if (r[7] === KIND.TRANSFER) return "#e15759";
    if (r[7] === KIND.SPILL) return "#f28e2b";
    if (r[7] === KIND.ERROR) return "#222";
    return PALETTE[r[2] % PALETTE.length];
  };

  // ------------------------------------------------------------ tabs
  for (const b of document.querySelectorAll("#tabs button")) {
    if (REPORT && b.hasAttribute("data-live")) b.hidden = true;
    if (!REPORT && b.hasAttribute("data-report")) b.hidden = true;
    b.addEventListener("click", () => show(b.dataset.tab));
  }
  for (const e of document.querySelectorAll(REPORT ? "[data-live]" : "[data-report]")) e.hidden = true;

  function show(tab) {
    st.tab = tab;
    for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === tab);
    for (const s of document.querySelectorAll(".tab")) s.classList.toggle("active", s.id === "tab-" + tab);
    render(true);
  }

  // ------------------------------------------------------------ data in
  function apply(d) {
    if (d.stream && d.stream.length) {
      for (const r of d.stream) {
        st.stream.push(r);
        const k = laneKey(r);
        if (!laneSet.has(k)) { laneSet.set(k, [r[3], r[4] === ACTIVITY_LANE ? 1e9 : r[4]]); lanesDirty = true; }
        if (r[7] === KIND.TASK) groupsSeen.add(r[2]);
      }
      if (st.stream.length > STREAM_KEEP) st.stream.splice(0, st.stream.length - STREAM_KEEP);
    }
    if (d.seq !== undefined) st.seq = d.seq;
    st.groups = d.groups || st.groups;
    st.workers = d.workers || st.workers;
    st.workerNames = d.worker_names || st.workerNames;
    st.counters = d.counters || st.counters;
    st.nowUs = d.now_us || st.nowUs;
    if (d.history) st.history = d.history;
    const fin = st.counters.finished || 0;
    const t = performance.now();
    if (st.lastFinished) {
      const dt = (t - st.lastFinished[0]) / 1000;
      if (dt > 0) st.rate = 0.5 * st.rate + 0.5 * ((fin - st.lastFinished[1]) / dt);
    }
    st.lastFinished = [t, fin];
  }

  function render(force) {
    const t0 = performance.now();
    renderPage(force);
    // How long a redraw takes (tests and benchmarks read these).
    st.renderMs = performance.now() - t0;
    st.renderMaxMs = Math.max(st.renderMaxMs || 0, st.renderMs);
    st.renders = (st.renders || 0) + 1;
  }

  function renderPage(force) {
    renderCounters();
    if (st.tab === "status") { drawStream(); renderProgress(); }
    if (st.tab === "workers") renderWorkers();
    if (st.tab === "memory") drawHistory();
    const now = performance.now();
    if (!REPORT) {
      if (st.tab === "graph" && (force || now - st.graphAt > 2000)) { st.graphAt = now; loadGraph(); }
      if (st.tab === "profile" && (force || now - st.profileAt > 2000)) { st.profileAt = now; loadProfile(); }
      if (st.tab === "logs" && (force || now - st.logsAt > 2000)) { st.logsAt = now; loadLogs(); }
    } else if (st.tab === "profile" && force) {
      drawFlame(REPORT.profile || {});
    }
  }

  function renderCounters() {
    const c = st.counters;
    $("counter-workers").textContent = st.workers.length;
    $("counter-finished").textContent = (c.finished || 0).toLocaleString();
    $("counter-erred").textContent = (c.erred || 0).toLocaleString();
    $("counter-rate").textContent = Math.max(0, Math.round(st.rate)).toLocaleString();
    $("counter-transfer").textContent = fmtBytes(c.transfer_bytes || 0);
    $("counter-spill").textContent = fmtBytes(c.spill_bytes || 0);
    $("counter-lag").textContent = ((c.lag_us || 0) / 1000).toFixed(1);
  }

  // ------------------------------------------------------------ task stream
  const canvas = $("task-stream");
  let lanes = [];
  const laneSet = new Map(); // lane key -> sort key, kept as entries arrive
  let lanesDirty = false;
  const groupsSeen = new Set();

  function laneKey(r) { return r[3] + ":" + (r[4] === ACTIVITY_LANE ? "x" : r[4]); }

  function computeLanes() {
    if (!lanesDirty) return;
    lanesDirty = false;
    lanes = [...laneSet.entries()].sort((a, b) => a[1][0] - b[1][0] || a[1][1] - b[1][1]).map((e) => e[0]);
  }

  // Entries arrive about in order of their end (transfers and spills up
  // to a heartbeat late): walking back from the newest, those that ended
  // this long before the window cannot be in it, nor can older ones.
  const ARRIVAL_SLACK_US = 5e6;
  function* visible(start, end) {
    const s = st.stream;
    for (let i = s.length - 1; i >= 0; i--) {
      const r = s[i];
      if (r[5] + r[6] < start - ARRIVAL_SLACK_US) return;
      if (r[5] + r[6] >= start && r[5] <= end) yield r;
    }
  }

  function drawStream() {
    computeLanes();
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 800;
    const h = Math.max(60, lanes.length * LANE_H + 24);
    if (canvas.width !== w * dpr || canvas.height !== h * dpr) {
      canvas.style.height = h + "px";
      canvas.width = w * dpr;
      canvas.height = h * dpr;
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const labelW = 130;
    let end = st.viewEnd;
    if (st.follow || !end) {
      end = st.nowUs;
      const last = st.stream[st.stream.length - 1];
      if (last) end = Math.max(end, last[5] + last[6]);
      if (st.follow) st.viewEnd = end;
    }
    if (REPORT && !st.viewEnd) {
      // The whole report fits.
      let lo = Infinity, hi = 0;
      for (const r of st.stream) { lo = Math.min(lo, r[5]); hi = Math.max(hi, r[5] + r[6]); }
      if (hi > lo) { st.viewEnd = hi; st.viewSpan = (hi - lo) * 1.02; end = hi; }
    }
    const start = end - st.viewSpan;
    const scale = (w - labelW) / st.viewSpan;
    const index = new Map(lanes.map((k, i) => [k, i]));
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#555";
    for (let i = 0; i < lanes.length; i++) {
      const [wid, th] = lanes[i].split(":");
      const name = st.workerNames[wid] || "worker " + wid;
      ctx.fillText((th === "x" ? "↔ " : "") + name.slice(0, 16) + (th === "x" ? "" : " #" + th), 4, i * LANE_H + 12);
      ctx.fillStyle = i % 2 ? "#f8f9fa" : "#fff";
      ctx.fillRect(labelW, i * LANE_H, w - labelW, LANE_H);
      ctx.fillStyle = "#555";
    }
    let drawn = 0, tasks = 0;
    // Blocks narrower than a pixel still get one pixel: activity stays visible.
    // Errors last, on top: a failed task is never hidden by its neighbours.
    const shown = REPORT ? st.stream : [...visible(start, end)].reverse();
    for (const pass of [0, 1]) {
      for (const r of shown) {
        if ((r[7] === KIND.ERROR) !== (pass === 1)) continue;
        const s = r[5], e = r[5] + r[6];
        if (e < start || s > end) continue;
        const i = index.get(laneKey(r));
        const x = labelW + (s - start) * scale;
        const bw = Math.max(pass ? 2 : 1, r[6] * scale);
        ctx.fillStyle = colour(r);
        ctx.fillRect(Math.max(labelW, x), i * LANE_H + 2, Math.min(bw, w), LANE_H - 4);
        drawn++;
        tasks += r[9];
      }
    }
    // Time axis.
    ctx.fillStyle = "#555";
    const y = lanes.length * LANE_H + 16;
    for (let k = 0; k <= 4; k++) {
      const t = start + (st.viewSpan * k) / 4;
      const label = REPORT ? "+" + fmtDur(Math.max(0, Math.round(t - (REPORT.since_us || start)))) : "-" + fmtDur(Math.round(end - t));
      ctx.fillText(label, labelW + ((w - labelW) * k) / 4 - (k === 4 ? 50 : 0), y);
    }
    canvas.dataset.blocks = drawn;
    canvas.dataset.tasks = tasks;
    canvas.dataset.lanes = lanes.length;
    $("stream-info").textContent = `(${tasks.toLocaleString()} tasks in ${drawn.toLocaleString()} blocks on ${lanes.length} lanes, ${fmtDur(Math.round(st.viewSpan))} shown)`;
    drawLegend();
  }

  let legendKey = "";
  function drawLegend() {
    const key = groupsSeen.size + "/" + st.groups.length;
    if (key === legendKey) return; // unchanged: keep the DOM as it is
    legendKey = key;
    const items = [...groupsSeen].slice(0, 20).map((g) => el("span", {}, el("i", { style: "background:" + PALETTE[g % PALETTE.length] }), groupName(g)));
    items.push(el("span", {}, el("i", { style: "background:#e15759" }), "transfer"));
    items.push(el("span", {}, el("i", { style: "background:#f28e2b" }), "spill"));
    items.push(el("span", {}, el("i", { style: "background:#222" }), "error"));
    $("legend").replaceChildren(...items);
  }

  // Zoom with the wheel, scroll back in time by dragging, click for details.
  canvas.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    // Zoom around the time under the pointer (following stops, or the
    // moment would slide away).
    const rect = canvas.getBoundingClientRect();
    const frac = Math.min(1, Math.max(0, (ev.clientX - rect.left - 130) / Math.max(1, rect.width - 130)));
    const at = st.viewEnd - st.viewSpan * (1 - frac);
    const span = Math.min(3600e6, Math.max(1e3, st.viewSpan * (ev.deltaY > 0 ? 1.25 : 0.8)));
    if (frac < 1) setFollow(false);
    st.viewSpan = span;
    st.viewEnd = at + span * (1 - frac);
    drawStream();
  }, { passive: false });
  let drag = null;
  canvas.addEventListener("mousedown", (ev) => { drag = { x: ev.clientX, end: st.viewEnd, moved: false }; });
  window.addEventListener("mousemove", (ev) => {
    if (!drag) return;
    const dx = ev.clientX - drag.x;
    if (Math.abs(dx) > 3) drag.moved = true;
    if (!drag.moved) return;
    setFollow(false);
    const scale = st.viewSpan / Math.max(1, canvas.clientWidth - 130);
    st.viewEnd = drag.end - dx * scale;
    drawStream();
  });
  window.addEventListener("mouseup", (ev) => {
    if (drag && !drag.moved) clickStream(ev);
    drag = null;
  });
  function setFollow(on) {
    st.follow = on && !REPORT;
    $("stream-follow").classList.toggle("on", st.follow);
  }
  $("stream-follow").addEventListener("click", () => { setFollow(!st.follow); drawStream(); });

  function clickStream(ev) {
    const rect = canvas.getBoundingClientRect();
    const x = ev.clientX - rect.left, y = ev.clientY - rect.top;
    const lane = lanes[Math.floor(y / LANE_H)];
    if (!lane || x < 130) return;
    // Hit-test as drawStream draws (same order, same minimum widths): the
    // block drawn last under the pointer wins; else the nearest within 3 px.
    const scale = (canvas.clientWidth - 130) / st.viewSpan;
    const start = st.viewEnd - st.viewSpan;
    let hit = null, near = null, nearDist = 3;
    for (const pass of [0, 1]) {
      for (const r of st.stream) {
        if ((r[7] === KIND.ERROR) !== (pass === 1) || laneKey(r) !== lane) continue;
        const px = 130 + (r[5] - start) * scale;
        const bw = Math.max(pass ? 2 : 1, r[6] * scale);
        if (px - 1 <= x && x <= px + bw + 1) hit = r;
        const d = x < px ? px - x : x - px - bw;
        if (d < nearDist) { near = r; nearDist = d; }
      }
    }
    if (hit || near) showTask(hit || near);
  }

  async function showTask(r) {
    const body = $("detail-body");
    const rows = [
      ["kind", ["task", "error", "transfer", "spill"][r[7]]],
      ["group", groupName(r[2])],
      ["worker", st.workerNames[r[3]] || r[3]],
      ["thread", r[4] === ACTIVITY_LANE ? "-" : r[4]],
      ["duration", fmtDur(r[6])],
      ["bytes", fmtBytes(r[8])],
    ];
    if (r[9] > 1) rows.push(["merged", r[9] + " back-to-back tasks of this group (first shown)"]);
    const table = el("table", {}, ...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))));
    body.replaceChildren(el("h3", {}, "Task " + r[1]), table);
    $("task-detail").hidden = false;
    if (REPORT || !r[1]) return;
    try {
      const res = await fetch("api/task/" + r[1]);
      if (!res.ok) { body.append(el("p", {}, (await res.text()).trim())); return; }
      const d = await res.json();
      const more = [
        ["name", d.name], ["state", d.state || "forgotten"], ["held by", d.location || "-"],
        ["result size", d.size == null ? "-" : fmtBytes(d.size)],
      ];
      body.replaceChildren(el("h3", {}, d.name), table);
      table.append(...more.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))));
      if (d.inputs && d.inputs.length) {
        body.append(el("h4", {}, `inputs (${d.inputs.length})`),
          el("ul", {}, ...d.inputs.slice(0, 50).map((i) => el("li", {}, `${i.name} (${i.state || "forgotten"})`))));
      }
      if (d.error) body.append(el("h4", {}, "error"), el("pre", { class: "traceback" }, d.error));
      if (d.story && d.story.length) {
        // The scheduler's transitions for this task: what caused each, when.
        const t0 = d.story[0].time_us;
        body.append(el("h4", {}, "story"), el("table", { class: "story" },
          ...d.story.map((s) => el("tr", {},
            el("td", {}, `+${((s.time_us - t0) / 1000).toFixed(0)} ms`),
            el("td", {}, `${s.from} \u2192 ${s.to}${s.worker ? " on " + s.worker : ""}`),
            el("td", {}, s.stimulus)))));
      }
      // Each worker's own steps for it: the orders it got, fetches, start, end.
      for (const [w, steps] of Object.entries(d.worker_story || {})) {
        const t0 = steps[0].at_us;
        body.append(el("h4", {}, `on ${w}`), el("table", { class: "story" },
          ...steps.map((s) => el("tr", {},
            el("td", {}, `+${((s.at_us - t0) / 1000).toFixed(1)} ms`),
            el("td", {}, s.phase ? `${s.event} \u2192 ${s.phase}` : s.event),
            el("td", {}, s.attempt ? `order ${s.attempt}` : "")))));
      }
      if (d.worker_story_missing && d.worker_story_missing.length) {
        body.append(el("p", {}, `no answer from ${d.worker_story_missing.join(", ")}`));
      }
    } catch (e) {
      body.append(el("p", {}, "details unavailable: " + e));
    }
  }
  $("detail-close").addEventListener("click", () => { $("task-detail").hidden = true; });

  // ------------------------------------------------------------ progress
  function renderProgress() {
    if (REPORT) return renderReportProgress();
    const live = st.groups.filter((g) => g.waiting + g.ready + g.processing + g.memory + g.erred > 0 || (REPORT && g.finished > 0));
    const rows = live.map((g) => {
      const total = Math.max(1, g.submitted);
      const done = Math.min(g.submitted, g.finished) - g.memory;
      const pct = (n) => (100 * Math.max(0, n)) / total + "%";
      return el("div", { class: "group-row", "data-group": g.name },
        el("span", { class: "group-name", title: g.name }, g.name),
        el("div", { class: "bar" },
          el("div", { class: "seg-done", style: "width:" + pct(done) }),
          el("div", { class: "seg-memory", style: "width:" + pct(g.memory) }),
          el("div", { class: "seg-processing", style: "width:" + pct(g.processing) }),
          el("div", { class: "seg-erred", style: "width:" + pct(g.erred) })),
        el("span", { class: "group-counts" },
          `${Math.min(g.finished, g.submitted).toLocaleString()}/${g.submitted.toLocaleString()} done · ${g.processing} running · ${g.waiting + g.ready} waiting · ${g.memory} in memory · ${g.erred} erred`));
    });
    if (!rows.length) rows.push(el("p", { class: "hint" }, "no tasks"));
    $("progress").replaceChildren(...rows);
    if (REPORT) renderSummary();
  }

  // In a report: what ran inside the report's window, by group.
  function renderReportProgress() {
    const rows = (REPORT.summary || []).map((r) => {
      const total = Math.max(1, r.tasks + r.erred);
      return el("div", { class: "group-row", "data-group": r.group },
        el("span", { class: "group-name", title: r.group }, r.group),
        el("div", { class: "bar" },
          el("div", { class: "seg-done", style: "width:" + (100 * r.tasks) / total + "%" }),
          el("div", { class: "seg-erred", style: "width:" + (100 * r.erred) / total + "%" })),
        el("span", { class: "group-counts" }, `${r.tasks.toLocaleString()} done · ${r.erred} erred`));
    });
    $("progress").replaceChildren(...rows);
    renderSummary();
  }

  function renderSummary() {
    const box = $("summary-box");
    if (box.dataset.done) return;
    box.dataset.done = "1";
    const rows = (REPORT.summary || []).map((r) => el("tr", {},
      el("td", {}, r.group), el("td", {}, r.tasks.toLocaleString()), el("td", {}, r.erred),
      el("td", {}, r.total_s.toFixed(3) + " s"), el("td", {}, r.mean_ms.toFixed(3) + " ms"),
      el("td", {}, fmtBytes(r.transfer_bytes))));
    box.replaceChildren(
      el("h1", {}, REPORT.title || "Shoal performance report"),
      el("p", {}, `${(REPORT.duration_s || 0).toFixed(2)} s · ${st.workers.length} workers · ${(st.counters.finished || 0).toLocaleString()} tasks finished in all`),
      el("h2", {}, "Task groups"),
      el("table", { id: "summary-table" },
        el("thead", {}, el("tr", {}, ...["group", "tasks", "erred", "total", "mean", "transferred"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...rows)));
  }

  // ------------------------------------------------------------ workers
  function renderWorkers() {
    const rows = st.workers.map((w) => {
      const cap = Math.max(w.limit || 0, w.memory + w.spilled, 1);
      const unmanaged = Math.max(0, w.memory - w.managed);
      const pct = (n) => (100 * n) / cap + "%";
      return el("tr", { "data-worker": w.name },
        el("td", {}, w.name), el("td", {}, w.nthreads),
        el("td", {}, el("div", { class: "cpubar", title: w.cpu.toFixed(0) + "%" }, el("div", { style: "width:" + Math.min(100, w.cpu / w.nthreads) + "%" })), w.cpu.toFixed(0) + "%"),
        el("td", {}, el("div", { class: "mbar", title: `managed ${fmtBytes(w.managed)}, unmanaged ${fmtBytes(unmanaged)}, spilled ${fmtBytes(w.spilled)}` },
          el("div", { class: "m-managed", style: "width:" + pct(w.managed) }),
          el("div", { class: "m-unmanaged", style: "width:" + pct(unmanaged) }),
          el("div", { class: "m-spilled", style: "width:" + pct(w.spilled) })),
          el("span", { class: "mem-text" }, `${fmtBytes(w.managed)} / ${fmtBytes(unmanaged)} / ${fmtBytes(w.spilled)}`)),
        el("td", {}, w.limit ? fmtBytes(w.limit) : "none"),
        el("td", {}, w.processing), el("td", {}, w.held),
        el("td", {}, fmtBytes(w.bytes_in)), el("td", {}, fmtBytes(w.bytes_out)),
        el("td", {}, (w.last_seen_ms / 1000).toFixed(1) + " s" + (w.paused ? " (paused)" : "")));
    });
    document.querySelector("#workers-table tbody").replaceChildren(...rows);
  }

  // ------------------------------------------------------------ history (report)
  function drawLines(canvasEl, series, yMax, fmt) {
    const dpr = window.devicePixelRatio || 1;
    // The height comes from the markup, once: the drawing buffer's size must
    // not feed back into the displayed size.
    if (!canvasEl.dataset.h) canvasEl.dataset.h = canvasEl.getAttribute("height") || 200;
    const h = Number(canvasEl.dataset.h);
    canvasEl.style.height = h + "px";
    const w = canvasEl.clientWidth || 800;
    canvasEl.width = w * dpr; canvasEl.height = h * dpr;
    const ctx = canvasEl.getContext("2d");
    ctx.scale(dpr, dpr);
    let lo = Infinity, hi = 0;
    for (const s of series) for (const [t] of s.points) { lo = Math.min(lo, t); hi = Math.max(hi, t); }
    if (!(hi >= lo)) { ctx.fillText("no samples", 10, 20); return; }
    if (hi === lo) { lo -= 5e5; hi += 5e5; } // one sample each: a second around it
    const x = (t) => 50 + ((t - lo) / (hi - lo)) * (w - 60);
    const y = (v) => h - 20 - (v / yMax) * (h - 30);
    ctx.font = "11px system-ui"; ctx.fillStyle = "#555";
    ctx.fillText(fmt(yMax), 2, 12); ctx.fillText("0", 2, h - 20);
    ctx.fillText("+" + fmtDur(Math.round(hi - lo)), w - 60, h - 4);
    series.forEach((s, i) => {
      ctx.strokeStyle = PALETTE[i % PALETTE.length]; ctx.beginPath();
      s.points.forEach(([t, v], j) => (j ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
      ctx.stroke();
      for (const [t, v] of s.points) ctx.fillRect(x(t) - 1.5, y(v) - 1.5, 3, 3); // the samples
      ctx.fillStyle = ctx.strokeStyle; ctx.fillText(s.name, 60 + i * 140, 12);
    });
    canvasEl.dataset.series = series.length;
  }

  function drawHistory() {
    const mem = [], cpu = [];
    let maxMem = 1, maxCpu = 100;
    for (const [id, samples] of Object.entries(st.history)) {
      const name = st.workerNames[id] || "worker " + id;
      mem.push({ name, points: samples.map((s) => [s[0], s[1]]) });
      cpu.push({ name, points: samples.map((s) => [s[0], s[4]]) });
      for (const s of samples) { maxMem = Math.max(maxMem, s[1]); maxCpu = Math.max(maxCpu, s[4]); }
    }
    drawLines($("memory-chart"), mem, maxMem, fmtBytes);
    drawLines($("cpu-chart"), cpu, maxCpu, (v) => v.toFixed(0) + "%");
  }

  // ------------------------------------------------------------ graph
  async function loadGraph() {
    try {
      const res = await fetch("api/graph");
      if (res.ok) drawGraph(await res.json());
    } catch (e) { /* next refresh */ }
  }

  function drawGraph(g) {
    const svg = $("graph");
    const ns = "http://www.w3.org/2000/svg";
    const mk = (tag, attrs) => { const e = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; };
    // Layers by longest path from a source (groups rarely form cycles; a
    // cycle, e.g. a group depending on itself, is cut).
    const ids = g.nodes.map((n) => n.id);
    const depth = new Map(ids.map((i) => [i, 0]));
    for (let pass = 0; pass < ids.length; pass++) {
      let changed = false;
      for (const [a, b] of g.edges) {
        if (a === b || !depth.has(a) || !depth.has(b)) continue;
        if (depth.get(b) < depth.get(a) + 1) { depth.set(b, depth.get(a) + 1); changed = true; }
      }
      if (!changed) break;
    }
    const layers = new Map();
    for (const n of g.nodes) { const d = depth.get(n.id); if (!layers.has(d)) layers.set(d, []); layers.get(d).push(n); }
    const pos = new Map();
    const W = 170, H = 34, GX = 60, GY = 14;
    let maxRows = 1;
    for (const [d, ns_] of layers) { ns_.forEach((n, i) => pos.set(n.id, [20 + d * (W + GX), 20 + i * (H + GY)])); maxRows = Math.max(maxRows, ns_.length); }
    svg.setAttribute("height", Math.max(120, 40 + maxRows * (H + GY)));
    svg.replaceChildren();
    for (const [a, b, count] of g.edges) {
      if (!pos.has(a) || !pos.has(b) || a === b) continue;
      const [x1, y1] = pos.get(a), [x2, y2] = pos.get(b);
      const p = mk("path", { class: "graph-edge", d: `M${x1 + W},${y1 + H / 2} C${x1 + W + GX / 2},${y1 + H / 2} ${x2 - GX / 2},${y2 + H / 2} ${x2},${y2 + H / 2}`, "stroke-width": Math.min(4, 1 + Math.log10(count)) });
      svg.append(p);
    }
    for (const n of g.nodes) {
      const [x, y] = pos.get(n.id);
      const done = n.submitted ? Math.min(1, n.finished / n.submitted) : 0;
      const grp = mk("g", { class: "graph-node", "data-group": n.name });
      grp.append(mk("rect", { class: "fill", x, y, width: W * done, height: H }));
      const erred = n.submitted ? Math.min(1 - done, n.erred / n.submitted) : 0;
      if (erred > 0) grp.append(mk("rect", { class: "erred", x: x + W * done, y, width: W * erred, height: H }));
      grp.append(mk("rect", { class: "outline", x, y, width: W, height: H }));
      const t1 = mk("text", { x: x + 5, y: y + 14 }); t1.textContent = n.name.slice(0, 24);
      const t2 = mk("text", { x: x + 5, y: y + 28 }); t2.textContent = `${Math.min(n.finished, n.submitted)}/${n.submitted} · ${n.processing} running` + (n.erred ? ` · ${n.erred} erred` : "");
      grp.append(t1, t2);
      svg.append(grp);
    }
    svg.dataset.nodes = g.nodes.length;
  }

  // ------------------------------------------------------------ profile
  async function loadProfile() {
    const sel = $("profile-group");
    try {
      const res = await fetch("api/profile" + (sel.value ? "?group=" + encodeURIComponent(sel.value) : ""));
      if (!res.ok) return;
      const d = await res.json();
      const have = new Set([...sel.options].map((o) => o.value));
      for (const name of d.groups) if (!have.has(name)) sel.append(el("option", { value: name }, name));
      drawFlame(d.stacks);
    } catch (e) { /* next refresh */ }
  }
  $("profile-group").addEventListener("change", () => (REPORT ? drawFlame(REPORT.profile || {}) : loadProfile()));

  let flameRoot = null;
  function drawFlame(stacks) {
    const root = { name: "all", value: 0, children: new Map() };
    for (const [folded, n] of Object.entries(stacks)) {
      root.value += n;
      let node = root;
      for (const f of folded.split(";")) {
        if (!node.children.has(f)) node.children.set(f, { name: f, value: 0, children: new Map() });
        node = node.children.get(f);
        node.value += n;
      }
    }
    flameRoot = root;
    $("profile-total").textContent = ` ${root.value.toLocaleString()} samples`;
    paintFlame(root);
  }

  function paintFlame(top) {
    const box = $("flame");
    const w = box.clientWidth || 800;
    const frames = [];
    let maxDepth = 0;
    const walk = (node, x, width, depth) => {
      if (width < 2) return;
      maxDepth = Math.max(maxDepth, depth);
      const hue = 20 + ((node.name.length * 37) % 40);
      frames.push(el("div", {
        class: "frame", title: `${node.name}: ${node.value} samples`,
        style: `left:${x}px;top:${depth * 18}px;width:${width}px;background:hsl(${hue},85%,${60 + (depth % 3) * 6}%)`,
        onclick: () => paintFlame(node === top ? flameRoot : node),
      }, node.name));
      let cx = x;
      for (const c of node.children.values()) {
        const cw = (c.value / node.value) * width;
        walk(c, cx, cw, depth + 1);
        cx += cw;
      }
    };
    if (top.value) walk(top, 0, w, 0);
    box.style.height = (maxDepth + 1) * 18 + 4 + "px";
    box.replaceChildren(...(frames.length ? frames : [el("p", { class: "hint" }, "no samples yet (the profiler samples running tasks; SHOAL_PROFILE_INTERVAL=0 turns it off)")]));
    box.dataset.frames = frames.length;
  }

  // ------------------------------------------------------------ logs
  async function loadLogs() {
    try {
      const res = await fetch("api/logs");
      if (!res.ok) return;
      const d = await res.json();
      const parts = d.workers.map((w) => el("div", {}, el("h3", {}, w.name || "worker " + w.id), el("pre", {}, w.lines.join("\n") || "(nothing logged)")));
      $("logs").replaceChildren(...(parts.length ? parts : [el("p", { class: "hint" }, "no worker has logged anything")]));
    } catch (e) { /* next refresh */ }
  }

  // For browser tests and the curious: the page's state, and where a task
  // stream entry is drawn now (client coordinates of its middle).
  window.__shoal = {
    state: st,
    pointOf(r) {
      const rect = canvas.getBoundingClientRect();
      const i = lanes.indexOf(laneKey(r));
      if (i < 0) return null;
      const w = canvas.clientWidth - 130;
      const start = st.viewEnd - st.viewSpan;
      const mid = r[5] + r[6] / 2;
      if (mid < start || mid > st.viewEnd) return null;
      return { x: rect.left + 130 + ((mid - start) * w) / st.viewSpan, y: rect.top + i * LANE_H + LANE_H / 2 };
    },
  };

  // ------------------------------------------------------------ start
  const conn = $("connection");
  if (REPORT) {
    conn.textContent = "report";
    conn.className = "conn report";
    apply(REPORT);
    const ran = (REPORT.summary || []).reduce((n, r) => n + r.tasks, 0);
    st.rate = REPORT.duration_s ? ran / REPORT.duration_s : 0;
    show("status");
  } else {
    const connect = () => {
      const es = new EventSource("api/events?since=" + st.seq);
      es.onopen = () => { conn.textContent = "live"; conn.className = "conn live"; };
      es.onmessage = (ev) => { apply(JSON.parse(ev.data)); render(false); };
      es.onerror = () => { conn.textContent = "reconnecting"; conn.className = "conn lost"; };
    };
    connect();
    window.addEventListener("resize", () => render(true));
  }
})();
