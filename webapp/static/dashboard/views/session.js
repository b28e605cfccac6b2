// One session: its facts (GET /sessions/<id>), then live curves and the peers' table from its event stream.

import { download, request } from "../api.js";
import { LineChart, PALETTE } from "../charts.js";
import { FINISHED, alertBox, badge, duration, h, number, percent, repeat, span, when } from "../dom.js";
import { follow } from "../events.js";
import { TrialsPanel, settingsText } from "./trials.js";

const PROGRESS = ["epoch", "epochs", "round", "loss", "accuracy", "val_loss", "val_accuracy", "val_r2",
  "samples_per_sec"];

export async function sessionView(root, id, signal) {
  const path = `/sessions/${encodeURIComponent(id)}`;
  const page = new SessionPage(root, await request(path, { signal }), path, signal);
  signal.addEventListener("abort", () => page.destroy());
  page.follow();
}

class SessionPage {
  constructor(root, session, path, signal) {
    this.session = session;
    this.path = path;
    this.signal = signal;
    this.federated = session.mode === "federated";
    // Asynchronous: no rounds; the global model gets a version every `buffer_size` updates.
    this.apart = this.federated && session.federated.schedule === "async";
    this.regression = session.task === "regression";
    // A sweep that searches: its trials are the story (their curves, table and scatter), not each peer's runs.
    this.searching = Boolean(session.search);
    this.peers = new Map(session.peers.map((p, i) => [p.name, { ...p, color: PALETTE[i % PALETTE.length] }]));
    this.rowsFrame = 0;

    this.status = h("span");
    this.facts = h("p", { class: "facts" });
    this.timing = h("p", { class: "facts", id: "timing" });
    this.reason = h("div");
    this.connection = h("span", { class: "connection", id: "connection" });
    this.actions = h("div", { class: "row" });
    this.results = h("div", { id: "results" });
    this.rows = h("tbody");
    const charts = h("div", { class: "charts" });
    root.append(
      h("section", { class: "card" },
        h("div", { class: "row between" },
          h("h1", {}, `Session `, h("span", { class: "mono", title: session.id }, session.id.slice(0, 8)), " ", this.status),
          this.connection),
        this.facts, this.timing, this.reason, this.actions, this.results),
      h("section", { class: "card", hidden: this.searching }, h("h2", {}, this.apart
        ? "Global model, version by version" : this.federated ? "Global model, round by round" : "Curves"), charts),
      h("section", { class: "card" }, h("h2", {}, "Peers"),
        h("div", { class: "scroll" }, h("table", { class: "list", id: "peer-runs" },
          h("thead", {}, h("tr", {}, ["Peer", "Status", "Progress", "Loss", this.metricName(), "Samples/s",
            "Settings"].map((t) => h("th", {}, t)))),
          this.rows))),
    );
    const x = this.apart ? "version" : this.federated ? "round" : "epoch";
    const xValue = this.federated ? (v) => (Number.isInteger(v) ? `${x} ${v}` : number(v, 3)) : undefined;
    const fed = session.federated || {};
    const xRange = this.apart ? [0, Math.ceil(fed.max_updates / fed.buffer_size)]
      : this.federated ? [0, fed.rounds] : [1, Math.max(2, ...session.peers.map((p) => p.epochs || 1))];
    const common = { xLabel: x, xValue, xRange };
    this.loss = new LineChart(charts, { title: "Loss", yLabel: "loss", logToggle: true, ...common });
    this.metric = this.regression
      ? new LineChart(charts, { title: "Validation R²", yLabel: "R²", ...common })
      : new LineChart(charts, { title: "Accuracy", yLabel: "accuracy", range: [0, 1.02], ...common });
    this.defineSeries();
    if (this.searching) {
      const trialsBox = h("div");
      root.children[0].after(trialsBox);
      this.trials = new TrialsPanel(trialsBox, session, path, signal);
    }
    this.renderHeader();
    this.renderRows();
    repeat(1, () => this.renderTiming(), signal);
  }

  // How far the slowest peer is, 0–1 (null when it cannot be told: an asynchronous session runs to a budget).
  progress() {
    if (this.searching) return this.trials ? this.trials.fractionDone() : null;
    if (this.apart) return null;
    const fed = this.session.federated || {};
    const fractions = [...this.peers.values()].filter((p) => p.status !== "FAILED").map((p) => (this.federated
      ? ((p.round || 0) * fed.local_epochs + (p.epoch || 0)) / (fed.rounds * fed.local_epochs)
      : (p.epoch || 0) / (p.epochs || 1)));
    return fractions.length ? Math.min(...fractions) : null;
  }

  // How long it has run, and (while it runs) about how long is left, from the epochs done in that time.
  renderTiming() {
    const s = this.session;
    if (!s.started_at) {
      this.timing.textContent = FINISHED.has(s.status) ? "" : "waiting for its peers to start";
      return;
    }
    const took = duration(s.started_at, FINISHED.has(s.status) ? s.finished_at : null);
    if (FINISHED.has(s.status)) {
      this.timing.textContent = `ran ${took}`;
      return;
    }
    const done = this.progress();
    const elapsed = (Date.now() - new Date(s.started_at).getTime()) / 1000;
    const left = done > 0 && done < 1 ? ` · about ${span(elapsed * (1 - done) / done)} left` : "";
    this.timing.textContent = `running for ${took}${left}`;
  }

  // Sweep peers validate on held-out rows; federated peers only train on their shard (the global model is validated).
  metricName() {
    if (this.regression) return this.federated ? "R²" : "Val R²";
    return this.federated ? "Accuracy" : "Val accuracy";
  }

  metricOf(p) {
    if (this.regression) return number(p.val_r2);
    return percent(this.federated ? p.accuracy : p.val_accuracy);
  }

  defineSeries() {
    if (this.federated) {
      const global = { color: "#111827", width: 3 };
      this.loss.define("global", { label: "global model (val)", ...global });
      this.metric.define("global", { label: "global model (val)", ...global });
    }
    for (const [name, peer] of this.peers) this.definePeer(name, peer);
  }

  definePeer(name, peer) {
    const thin = this.federated ? 1 : 2;
    this.loss.define(`${name}:train`, { label: `${name} train`, color: peer.color, width: thin });
    if (!this.federated) this.loss.define(`${name}:val`, { label: `${name} val`, color: peer.color, dash: [6, 4] });
    if (this.regression) {
      this.metric.define(`${name}:val`, { label: `${name} val`, color: peer.color, width: thin, dash: [6, 4] });
    } else {
      this.metric.define(`${name}:train`, { label: `${name} train`, color: peer.color, width: thin });
      if (!this.federated) {
        this.metric.define(`${name}:val`, { label: `${name} val`, color: peer.color, dash: [6, 4] });
      }
    }
  }

  follow() {
    follow(`${this.path}/events`, {
      signal: this.signal,
      after: this.lastEventId ?? null,
      onEvent: (type, data, id) => {
        if (id !== null && id !== undefined) this.lastEventId = id;
        this.onEvent(type, data);
      },
      onState: (state) => this.setConnection(state),
    }).catch((error) => {
      this.setConnection("stopped");
      this.reason.replaceChildren(alertBox(error));
    });
  }

  onEvent(type, data) {
    if (type === "status") {
      Object.assign(this.session, { status: data.status, reason: data.reason });
      if (data.status === "RUNNING" && data.at) this.session.started_at = data.at;
      if (FINISHED.has(data.status) && data.at) this.session.finished_at = data.at;
      this.renderHeader();
    } else if (type === "heartbeat") {
      this.heartbeat(data);
      if (this.trials) this.trials.onHeartbeat(data);
    } else if (type === "trial") {
      this.trials?.onTrial(data);
      const peer = this.peers.get(data.peer);
      if (peer && data.status === "RUNNING") {
        Object.assign(peer, { hyperparameters: data.hyperparameters, epochs: data.epochs, trial: data.number });
        if (data.epochs_done === 0) Object.assign(peer, { epoch: 0, loss: null, val_loss: null, val_accuracy: null });
        this.scheduleRows();
      }
    } else if (type === "round") {
      const x = data.round + 1;
      this.loss.point("global", x, data.metrics.val_loss);
      this.metric.point("global", x, this.regression ? data.metrics.val_r2 : data.metrics.val_accuracy);
    } else if (type === "peer") {
      let peer = this.peers.get(data.peer);
      if (!peer) {
        // A peer that joined the running session (elastic sessions take peers that come online).
        peer = { name: data.peer, status: data.status, color: PALETTE[this.peers.size % PALETTE.length] };
        this.peers.set(data.peer, peer);
        this.definePeer(data.peer, peer);
      }
      Object.assign(peer, { status: data.status, error: data.error ?? peer.error });
      this.scheduleRows();
    } else if (type === "end") {
      Object.assign(this.session, { status: data.status, reason: data.reason });
      this.renderHeader();
      // The results and the model are facts of the finished session.
      request(this.path, { signal: this.signal }).then((session) => {
        this.session = session;
        for (const run of session.peers) Object.assign(this.peers.get(run.name) || {}, run);
        this.renderHeader();
        this.renderRows();
        this.trials?.refresh();
      }).catch(() => {});
    }
  }

  heartbeat(beat) {
    const peer = this.peers.get(beat.peer);
    if (!peer) return;
    for (const key of PROGRESS) if (key in beat) peer[key] = beat[key];
    if (peer.status === "PENDING") peer.status = "RUNNING";
    // Federated: a peer's local epochs fill the space between two rounds of the global model.
    // Asynchronous: task n ends about when version n / buffer_size is made.
    const x = this.apart ? (beat.round + beat.epoch / beat.epochs) / this.session.federated.buffer_size
      : this.federated ? beat.round + beat.epoch / beat.epochs : beat.epoch;
    this.loss.point(`${beat.peer}:train`, x, beat.loss);
    if (!this.federated) this.loss.point(`${beat.peer}:val`, x, beat.val_loss);
    if (this.regression) {
      this.metric.point(`${beat.peer}:val`, x, beat.val_r2);
    } else {
      this.metric.point(`${beat.peer}:train`, x, beat.accuracy);
      if (!this.federated) this.metric.point(`${beat.peer}:val`, x, beat.val_accuracy);
    }
    this.scheduleRows();
  }

  setConnection(state) {
    const text = {
      live: "● live", reconnecting: "reconnecting…", "server-stopped": "server stopped — reconnecting…", ended: "",
      disconnected: "disconnected — reconnecting…",
      stopped: "stream stopped",
    }[state];
    this.connection.textContent = text ?? state;
    this.connection.className = `connection ${state}`;
  }

  renderHeader() {
    const s = this.session;
    this.status.replaceChildren(badge(s.status));
    this.status.id = "status";
    this.status.dataset.status = s.status;
    const search = s.search;
    const settings = search
      ? `search of ${search.trials} trials (${search.sampler === "tpe" ? "TPE" : "random"} sampler, ${
        { asha: "successive halving", median: "median", none: "no" }[search.pruner]} pruning${
        search.time_budget ? `, ${span(search.time_budget)} budget` : ""}) on ${s.peers.length} peers`
      : this.apart
      ? `async: ${s.federated.max_updates} updates of ${s.federated.local_epochs} local epochs, folded `
        + `${s.federated.buffer_size} at a time, ${s.federated.partition}, ${s.federated.aggregation}`
      : this.federated
      ? `${s.federated.rounds} rounds × ${s.federated.local_epochs} local epochs, ${s.federated.partition}, `
        + `${s.federated.aggregation}, ${s.federated.algorithm || "fedavg"}`
      : `${s.peers.length} peers, each its own settings`;
    this.facts.replaceChildren(
      h("strong", {}, s.mode), ` · ${s.dataset.filename} (${s.dataset.rows.toLocaleString()} rows) · `,
      `target ${s.target} · ${settings} · started ${when(s.created_at)}`,
      s.finished_at ? ` · finished ${when(s.finished_at)}` : "");
    this.reason.replaceChildren(s.reason && s.status !== "COMPLETED"
      ? h("div", { class: "alert", role: "alert" }, s.reason) : "");
    const finished = FINISHED.has(s.status);
    const cancel = h("button", { type: "button", id: "cancel", disabled: finished, onclick: () => this.cancel(cancel) },
      "Cancel");
    const model = h("button", { type: "button", class: "primary", id: "download", disabled: !s.model_available,
      title: s.model_available ? "a safetensors file; python -m trainer.predict uses it" : "no model yet",
      onclick: () => download(`${this.path}/model`, `peertrain-${s.id}.safetensors`).catch((error) =>
        this.reason.replaceChildren(alertBox(error))) }, "Download model");
    const resume = h("button", { type: "button", id: "resume", class: "primary",
      title: "go on from the last round or checkpoint, on the peers it had", onclick: () => this.resume(resume) },
    "Resume");
    this.actions.replaceChildren(...(finished ? [] : [cancel]), ...(s.status === "INTERRUPTED" ? [resume] : []), model);
    this.renderResults();
    this.renderTiming();
  }

  renderResults() {
    const r = this.session.results || {};
    if (!r.metric) {
      this.results.replaceChildren();
      return;
    }
    const value = r.metric.includes("accuracy") ? percent(r.best_value) : number(r.best_value);
    const best = r.best_trial !== undefined ? `best trial ${r.best_trial} (${settingsText(r.best_params)}, peer `
      + `${r.best_peer}, epoch ${r.best_epoch}): ` : r.best_peer ? `best peer ${r.best_peer}: ` : "global model: ";
    this.results.replaceChildren(h("p", { class: "result" }, h("strong", {}, "Result "), `${best}${r.metric} ${value}`));
  }

  async cancel(button) {
    button.disabled = true;
    try {
      await request(`${this.path}/cancel`, { method: "POST" });
    } catch (error) {
      this.reason.replaceChildren(alertBox(error));
      button.disabled = false;
    }
  }

  async resume(button) {
    button.disabled = true;
    try {
      await request(`${this.path}/resume`, { method: "POST" });
      Object.assign(this.session, { status: "PENDING", reason: null, finished_at: null });
      this.renderHeader();
      this.follow(); // from the last event shown: the interruption's end was not the end
    } catch (error) {
      this.reason.replaceChildren(alertBox(error));
      button.disabled = false;
    }
  }

  scheduleRows() {
    if (!this.rowsFrame) this.rowsFrame = requestAnimationFrame(() => this.renderRows());
  }

  renderRows() {
    this.rowsFrame = 0;
    const fed = this.session.federated || {};
    this.rows.replaceChildren(...[...this.peers.values()].map((p) => {
      let done = 0;
      let total = 1;
      let label = "waiting";
      if (this.apart) {
        total = fed.local_epochs;
        done = p.epoch || 0;
        if (p.epoch) label = `update ${p.round + 1} · epoch ${p.epoch}/${fed.local_epochs}`;
      } else if (this.federated && p.epochs) {
        total = fed.rounds * fed.local_epochs;
        done = Math.min(total, p.epoch ? p.round * fed.local_epochs + p.epoch : 0);
        if (p.epoch) label = `round ${p.round + 1}/${fed.rounds} · epoch ${p.epoch}/${fed.local_epochs}`;
      } else if (p.epochs) {
        total = p.epochs;
        done = p.epoch || 0;
        if (p.epoch) label = `epoch ${p.epoch}/${p.epochs}`;
        if (this.searching && p.trial !== undefined && p.status === "RUNNING") label = `trial ${p.trial} · ${label}`;
      }
      const hp = p.hyperparameters || {};
      const settings = [hp.learning_rate !== undefined && `lr ${number(hp.learning_rate, 3)}`,
        !this.federated && hp.epochs && `${hp.epochs} epochs`, hp.batch_size && `batch ${hp.batch_size}`,
        hp.optimizer, hp.hidden && `hidden [${hp.hidden.join(", ")}]`, hp.dropout && `dropout ${hp.dropout}`,
        hp.weight_decay && `weight decay ${hp.weight_decay}`].filter(Boolean).join(" · ");
      return h("tr", { dataset: { peer: p.name } },
        h("td", {}, h("span", { class: "swatch", "aria-hidden": "true", dataset: { color: p.color } }),
          h("strong", {}, p.name)),
        h("td", {}, badge(p.status), p.error ? h("div", { class: "reason" }, p.error) : null),
        h("td", { class: "progress-cell" }, h("progress", { max: String(total), value: String(done) }),
          h("div", { class: "small" }, label)),
        h("td", { class: "num" }, number(p.loss)),
        h("td", { class: "num" }, this.metricOf(p)),
        h("td", { class: "num" }, number(p.samples_per_sec, 3)),
        h("td", { class: "small wrap" }, settings));
    }));
    for (const swatch of this.rows.querySelectorAll(".swatch")) swatch.style.background = swatch.dataset.color;
  }

  destroy() {
    this.trials?.destroy();
    this.loss.destroy();
    this.metric.destroy();
    if (this.rowsFrame) cancelAnimationFrame(this.rowsFrame);
  }
}
