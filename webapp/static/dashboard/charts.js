// Live line charts on uPlot (vendored): named series of (x, y) points, redrawn at most once a frame.

import { h, number } from "./dom.js";

export const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#db2777",
  "#65a30d", "#4f46e5", "#b45309"];

const HEIGHT = 240;
// Epochs and rounds are whole numbers: no tick at 1.25.
const WHOLE = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000];
// Past this many points a series shows a marker on every few only (about MARKERS of them): one per epoch
// would run together into a bar.
const ALL_MARKERS = 100;
const MARKERS = 50;

// Which points of series `si` get a marker, as the chart is drawn (null: all).
function thinned(u, si, show) {
  if (!show) return null;
  const count = u.data[0].length;
  if (count <= ALL_MARKERS) return null;
  const step = Math.ceil(count / MARKERS);
  const keep = [];
  for (let i = 0; i < count; i += step) if (u.data[si][i] !== null) keep.push(i);
  return keep;
}

export class LineChart {
  constructor(container, { title, xLabel, yLabel, range = null, xRange = null, xValue = (v) => number(v),
    logToggle = false }) {
    this.options = { title, xLabel, yLabel, range, xRange, xValue };
    this.log = false;
    this.series = new Map(); // key → {label, color, dash, width, points: Map(x → y)}
    this.el = h("div", { class: "chart", dataset: { points: "0" } });
    this.empty = h("p", { class: "chart-empty" }, `${title}: waiting for the first results…`);
    // A loss falls by orders of magnitude: on a log scale its late epochs are not a flat line at the bottom.
    const toggle = logToggle ? h("label", { class: "chart-toggle small" },
      h("input", { type: "checkbox", class: "log-scale", onchange: (e) => this.setLog(e.target.checked) }),
      " log scale") : null;
    container.append(h("figure", { class: "chart-box" }, toggle, this.empty, this.el));
    this.plot = null;
    this.rebuild = true;
    this.frame = 0;
    this.observer = new ResizeObserver(() => this.plot && this.plot.setSize(this.size()));
    this.observer.observe(this.el);
  }

  define(key, { label, color, dash = null, width = 2 }) {
    if (this.series.has(key)) return;
    this.series.set(key, { label, color, dash, width, points: new Map() });
    this.rebuild = true;
  }

  point(key, x, y) {
    if (y === null || y === undefined || !Number.isFinite(y)) return;
    this.series.get(key).points.set(x, y);
    if (!this.frame) this.frame = requestAnimationFrame(() => this.draw());
  }

  setLog(on) {
    this.log = on;
    this.el.dataset.scale = on ? "log" : "linear";
    this.rebuild = true;
    this.draw();
  }

  size() {
    return { width: Math.max(this.el.clientWidth, 200), height: HEIGHT };
  }

  data() {
    const all = new Set();
    for (const s of this.series.values()) for (const x of s.points.keys()) all.add(x);
    const xs = [...all].sort((a, b) => a - b);
    return [xs, ...[...this.series.values()].map((s) => xs.map((x) => (s.points.has(x) ? s.points.get(x) : null)))];
  }

  draw() {
    this.frame = 0;
    const data = this.data();
    this.el.dataset.points = String(data[0].length);
    this.empty.hidden = data[0].length > 0;
    if (!this.plot || this.rebuild) {
      if (this.plot) this.plot.destroy();
      this.plot = new window.uPlot(this.uplotOptions(), data, this.el);
      this.rebuild = false;
    } else {
      this.plot.setData(data);
    }
  }

  uplotOptions() {
    const { title, xLabel, yLabel, range, xRange, xValue } = this.options;
    const axis = { stroke: "#4b5563", grid: { stroke: "#e5e7eb" }, ticks: { stroke: "#e5e7eb" } };
    return {
      ...this.size(),
      title,
      // A fixed x range (the whole session's epochs or rounds): the curves grow across it.
      scales: { x: xRange ? { time: false, range: xRange } : { time: false },
        y: this.log ? { distr: 3 } : range ? { range } : {} },
      axes: [{ ...axis, label: xLabel, incrs: WHOLE }, { ...axis, label: yLabel, size: 56 }],
      cursor: { drag: { x: false, y: false } },
      // Validation series are dashed on the chart: a hollow, dashed square in the legend, training a filled one.
      legend: { markers: { dash: (u, i) => (u.series[i].dash ? "dashed" : "solid"),
        fill: (u, i) => (u.series[i].dash ? "transparent" : u.series[i].stroke(u, i)) } },
      series: [
        { label: xLabel, value: (u, v) => (v === null ? "–" : xValue(v)) },
        ...[...this.series.values()].map((s) => ({
          label: s.label,
          stroke: s.color,
          width: s.width,
          dash: s.dash || undefined,
          spanGaps: true,
          points: { show: true, filter: thinned },
          value: (u, v) => (v === null ? "–" : number(v)),
        })),
      ],
    };
  }

  destroy() {
    this.observer.disconnect();
    if (this.frame) cancelAnimationFrame(this.frame);
    if (this.plot) this.plot.destroy();
  }
}
