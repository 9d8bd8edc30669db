"use strict";
// vitlens report page: reads the embedded data, recomputes attention rows and rollout, draws the overlay.
// Everything is local: no request leaves the page (its Content-Security-Policy forbids any).
(function () {
  const $ = (id) => document.getElementById(id);
  const DATA = JSON.parse($("vitlens-data").textContent);
  const api = { ready: false, error: null };
  window.vitlensReport = api;
  const TYPES = { u8: Uint8Array, u16: Uint16Array, i32: Int32Array, f32: Float32Array };
  const RESIDUAL = 0.5; // Rollout's default residual_weight; rows are normalised (its default too)

  function fromBase64(text) {
    const s = atob(text);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }

  async function inflate(bytes) {
    if (typeof DecompressionStream === "undefined") {
      throw new Error("this browser cannot unpack the report's data (no DecompressionStream); " +
        "open it in a current Chrome, Edge, Firefox or Safari");
    }
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Response(stream).arrayBuffer();
  }

  // ---- the model's attention ------------------------------------------------------------------------------------
  let SEG = {}, BLOCKS = [], CODES = null, SCALES = null, WIDE = null, WIDE_SCALES = null;

  function prepareBlocks() {
    let codeOff = 0, scaleOff = 0, wideOff = 0, wideScaleOff = 0;
    return DATA.blocks.map((b, i) => {
      const st = DATA.stages[b.stage];
      const n = st.prefix + st.grid[0] * st.grid[1];
      const groups = b.windows ? SEG["groups:" + i] : new Int32Array(n);
      const byGroup = new Map();
      for (let t = 0; t < n; t++) {
        if (!byGroup.has(groups[t])) byGroup.set(groups[t], []);
        byGroup.get(groups[t]).push(t);
      }
      for (const [g, list] of byGroup) byGroup.set(g, Int32Array.from(list));
      const mem = new Array(n);
      const rowStart = new Int32Array(n + 1);
      for (let t = 0; t < n; t++) {
        mem[t] = byGroup.get(groups[t]);
        rowStart[t + 1] = rowStart[t] + mem[t].length;
      }
      const E = rowStart[n];
      // 8-bit storage keeps the prefix tokens' rows (CLS, registers) again as 16-bit codes: read those instead
      const wide = DATA.attention.bits === 8 && st.prefix > 0;
      const blk = { index: i, stage: b.stage, heads: b.heads, n, prefix: st.prefix, grid: st.grid, groups, mem,
        rowStart, E, codeOff, scaleOff, wide, wideOff, wideScaleOff, prefixE: rowStart[st.prefix],
        windows: b.windows, window: b.window, shift: b.shift };
      codeOff += b.heads * E;
      scaleOff += b.heads * n;
      if (wide) { wideOff += b.heads * blk.prefixE; wideScaleOff += b.heads * st.prefix; }
      return blk;
    });
  }

  // 16-bit relative codes: code 2048 e + m stands for 2^(e - 31) (1 + m / 2048) times the row's scale, 0 for 0
  // (vitlens.viz.report.attention.RELATIVE_VALUES)
  const RELATIVE = new Float64Array(65536);
  for (let c = 1; c < 65536; c++) RELATIVE[c] = Math.pow(2, (c >> 11) - 31) * (1 + (c & 2047) / 2048);

  // Where head h's row of token t is stored: [codes, index of its first entry, scale, table]: value = code * scale,
  // or table[code] * scale when table is given (square-root and relative codes).
  let VALUE_TABLE = null;
  function rowSource(blk, h, t) {
    if (blk.wide && t < blk.prefix) {
      const first = blk.wideOff + h * blk.prefixE + blk.rowStart[t];
      return [WIDE, first, WIDE_SCALES[blk.wideScaleOff + h * blk.prefix + t], null];
    }
    const first = blk.codeOff + h * blk.E + blk.rowStart[t];
    return [CODES, first, SCALES[blk.scaleOff + h * blk.n + t], VALUE_TABLE];
  }

  // Row of token t in block blk for head h (or "mean"), dense over the block's n tokens.
  function attentionRow(blk, head, t) {
    const out = new Float64Array(blk.n);
    const m = blk.mem[t], e0 = blk.rowStart[t];
    const heads = head === "mean" ? [...Array(blk.heads).keys()] : [head];
    for (const h of heads) {
      const [codes, base, s, table] = rowSource(blk, h, t);
      for (let k = 0; k < m.length; k++) out[m[k]] += (table ? table[codes[base + k]] : codes[base + k]) * s;
    }
    if (head === "mean") for (let j = 0; j < blk.n; j++) out[j] /= blk.heads;
    return out;
  }

  // Heads fused entry by entry (mean, max or min), in storage order (row-major over stored entries).
  function fused(blk, fusion) {
    const out = new Float64Array(blk.E);
    for (let h = 0; h < blk.heads; h++) {
      for (let t = 0; t < blk.n; t++) {
        const [codes, first, s, table] = rowSource(blk, h, t);
        const base = first - blk.rowStart[t];
        for (let e = blk.rowStart[t]; e < blk.rowStart[t + 1]; e++) {
          const v = (table ? table[codes[base + e]] : codes[base + e]) * s;
          if (h === 0 || fusion === "mean") out[e] = h === 0 ? v : out[e] + v;
          else if (fusion === "max") { if (v > out[e]) out[e] = v; }
          else if (v < out[e]) out[e] = v;
        }
      }
    }
    if (fusion === "mean") for (let e = 0; e < blk.E; e++) out[e] /= blk.heads;
    return out;
  }

  // As vitlens.methods.rollout.discard_lowest: zero the floor(ratio * N^2) lowest of the N x N entries (entries
  // outside a token's window are zeros too), then give entry [0, 0] back its value. Ties are cut in row-major order.
  function discard(blk, vals, ratio) {
    const n = blk.n;
    const k = Math.floor(ratio * n * n);
    if (k === 0) return vals;
    const implicitZeros = n * n - blk.E;
    if (k <= implicitZeros) return vals; // only zeros are discarded
    const m = k - implicitZeros;
    const out = Float64Array.from(vals);
    if (m >= blk.E) out.fill(0);
    else {
      const order = new Uint32Array(blk.E);
      for (let e = 0; e < blk.E; e++) order[e] = e;
      order.sort((a, b) => (vals[a] - vals[b]) || (a - b));
      for (let i = 0; i < m; i++) out[order[i]] = 0;
    }
    out[0] = vals[0]; // entry [0, 0]: token 0's group lists token 0 first
    return out;
  }

  // v (over the block's tokens) times the block's (1 - w) A + w I, rows divided by their sums.
  function times(blk, vals, v) {
    const out = new Float64Array(blk.n);
    for (let i = 0; i < blk.n; i++) {
      if (v[i] === 0) continue;
      let sum = RESIDUAL;
      for (let e = blk.rowStart[i]; e < blk.rowStart[i + 1]; e++) sum += (1 - RESIDUAL) * vals[e];
      const c = v[i] / Math.max(sum, 1.1754943508222875e-38);
      const m = blk.mem[i], e0 = blk.rowStart[i];
      for (let k = 0; k < m.length; k++) out[m[k]] += c * (1 - RESIDUAL) * vals[e0 + k];
      out[i] += c * RESIDUAL;
    }
    return out;
  }

  function readoutWeights(st) {
    const P = st.grid[0] * st.grid[1], n = st.prefix + P;
    const w = new Float64Array(n);
    if (st.readout === "cls") w[0] = 1;
    else if (st.readout === "cls+dist") { w[0] = 0.5; w[1] = 0.5; }
    else if (st.readout === "mean") for (let j = st.prefix; j < n; j++) w[j] = 1 / P;
    else { w[0] = 0.5; for (let j = st.prefix; j < n; j++) w[j] = 0.5 / P; }
    return w;
  }

  // v over stage s+1's tokens times the patch-merging map to stage s (merged token = mean of its 2x2 parents).
  function down(v, s) {
    const a = DATA.stages[s], b = DATA.stages[s + 1];
    const [h, w] = a.grid, w2 = b.grid[1];
    const count = new Float64Array(b.grid[0] * w2);
    for (let i = 0; i < h; i++) for (let j = 0; j < w; j++) count[(i >> 1) * w2 + (j >> 1)] += 1;
    const out = new Float64Array(a.prefix + h * w);
    for (let i = 0; i < h; i++) {
      for (let j = 0; j < w; j++) {
        const c = (i >> 1) * w2 + (j >> 1);
        out[a.prefix + i * w + j] = v[b.prefix + c] / count[c];
      }
    }
    return out;
  }

  function maxNormalise(arr) {
    let peak = -Infinity;
    for (const x of arr) if (x > peak) peak = x;
    peak = Math.max(peak, 1.1754943508222875e-38);
    return arr.map((x) => x / peak);
  }

  const rolloutCache = new Map();

  // The rollout after every block (Rollout(per_layer=True)'s maps, each divided by its maximum).
  function rolloutMaps(fusion, ratio) {
    const key = fusion + "|" + ratio;
    if (rolloutCache.has(key)) return rolloutCache.get(key);
    const mats = BLOCKS.map((b) => discard(b, fused(b, fusion), ratio));
    const first = DATA.stages[0];
    const maps = BLOCKS.map((blk, l) => {
      let cur = blk.stage;
      let v = readoutWeights(DATA.stages[cur]);
      for (let b = l; b >= 0; b--) {
        while (cur > BLOCKS[b].stage) { v = down(v, cur - 1); cur--; }
        v = times(BLOCKS[b], mats[b], v);
      }
      while (cur > 0) { v = down(v, cur - 1); cur--; }
      return maxNormalise(v.slice(first.prefix));
    });
    rolloutCache.set(key, maps);
    return maps;
  }

  // ---- state and views ------------------------------------------------------------------------------------------
  const state = {
    view: "rollout", block: 0, head: "mean", query: null, locked: false, hover: null,
    fusion: "mean", discard: 0, cls: null, opacity: 0.5, cmap: "jet",
  };
  let IMG = null, CANVAS = null, CTX = null, SCALE = 1;
  let shown = null; // what is drawn: {values, grid, raw, caption}

  function firstGrid() { return DATA.stages[0].grid; }

  function methodByName(name) { return DATA.methods.find((m) => m.name === name); }

  function methodMap(m, cls) {
    const entry = m.classSpecific ? m.maps.find((e) => e.class === cls) : m.maps[0];
    if (!entry) return null;
    const codes = SEG[entry.segment];
    const values = new Float64Array(codes.length);
    for (let i = 0; i < codes.length; i++) values[i] = entry.low + codes[i] * entry.step;
    return { values, grid: entry.shape };
  }

  function queryText(q) {
    if (!q) return "none";
    return q.kind === "cls" ? "CLS token" : "patch (" + q.r + ", " + q.c + ")";
  }

  function labelOf(cls) {
    const c = DATA.classes.find((x) => x.index === cls);
    return c ? c.label : "class " + cls;
  }

  function compute() {
    const blk = BLOCKS[state.block];
    if (state.view === "attention") {
      const st = DATA.stages[blk.stage];
      let t;
      if (state.query && state.query.kind === "cls" && st.prefix > 0) t = 0;
      else {
        const q = state.query && state.query.kind === "patch" ? state.query : centrePatch();
        const f = 1 << blk.stage; // a first-stage patch lies in this stage's token (r >> stage, c >> stage)
        t = st.prefix + Math.floor(q.r / f) * st.grid[1] + Math.floor(q.c / f);
      }
      const row = attentionRow(blk, state.head, t);
      const head = state.head === "mean" ? "mean of heads" : "head " + state.head;
      return { values: row.slice(st.prefix), grid: st.grid, raw: true, windows: blk.windows ? blk : null,
        caption: "Attention of the " + queryText(state.query) + ", block " + state.block + stageText(blk) + ", " + head };
    }
    if (state.view === "rollout") {
      const maps = rolloutMaps(state.fusion, state.discard);
      return { values: maps[state.block], grid: firstGrid(), raw: false,
        caption: "Rollout after block " + state.block + stageText(blk) + " (" + state.fusion + " fusion, discard " +
          state.discard.toFixed(2) + ")" };
    }
    const m = methodByName(state.view);
    const got = methodMap(m, state.cls);
    if (!got) return null;
    return { values: got.values, grid: got.grid, raw: false,
      caption: m.title.split("\u0001").join(labelOf(state.cls)) };
  }

  function stageText(blk) {
    return DATA.stages.length > 1 ? " (stage " + blk.stage + ")" : "";
  }

  function centrePatch() {
    const [gh, gw] = firstGrid();
    return { kind: "patch", r: gh >> 1, c: gw >> 1 };
  }

  // ---- drawing --------------------------------------------------------------------------------------------------
  function lut() { return SEG["cmap:" + state.cmap]; }

  function draw() {
    const W = CANVAS.width, H = CANVAS.height;
    CTX.imageSmoothingEnabled = true;
    CTX.drawImage(IMG, 0, 0, W, H);
    if (shown && state.opacity > 0) {
      const { values, grid } = shown;
      const [gh, gw] = grid;
      let peak = 0;
      for (const x of values) if (x > peak) peak = x;
      const norm = peak > 0 ? 1 / peak : 0;
      const img = CTX.getImageData(0, 0, W, H);
      const px = img.data, L = lut(), a = state.opacity;
      for (let y = 0; y < H; y++) {
        let sy = (y + 0.5) * gh / H - 0.5;
        sy = Math.min(Math.max(sy, 0), gh - 1);
        const y0 = Math.floor(sy), y1 = Math.min(y0 + 1, gh - 1), fy = sy - y0;
        for (let x = 0; x < W; x++) {
          let sx = (x + 0.5) * gw / W - 0.5;
          sx = Math.min(Math.max(sx, 0), gw - 1);
          const x0 = Math.floor(sx), x1 = Math.min(x0 + 1, gw - 1), fx = sx - x0;
          const v = (values[y0 * gw + x0] * (1 - fx) + values[y0 * gw + x1] * fx) * (1 - fy) +
            (values[y1 * gw + x0] * (1 - fx) + values[y1 * gw + x1] * fx) * fy;
          const u = Math.min(Math.max(v * norm, 0), 1);
          const k = Math.min(255, Math.floor(u * 256)) * 3;
          const p = (y * W + x) * 4;
          px[p] = (1 - a) * px[p] + a * L[k];
          px[p + 1] = (1 - a) * px[p + 1] + a * L[k + 1];
          px[p + 2] = (1 - a) * px[p + 2] + a * L[k + 2];
        }
      }
      CTX.putImageData(img, 0, 0);
    }
    if (shown && shown.windows) drawWindows(shown.windows);
    if (state.view === "attention") {
      if (state.query && state.query.kind === "patch") outline(state.query, state.locked ? "#ffffff" : "#dddddd", 2);
    } else if (state.hover) outline(state.hover, "rgba(255,255,255,0.8)", 1);
    drawLegend();
  }

  function outline(q, colour, width) {
    const [gh, gw] = firstGrid();
    const sx = CANVAS.width / gw, sy = CANVAS.height / gh;
    CTX.lineWidth = width;
    CTX.strokeStyle = "#000000";
    CTX.strokeRect(q.c * sx - 1, q.r * sy - 1, sx + 2, sy + 2);
    CTX.strokeStyle = colour;
    CTX.strokeRect(q.c * sx, q.r * sy, sx, sy);
  }

  // Window borders of a Swin block: between neighbouring tokens of different windows (the cyclic shift undone).
  function drawWindows(blk) {
    const [gh, gw] = blk.grid;
    const g = blk.groups, p = blk.prefix;
    const sx = CANVAS.width / gw, sy = CANVAS.height / gh;
    CTX.strokeStyle = "#ff2020";
    CTX.lineWidth = Math.max(1, Math.round(SCALE));
    CTX.beginPath();
    for (let r = 0; r < gh; r++) {
      for (let c = 0; c < gw; c++) {
        const id = g[p + r * gw + c];
        if (c + 1 < gw && id !== g[p + r * gw + c + 1]) { CTX.moveTo((c + 1) * sx, r * sy); CTX.lineTo((c + 1) * sx, (r + 1) * sy); }
        if (r + 1 < gh && id !== g[p + (r + 1) * gw + c]) { CTX.moveTo(c * sx, (r + 1) * sy); CTX.lineTo((c + 1) * sx, (r + 1) * sy); }
      }
    }
    CTX.stroke();
  }

  function drawLegend() {
    const bar = $("colorbar"), ctx = bar.getContext("2d");
    const img = ctx.createImageData(256, 1), L = lut();
    for (let i = 0; i < 256; i++) {
      img.data[i * 4] = L[i * 3]; img.data[i * 4 + 1] = L[i * 3 + 1]; img.data[i * 4 + 2] = L[i * 3 + 2];
      img.data[i * 4 + 3] = 255;
    }
    for (let y = 0; y < bar.height; y++) ctx.putImageData(img, 0, y);
    let peak = 0;
    if (shown) for (const x of shown.values) if (x > peak) peak = x;
    $("legend-max").textContent = shown && shown.raw ? "max " + peak.toPrecision(3) : "max";
  }

  // ---- controls -------------------------------------------------------------------------------------------------
  function update() {
    const blk = BLOCKS[state.block];
    const isMethod = state.view !== "attention" && state.view !== "rollout";
    $("block-controls").classList.toggle("hidden", isMethod);
    $("attention-controls").classList.toggle("hidden", state.view !== "attention");
    $("rollout-controls").classList.toggle("hidden", state.view !== "rollout");
    const m = isMethod ? methodByName(state.view) : null;
    $("class-controls").classList.toggle("hidden", DATA.classes.length === 0);
    $("block-label").textContent = "block " + state.block + " of " + BLOCKS.length + stageText(blk) +
      (state.view === "rollout" ? ": rollout of blocks 0.." + state.block : "");
    fillHeads(blk);
    $("query-cls").classList.toggle("hidden", DATA.stages[0].prefix === 0);
    $("query-label").textContent = "Query: " + queryText(state.query) + (state.locked ? " (held)" : "");
    $("discard-label").textContent = state.discard.toFixed(2);
    for (const b of document.querySelectorAll("#classes button")) {
      b.classList.toggle("selected", Number(b.dataset.cls) === state.cls);
      b.disabled = !!m && !m.classSpecific;
    }
    shown = compute();
    $("caption").textContent = shown ? shown.caption : "";
    document.body.dataset.view = state.view;
    draw();
  }

  function fillHeads(blk) {
    const sel = $("head");
    const want = ["mean", ...Array(blk.heads).keys()].map(String);
    const have = [...sel.options].map((o) => o.value);
    if (want.join() !== have.join()) {
      sel.textContent = "";
      for (const v of want) {
        const o = document.createElement("option");
        o.value = v;
        o.textContent = v === "mean" ? "mean of heads" : "head " + v;
        sel.appendChild(o);
      }
    }
    if (state.head !== "mean" && state.head >= blk.heads) state.head = "mean";
    sel.value = String(state.head);
  }

  function patchAt(ev) {
    const rect = CANVAS.getBoundingClientRect();
    const [gh, gw] = firstGrid();
    const c = Math.floor((ev.clientX - rect.left) / rect.width * gw);
    const r = Math.floor((ev.clientY - rect.top) / rect.height * gh);
    if (r < 0 || c < 0 || r >= gh || c >= gw) return null;
    return { kind: "patch", r, c };
  }

  function hoverText(q) {
    if (!q || !shown) return "";
    const [gh, gw] = firstGrid(), [h, w] = shown.grid;
    const r = Math.min(h - 1, Math.floor((q.r + 0.5) * h / gh)), c = Math.min(w - 1, Math.floor((q.c + 0.5) * w / gw));
    return "patch (" + q.r + ", " + q.c + "): " + shown.values[r * w + c].toPrecision(4);
  }

  function buildControls() {
    const views = $("views");
    const choices = [["attention", "attention of a patch"], ["rollout", "rollout"]];
    for (const m of DATA.methods) choices.push([m.name, m.name.replace(/_/g, " ")]);
    for (const [value, text] of choices) {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "radio"; input.name = "view"; input.value = value; input.id = "view-" + value;
      input.checked = value === state.view;
      input.addEventListener("change", () => { state.view = value; update(); });
      label.appendChild(input);
      label.appendChild(document.createTextNode(" " + text));
      views.appendChild(label);
    }
    const list = $("classes");
    for (const c of DATA.classes) {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button"; b.dataset.cls = String(c.index);
      const name = document.createElement("span"); name.className = "label"; name.textContent = c.label;
      const prob = document.createElement("span"); prob.className = "prob"; prob.textContent = (100 * c.prob).toFixed(1) + "%";
      b.appendChild(name); b.appendChild(prob);
      b.addEventListener("click", () => {
        state.cls = c.index;
        const m = methodByName(state.view);
        if ((!m || !m.classSpecific) && DATA.methods.some((x) => x.classSpecific)) {
          state.view = DATA.methods.find((x) => x.classSpecific).name; // a class is chosen to see its maps
          $("view-" + state.view).checked = true;
        }
        update();
      });
      li.appendChild(b); list.appendChild(li);
    }
    const cmap = $("cmap");
    for (const name of DATA.colormaps) {
      const o = document.createElement("option"); o.value = name; o.textContent = name; cmap.appendChild(o);
    }
    const block = $("block");
    block.max = String(BLOCKS.length - 1);
    block.value = String(state.block);
    block.addEventListener("input", () => { state.block = Number(block.value); update(); });
    $("head").addEventListener("change", (e) => { const v = e.target.value; state.head = v === "mean" ? v : Number(v); update(); });
    $("fusion").addEventListener("change", (e) => { state.fusion = e.target.value; update(); });
    $("discard").addEventListener("input", (e) => { state.discard = Number(e.target.value); update(); });
    $("opacity").addEventListener("input", (e) => { state.opacity = Number(e.target.value); draw(); });
    cmap.addEventListener("change", (e) => { state.cmap = e.target.value; draw(); });
    $("query-cls").addEventListener("click", () => { state.query = { kind: "cls" }; state.locked = true; state.view = "attention"; $("view-attention").checked = true; update(); });
    $("download").addEventListener("click", download);
    CANVAS.addEventListener("mousemove", (ev) => {
      const q = patchAt(ev);
      state.hover = q;
      if (state.view === "attention" && !state.locked && q) { state.query = q; update(); }
      else draw();
      $("hover").textContent = hoverText(q);
    });
    CANVAS.addEventListener("mouseleave", () => { state.hover = null; $("hover").textContent = ""; draw(); });
    CANVAS.addEventListener("click", (ev) => {
      const q = patchAt(ev);
      if (!q) return;
      const same = state.locked && state.query && state.query.kind === "patch" && state.query.r === q.r && state.query.c === q.c;
      if (state.view !== "attention") { state.view = "attention"; $("view-attention").checked = true; }
      state.query = q;
      state.locked = !same;
      update();
    });
  }

  function fileName() {
    const stem = DATA.title.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9._-]+/g, "_").slice(0, 80) || "report";
    const extra = state.view === "attention" || state.view === "rollout" ? "_block" + state.block : "";
    return stem + "_" + state.view + extra + ".png";
  }

  function toBlob() {
    return new Promise((resolve) => CANVAS.toBlob(resolve, "image/png"));
  }

  async function download() {
    const blob = await toBlob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = fileName();
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 5000);
  }

  function number(x) { return x === 0 ? "0" : x < 1e-3 ? x.toExponential(1) : x.toPrecision(2); }

  // "; rollout within 2e-5 of the library's (largest at min fusion, discard 0)", from the measured errors
  function rolloutText(errors) {
    const keys = Object.keys(errors || {});
    if (!keys.length) return "";
    const worst = keys.reduce((a, b) => (errors[b] > errors[a] ? b : a));
    if (errors[worst] === 0) return "; rollout equal to the library's";
    const [fusion, discard] = worst.split("/");
    return "; rollout within " + number(errors[worst]) + " of the library's (largest at " + fusion +
      " fusion, discard " + discard + ")";
  }

  // ---- start ----------------------------------------------------------------------------------------------------
  async function start() {
    $("title").textContent = DATA.title;
    const att = DATA.attention;
    const heads = [...new Set(DATA.blocks.map((b) => b.heads))].join("/");
    $("subtitle").textContent = DATA.model + ": " + DATA.blocks.length + " blocks, " + heads + " heads" +
      (DATA.stages.length > 1 ? ", " + DATA.stages.length + " stages" : "") + "; attention stored " +
      (att.bits === 32 ? "as the model's float32 values (exact)" : "as " + att.bits + "-bit " +
        (att.sqrt ? "square-root " : att.relative ? "relative " : "") + "codes per row" +
        (att.bits === 8 ? " (16-bit for the CLS and other prefix rows)" : "") + " (each value within " +
        number(att.maxError) + ")") + rolloutText(att.rolloutError);
    for (const n of DATA.notes) { const li = document.createElement("li"); li.textContent = n; $("notes").appendChild(li); }
    const buffer = await inflate(fromBase64(DATA.blob));
    for (const s of DATA.segments) SEG[s.name] = new TYPES[s.dtype](buffer, s.offset, s.length);
    CODES = SEG.codes; SCALES = SEG.scales; WIDE = SEG.wide; WIDE_SCALES = SEG.wideScales;
    if (att.relative) VALUE_TABLE = RELATIVE;
    else if (att.sqrt) VALUE_TABLE = Float64Array.from({ length: 256 }, (_, c) => c * c);
    BLOCKS = prepareBlocks();
    IMG = new Image();
    IMG.src = DATA.image.src;
    await IMG.decode();
    CANVAS = $("canvas");
    SCALE = Math.max(1, Math.round(448 / Math.max(DATA.image.width, DATA.image.height)));
    CANVAS.width = DATA.image.width * SCALE;
    CANVAS.height = DATA.image.height * SCALE;
    CTX = CANVAS.getContext("2d", { willReadFrequently: true });
    state.block = BLOCKS.length - 1;
    state.cls = DATA.classes.length ? DATA.classes[0].index : null;
    state.query = DATA.stages[0].prefix > 0 ? { kind: "cls" } : centrePatch();
    buildControls();
    update();
    $("footer").textContent = "Made by vitlens. Rollout and attention rows are computed in this page from the " +
      "stored attention; the other maps were computed by vitlens for each listed class.";
    $("status").textContent = "";
    api.ready = true;
    document.body.dataset.ready = "1";
  }

  api.state = state;
  api.current = () => shown && {
    view: state.view, block: state.block, head: state.head, query: state.query, fusion: state.fusion,
    discard: state.discard, cls: state.cls, grid: shown.grid, values: Array.from(shown.values), caption: shown.caption,
  };
  api.rollout = (fusion, ratio) => rolloutMaps(fusion, ratio).map((m) => Array.from(m));
  api.pngSize = async () => (await toBlob()).size;
  api.fileName = () => fileName();

  start().catch((err) => {
    api.error = String(err && err.message ? err.message : err);
    const s = $("status");
    s.textContent = "The report could not be shown: " + api.error;
    s.className = "error";
    document.body.dataset.ready = "error";
  });
})();
