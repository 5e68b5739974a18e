// kdbench leaderboard page: sortable tables and each run's curves (drawn when its cell opens).
"use strict";
(function () {
  const runs = JSON.parse(document.getElementById("runs-data").textContent);
  const SVG = "http://www.w3.org/2000/svg";

  // ---------------------------------------------------------------- sorting
  // A header click sorts the rows of the table's "sorted" body (teacher rows stay on top):
  // numbers (data-v) descending first, names ascending first; empty cells always last.
  function sortBy(table, col, th) {
    const kind = th.dataset.sort;
    const dir = th.getAttribute("aria-sort") === (kind === "num" ? "descending" : "ascending")
      ? (kind === "num" ? "ascending" : "descending") : (kind === "num" ? "descending" : "ascending");
    table.querySelectorAll("thead th").forEach(h => h.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", dir);
    const sign = dir === "ascending" ? 1 : -1;
    table.querySelectorAll("tbody.sorted").forEach(body => {
      const rows = Array.from(body.rows);
      const key = r => {
        const cell = r.cells[col];
        if (kind === "num") {
          const v = cell.dataset.v;
          return v === undefined || v === "" ? null : parseFloat(v);
        }
        return cell.textContent.trim().toLowerCase();
      };
      rows.map((r, i) => [key(r), i, r]).sort((a, b) => {
        if (a[0] === null || b[0] === null) return (a[0] === null) - (b[0] === null) || a[1] - b[1];
        if (a[0] < b[0]) return -sign;
        if (a[0] > b[0]) return sign;
        return a[1] - b[1];
      }).forEach(x => body.appendChild(x[2]));
    });
  }
  document.querySelectorAll("table.sortable").forEach(table => {
    table.querySelectorAll("thead th").forEach((th, col) => {
      th.tabIndex = 0;
      th.addEventListener("click", () => sortBy(table, col, th));
      th.addEventListener("keydown", e => { if (e.key === "Enter") sortBy(table, col, th); });
    });
  });

  // ---------------------------------------------------------------- curves
  const CHARTS = [["top1", "top-1 (%)"], ["loss", "loss"]];
  const SPLITS = ["train", "val", "test"];
  function el(name, attrs, parent) {
    const e = document.createElementNS(SVG, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function niceTicks(lo, hi, n) {
    const raw = (hi - lo) / n, p = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map(m => m * p).find(s => raw <= s);
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9; t += step) out.push(+t.toPrecision(10));
    return out;
  }
  function chart(data, what, title) {
    const W = 300, H = 170, L = 42, R = 8, T = 26, B = 26;
    const epochs = data.epoch;
    const series = SPLITS.map(s => [s, data[s + "_" + what]]).filter(x => x[1] && x[1].some(v => v !== null));
    const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, class: "curve " + what, role: "img",
                           "aria-label": title + " per epoch"});
    el("text", {x: 2, y: 12, class: "title"}, svg).textContent = title;
    // The chart's own key, top right: the splits it draws.
    series.forEach(([split], k) => {
      const x0 = W - R - 52 * (series.length - k);
      el("line", {x1: x0, x2: x0 + 18, y1: 8, y2: 8, class: "s-" + split}, svg);
      el("text", {x: x0 + 22, y: 12, class: "key"}, svg).textContent = split;
    });
    if (!series.length) { el("text", {x: L, y: H / 2}, svg).textContent = "not recorded"; return svg; }
    const vals = series.flatMap(x => x[1]).filter(v => v !== null);
    let lo = Math.min(...vals), hi = Math.max(...vals);
    const log = what === "loss" && lo > 0 && hi / lo > 20;
    const f = log ? Math.log10 : (v => v);
    let flo = f(lo), fhi = f(hi);
    if (fhi - flo < 1e-9) { flo -= 0.5; fhi += 0.5; }
    const pad = (fhi - flo) * 0.06; flo -= pad; fhi += pad;
    const e0 = Math.min(...epochs), e1 = Math.max(...epochs);
    const x = e => L + (W - L - R) * (e1 === e0 ? 0.5 : (e - e0) / (e1 - e0));
    const y = v => T + (H - T - B) * (1 - (f(v) - flo) / (fhi - flo));
    const yt = log ? niceTicks(flo, fhi, 4).filter(t => Number.isInteger(t)).map(t => Math.pow(10, t))
                   : niceTicks(flo, fhi, 4);
    for (const t of (yt.length ? yt : [lo, hi])) {
      el("line", {x1: L, x2: W - R, y1: y(t), y2: y(t), class: "grid"}, svg);
      el("text", {x: L - 4, y: y(t) + 4, class: "tick end"}, svg).textContent = +t.toPrecision(3);
    }
    const xt = e1 - e0 > 10 ? niceTicks(e0, e1, 5) : epochs;
    for (const e of xt) el("text", {x: x(e), y: H - 10, class: "tick"}, svg).textContent = e;
    el("text", {x: W - R, y: H - 1, class: "tick end"}, svg).textContent = "epoch";
    el("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}, svg);
    for (const [split, ys] of series) {
      const pts = epochs.map((e, i) => [e, ys[i]]).filter(p => p[1] !== null);
      el("polyline", {class: "s-" + split, points: pts.map(p => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ")}, svg);
      for (const [e, v] of pts) {
        const c = el("circle", {class: "pt s-" + split, cx: x(e).toFixed(1), cy: y(v).toFixed(1), r: 2.2}, svg);
        el("title", {}, c).textContent = `${split} ${what}, epoch ${e}: ${+v.toPrecision(5)}`;
      }
    }
    return svg;
  }
  function draw(details) {
    details.querySelectorAll(".curves[data-run]").forEach(div => {
      if (div.childElementCount) return;
      const data = runs[div.dataset.run];
      if (!data) return;
      for (const [what, title] of CHARTS) div.appendChild(chart(data, what, title));
    });
  }
  document.querySelectorAll("details.cellruns").forEach(d => d.addEventListener("toggle", () => { if (d.open) draw(d); }));
  // A cell's link (or a #c... address) opens its runs.
  function openTarget() {
    const id = decodeURIComponent(location.hash.slice(1));
    const d = id && document.getElementById(id);
    if (d && d.tagName === "DETAILS") { d.open = true; draw(d); d.scrollIntoView({block: "start"}); }
  }
  window.addEventListener("hashchange", openTarget);
  // The same link clicked twice changes no hash: open it anyway.
  document.querySelectorAll("a.cell").forEach(a => a.addEventListener("click", () => setTimeout(openTarget, 0)));
  openTarget();
})();
