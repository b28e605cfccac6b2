// A searching sweep's trials (GET /sessions/<id>/trials, kept live by `trial` and `heartbeat` events):
// why the winner won, a table sortable by any column, every trial's validation curve on one chart, and
// a scatter of one setting against the held-out score.

import { request } from "../api.js";
import { LineChart, PALETTE } from "../charts.js";
import { h, number, percent } from "../dom.js";

const SVG = "http://www.w3.org/2000/svg";
const ENDED = new Set(["COMPLETED", "PRUNED", "FAILED"]);
const SHORT = { learning_rate: "lr", batch_size: "batch", weight_decay: "weight decay" };

function svg(tag, attrs = {}, text = null) {
  const el = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  if (text !== null) el.textContent = text;
  return el;
}

function shown(name, value) {
  if (name === "hidden") return Array.isArray(value) ? (value.join("×") || "none") : String(value);
  return typeof value === "number" ? number(value, 3) : String(value);
}

export function settingsText(params) {
  return Object.keys(params || {}).sort().map((k) => `${SHORT[k] || k} ${shown(k, params[k])}`).join(" · ");
}

export class TrialsPanel {
  constructor(container, session, path, signal) {
    this.session = session;
    this.path = path;
    this.signal = signal;
    this.regression = session.task === "regression";
    this.metric = this.regression ? "val_r2" : "val_accuracy";
    this.space = session.search.space;
    this.searched = Object.keys(this.space).filter((k) => !("value" in this.space[k]));
    this.trials = new Map(); // number → trial, as the API shows it
    this.current = new Map(); // peer → the trial it trains now
    this.best = null;
    this.sort = { key: "value", descending: true };
    this.fetching = null;
    this.frame = 0;

    this.winner = h("div", { id: "winner", class: "result" });
    this.counts = h("p", { class: "facts", id: "trial-counts" });
    this.head = h("tr");
    this.body = h("tbody");
    this.paramSelect = h("select", { id: "scatter-param", "aria-label": "setting on the x axis" },
      this.searched.map((k) => h("option", { value: k }, k)));
    this.paramSelect.addEventListener("change", () => this.renderScatter());
    this.scatter = h("div", { class: "scatter", id: "scatter" });
    const charts = h("div", { class: "charts" });
    container.append(h("section", { class: "card", id: "trials-card" },
      h("h2", {}, "Trials"), this.winner, this.counts,
      h("div", { class: "scroll" }, h("table", { class: "list sortable", id: "trials" }, h("thead", {}, this.head),
        this.body)),
      charts));
    const epochs = Math.max(2, ...session.peers.map((p) => p.epochs || 1));
    this.curves = new LineChart(charts, { title: `Validation ${this.regression ? "R²" : "accuracy"} of every trial`,
      yLabel: this.regression ? "R²" : "accuracy", xLabel: "epoch", xRange: [1, epochs],
      range: this.regression ? null : [0, 1.02] });
    charts.append(h("figure", { class: "chart-box" },
      h("div", { class: "row between" }, h("strong", { class: "small" }, "Setting against held-out score"),
        h("label", { class: "small muted" }, "x: ", this.paramSelect)),
      this.scatter));
    this.renderHead();
    this.refresh();
  }

  // The share of the search's trials that have ended (what the time left is estimated from).
  fractionDone() {
    const ended = [...this.trials.values()].filter((t) => ENDED.has(t.status)).length;
    return ended / this.session.search.trials;
  }

  // --- live ------------------------------------------------------------------------------------

  onTrial(data) {
    const before = this.trials.get(data.number) || {};
    this.trials.set(data.number, { ...before, ...data, curve: before.curve || [] });
    if (data.status === "RUNNING") this.current.set(data.peer, data.number);
    this.define(data.number);
    // The settled record (curve, times) comes with the list: fetch it when a trial was scored or ended.
    if (data.epochs_done > 0 || ENDED.has(data.status)) this.refreshSoon();
    this.schedule();
  }

  onHeartbeat(beat) {
    const number_ = this.current.get(beat.peer);
    if (number_ === undefined) return;
    this.curves.point(`trial:${number_}`, beat.epoch, beat[this.metric]);
  }

  refreshSoon() {
    if (this.fetching) return;
    this.fetching = setTimeout(() => { this.fetching = null; this.refresh(); }, 300);
  }

  async refresh() {
    try {
      const listed = await request(`${this.path}/trials`, { signal: this.signal });
      this.best = listed.best;
      for (const trial of listed.items) {
        this.trials.set(trial.number, trial);
        this.define(trial.number);
        for (const point of trial.curve || []) this.curves.point(`trial:${trial.number}`, point.epoch, point.metric);
        if (trial.status === "RUNNING") this.current.set(trial.peer, trial.number);
      }
      this.schedule();
    } catch (error) {
      if (error.name !== "AbortError") this.counts.textContent = `trials could not be read: ${error.message}`;
    }
  }

  define(n) {
    this.curves.define(`trial:${n}`, { label: `trial ${n}`, color: PALETTE[n % PALETTE.length], width: 1.5 });
  }

  schedule() {
    if (!this.frame) this.frame = requestAnimationFrame(() => this.render());
  }

  render() {
    this.frame = 0;
    this.renderWinner();
    this.renderRows();
    this.renderScatter();
  }

  // --- why the winner won --------------------------------------------------------------------------

  format(value) {
    return this.regression ? number(value) : percent(value);
  }

  ranked() {
    return [...this.trials.values()].filter((t) => t.value !== null && t.value !== undefined)
      .sort((a, b) => b.value - a.value || (a.val_loss ?? Infinity) - (b.val_loss ?? Infinity)
        || (a.best_epoch || 0) - (b.best_epoch || 0) || a.number - b.number);
  }

  renderWinner() {
    const all = [...this.trials.values()];
    const count = (s) => all.filter((t) => t.status === s).length;
    const total = this.session.search.trials;
    this.counts.textContent = `${all.length} of ${total} trials begun · ${count("COMPLETED")} completed · `
      + `${count("PRUNED")} stopped early · ${count("FAILED")} failed · ${count("RUNNING")} running`;
    const ranked = this.ranked();
    if (!ranked.length) {
      this.winner.replaceChildren(h("span", { class: "muted" }, "No trial has been scored yet."));
      return;
    }
    const [top, next] = ranked;
    const lead = this.best && this.best.number === top.number ? "Best trial" : "Leading";
    const parts = [h("strong", {}, `${lead}: trial ${top.number}`),
      ` (${settingsText(top.params)}) — ${this.metric} ${this.format(top.value)} on the held-out rows at epoch `
      + `${top.best_epoch}`];
    if (next && next.value === top.value) {
      parts.push(`; tied with trial ${next.number} on ${this.metric}, it wins on the tie-breaker, held-out loss `
        + `${number(top.val_loss)} against ${number(next.val_loss)}`);
    } else if (next) {
      parts.push(`; next: trial ${next.number} with ${this.format(next.value)} (ties would go to the lower `
        + "held-out loss)");
    }
    this.winner.replaceChildren(...parts);
  }

  // --- the table -------------------------------------------------------------------------------

  columns() {
    return [
      ["number", "Trial"], ["peer", "Peer"], ["status", "Status"], ["value", this.regression ? "R²" : "Accuracy"],
      ["val_loss", "Val loss"], ["best_epoch", "Best epoch"], ["epochs_done", "Epochs"],
      ...this.searched.map((k) => [`param:${k}`, SHORT[k] || k]), ["seconds", "Peer time"],
    ];
  }

  renderHead() {
    this.head.replaceChildren(...this.columns().map(([key, label]) => {
      const active = this.sort.key === key;
      const button = h("button", { type: "button", class: "link sort", dataset: { key } },
        label, active ? (this.sort.descending ? " ▼" : " ▲") : "");
      button.addEventListener("click", () => {
        this.sort = { key, descending: active ? !this.sort.descending : key === "value" };
        this.renderHead();
        this.renderRows();
      });
      return h("th", { "aria-sort": active ? (this.sort.descending ? "descending" : "ascending") : "none" }, button);
    }));
  }

  valueOf(trial, key) {
    if (key.startsWith("param:")) {
      const v = (trial.params || {})[key.slice(6)];
      return Array.isArray(v) ? v.reduce((a, b) => a * 10000 + b, 0) : v;
    }
    return trial[key];
  }

  renderRows() {
    const { key, descending } = this.sort;
    const ranked = this.ranked();
    // Equal values keep the ranking's order (its tie-breakers: held-out loss, then the earlier epoch), so that
    // sorted by score the table's first row is the winner the heading names, even when trials tie on score.
    const rank = new Map(ranked.map((t, i) => [t.number, i]));
    const byRank = (a, b) => (rank.get(a.number) ?? Infinity) - (rank.get(b.number) ?? Infinity)
      || a.number - b.number;
    const rows = [...this.trials.values()].sort((a, b) => {
      const x = this.valueOf(a, key);
      const y = this.valueOf(b, key);
      if (x === y) return byRank(a, b);
      if (x === null || x === undefined) return 1; // unscored trials last either way
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * (descending ? -1 : 1);
    });
    const best = ranked[0];
    this.body.replaceChildren(...rows.map((t) => h("tr", {
      class: best && t.number === best.number ? "best" : "", dataset: { trial: String(t.number), status: t.status } },
    h("td", {}, best && t.number === best.number ? `${t.number} ★` : String(t.number)),
    h("td", {}, t.peer),
    h("td", { title: t.reason || "" }, h("span", { class: `badge ${t.status.toLowerCase()}` }, t.status)),
    h("td", { class: "num value" }, t.value === null || t.value === undefined ? "–" : this.format(t.value)),
    h("td", { class: "num" }, number(t.val_loss)),
    h("td", { class: "num" }, t.best_epoch ?? "–"),
    h("td", { class: "num" }, `${t.epochs_done}/${t.epochs}`),
    ...this.searched.map((k) => h("td", { class: "num" }, shown(k, (t.params || {})[k]))),
    h("td", { class: "num" }, t.seconds ? `${number(t.seconds, 3)} s` : "–"))));
  }

  // --- the scatter -----------------------------------------------------------------------------------

  renderScatter() {
    const param = this.paramSelect.value;
    const dimension = this.space[param] || {};
    const points = [...this.trials.values()].filter((t) => t.value !== null && t.value !== undefined);
    const width = Math.max(this.scatter.clientWidth || 420, 280);
    const height = 240;
    const pad = { left: 52, right: 14, top: 12, bottom: 34 };
    const plot = svg("svg", { width, height, role: "img", "aria-label": `${param} against ${this.metric}` });
    if (!points.length || !param) {
      this.scatter.replaceChildren(h("p", { class: "chart-empty" }, "Points appear as trials are scored."));
      return;
    }
    const categorical = "choices" in dimension;
    const choices = categorical ? dimension.choices.map((c) => JSON.stringify(c)) : [];
    const xOf = (t) => {
      const v = (t.params || {})[param];
      if (categorical) return choices.indexOf(JSON.stringify(v));
      return dimension.log ? Math.log10(v) : v;
    };
    const xs = categorical ? [-0.5, choices.length - 0.5]
      : dimension.log ? [Math.log10(dimension.low), Math.log10(dimension.high)] : [dimension.low, dimension.high];
    const ys = points.map((t) => t.value);
    let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    if (y1 - y0 < 1e-9) { y0 -= 0.05; y1 += 0.05; }
    const sx = (x) => pad.left + ((x - xs[0]) / (xs[1] - xs[0] || 1)) * (width - pad.left - pad.right);
    const sy = (y) => height - pad.bottom - ((y - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
    plot.append(svg("line", { x1: pad.left, y1: height - pad.bottom, x2: width - pad.right, y2: height - pad.bottom,
      stroke: "#9ca3af" }), svg("line", { x1: pad.left, y1: pad.top, x2: pad.left, y2: height - pad.bottom,
      stroke: "#9ca3af" }));
    for (const y of [y0, (y0 + y1) / 2, y1]) {
      plot.append(svg("text", { x: pad.left - 6, y: sy(y) + 4, "text-anchor": "end", "font-size": 11,
        fill: "#4b5563" }, this.format(y)));
    }
    const ticks = categorical ? choices.map((c, i) => [i, shown(param, JSON.parse(c))])
      : [0, 0.5, 1].map((f) => {
        const x = xs[0] + f * (xs[1] - xs[0]);
        return [x, number(dimension.log ? 10 ** x : x, 2)];
      });
    for (const [x, label] of ticks) {
      plot.append(svg("text", { x: sx(x), y: height - pad.bottom + 16, "text-anchor": "middle", "font-size": 11,
        fill: "#4b5563" }, label));
    }
    plot.append(svg("text", { x: (width + pad.left) / 2, y: height - 4, "text-anchor": "middle", "font-size": 11,
      fill: "#111827" }, `${param}${dimension.log ? " (log scale)" : ""}`));
    const best = this.ranked()[0];
    for (const t of points) {
      const color = PALETTE[t.number % PALETTE.length];
      const completed = t.status === "COMPLETED";
      const dot = svg("circle", { cx: sx(xOf(t)), cy: sy(t.value), r: best && best.number === t.number ? 7 : 5,
        fill: completed ? color : "#fff", stroke: color, "stroke-width": 2, class: `point ${t.status.toLowerCase()}`,
        "data-trial": t.number });
      dot.append(svg("title", {}, `trial ${t.number} (${t.status.toLowerCase()}): ${this.format(t.value)}; `
        + settingsText(t.params)));
      plot.append(dot);
    }
    this.scatter.replaceChildren(plot,
      h("p", { class: "small muted" }, "filled: completed · hollow: stopped early · largest: the best trial"));
  }

  destroy() {
    this.curves.destroy();
    if (this.frame) cancelAnimationFrame(this.frame);
    if (this.fetching) clearTimeout(this.fetching);
  }
}
