// The new-session form: upload a CSV and see it as the server reads it (POST /datasets/preview),
// pick the target and features, the mode, the peers and their hyperparameters, then start.

import { request } from "../api.js";
import { alertBox, field, h } from "../dom.js";

const HP_DEFAULTS = { learning_rate: 0.001, epochs: 10, batch_size: 64, hidden: "128, 64", optimizer: "adam",
  dropout: 0 };
const HP_FIELDS = [
  ["learning_rate", "Learning rate", { type: "number", step: "any", min: "0" }],
  ["epochs", "Epochs", { type: "number", min: "1", max: "1000", step: "1" }],
  ["batch_size", "Batch size", { type: "number", min: "1", step: "1" }],
  ["hidden", "Hidden layers", { type: "text", inputmode: "numeric", placeholder: "128, 64" }],
  ["optimizer", "Optimizer", null],
  ["dropout", "Dropout", { type: "number", min: "0", max: "0.9", step: "0.05" }],
];

// What a search tries unless the user writes another space: the settings that matter most on tabular data.
const SEARCH_DEFAULT = `{
  "learning_rate": {"low": 0.0001, "high": 0.03, "log": true},
  "batch_size": [32, 64, 128],
  "hidden": [[64], [128, 64], [256, 128]],
  "dropout": [0, 0.1, 0.3],
  "epochs": 20
}`;

function select(name, options, value) {
  return h("select", { name }, options.map(([v, label]) => h("option", { value: v, selected: v === value }, label)));
}

function hpControl(key, attrs, value, onInput) {
  const control = key === "optimizer"
    ? select(key, [["adam", "Adam"], ["sgd", "SGD"]], value)
    : h("input", { name: key, ...attrs, value: String(value) });
  control.addEventListener("input", () => onInput(control.value));
  return control;
}

function parseHp(values, federated) {
  const hp = {
    learning_rate: Number(values.learning_rate),
    batch_size: Number(values.batch_size),
    optimizer: values.optimizer,
    dropout: Number(values.dropout),
    hidden: String(values.hidden).split(/[\s,]+/).filter(Boolean).map(Number),
  };
  if (!federated) hp.epochs = Number(values.epochs);
  return hp;
}

export async function newSessionView(root, signal) {
  const state = {
    file: null, preview: null, target: null, task: "classification", features: null, mode: "sweep",
    peers: 2, perPeer: false, hpAll: { ...HP_DEFAULTS }, hpEach: [], searching: true,
  };
  let previewing = null;

  // --- the dataset -------------------------------------------------------------------------
  const fileInput = h("input", { type: "file", name: "file", accept: ".csv,text/csv", required: true });
  const targetSelect = h("select", { name: "target", disabled: true });
  const taskSelect = select("task", [["classification", "classification"], ["regression", "regression"]],
    state.task);
  const features = h("div", { class: "checks", id: "features" });
  const previewBox = h("div", { class: "preview", id: "preview" }, h("p", { class: "muted" },
    "Choose a CSV with a header row: its columns and first rows show here as the server reads them."));

  const renderPreview = () => {
    const p = state.preview;
    if (!p) return;
    targetSelect.disabled = false;
    targetSelect.replaceChildren(...p.columns.map((c) => h("option", { value: c, selected: c === p.target }, c)));
    features.replaceChildren(...p.columns.filter((c) => c !== p.target).map((c) => {
      const box = h("input", { type: "checkbox", value: c, checked: p.features.includes(c) });
      box.addEventListener("change", () => {
        state.features = [...features.querySelectorAll("input:checked")].map((b) => b.value);
        refresh();
      });
      return h("label", { class: "check" }, box, c);
    }));
    const classes = p.classes
      ? h("p", {}, h("strong", {}, `${p.classes.length} classes: `),
        p.classes.map((c) => `${c} (${p.class_counts[c]})`).join(", "))
      : h("p", {}, h("strong", {}, "Regression"), ` on ${p.target}`);
    const rows = h("div", { class: "scroll" }, h("table", { class: "list head" },
        h("thead", {}, h("tr", {}, p.head.columns.map((c) => h("th", { class: c === p.target ? "target" : "" }, c)))),
        h("tbody", {}, p.head.rows.map((row) => h("tr", {}, row.map((v, i) =>
          h("td", { class: p.head.columns[i] === p.target ? "target" : "num" },
            String(v))))))));
    previewBox.replaceChildren(
      h("p", { class: "facts" }, h("strong", {}, p.filename), ` · ${p.rows.toLocaleString()} rows · `,
        `${p.columns.length} columns · ${(p.bytes / 1024).toFixed(1)} KiB`),
      classes, rows,
      h("p", { class: "muted small" }, `First ${p.head.rows.length} rows; the target column is highlighted.`));
    // A wide file's target (often its last column) would be out of sight: the rows scroll to it.
    const target = rows.querySelector("th.target");
    if (target) {
      const at = target.getBoundingClientRect().left - rows.getBoundingClientRect().left + rows.scrollLeft;
      rows.scrollLeft = Math.max(0, at - (rows.clientWidth - target.offsetWidth) / 2);
    }
  };

  const refresh = async () => {
    if (!state.file) return;
    if (previewing) previewing.abort();
    previewing = new AbortController();
    const data = new FormData();
    data.append("file", state.file);
    data.append("task", state.task);
    if (state.target) data.append("target", state.target);
    if (state.features) data.append("features", JSON.stringify(state.features));
    if (state.mode === "federated") {
      data.append("mode", "federated");
      data.append("num_peers", String(state.peers));
      data.append("partition", form.elements.partition.value);
    }
    previewBox.classList.add("busy");
    try {
      state.preview = await request("/datasets/preview", { method: "POST", form: data, signal: previewing.signal });
      state.target = state.preview.target;
      renderPreview();
      startButton.disabled = false;
    } catch (error) {
      if (error.name === "AbortError") return;
      state.preview = null;
      startButton.disabled = true;
      previewBox.replaceChildren(alertBox(error));
    } finally {
      previewBox.classList.remove("busy");
    }
  };

  fileInput.addEventListener("change", () => {
    state.file = fileInput.files[0] || null;
    state.target = null;
    state.features = null;
    refresh();
  });
  targetSelect.addEventListener("change", () => {
    state.target = targetSelect.value;
    state.features = null;
    refresh();
  });
  taskSelect.addEventListener("change", () => {
    state.task = taskSelect.value;
    refresh();
  });

  // --- the training ------------------------------------------------------------------------
  const peersInput = h("input", { type: "number", name: "num_peers", min: "1", max: "64", step: "1",
    value: String(state.peers), required: true });
  const peersHint = h("small", { class: "hint" });
  const poolSelect = h("select", { name: "pool" }, h("option", { value: "public" }, "public"),
    h("option", { value: "mine" }, "mine (only my machines)"));
  const modeControl = h("div", { class: "segmented", role: "radiogroup" },
    [["sweep", "Sweep: the best settings, a model per trial"], ["federated", "Federated: one model, data split"]].map(
      ([value, label]) => h("label", {}, h("input", { type: "radio", name: "mode", value,
        checked: value === state.mode }), label)));
  const hpTable = h("div", { class: "hp" });
  const perPeerToggle = h("input", { type: "checkbox", name: "per_peer" });
  const federated = h("fieldset", { class: "grid", hidden: true },
    h("legend", {}, "Federated rounds"),
    field("Rounds", h("input", { type: "number", name: "rounds", min: "1", max: "1000", value: "5" })),
    field("Local epochs per round", h("input", { type: "number", name: "local_epochs", min: "1", max: "1000",
      value: "1" })),
    field("Partition", select("partition", [["iid", "IID (even split)"], ["label_skew", "label skew"]], "iid")),
    field("Skew α", h("input", { type: "number", name: "alpha", min: "0.01", step: "any", value: "0.5" }),
      "smaller: more skewed"),
    field("Aggregation", select("aggregation", [["fedavg", "FedAvg"], ["median", "median"],
      ["trimmed_mean", "trimmed mean"]], "fedavg")),
    field("Algorithm", select("algorithm", [["", "default (SCAFFOLD on label skew, else FedAvg)"], ["fedavg", "FedAvg"],
      ["fedprox", "FedProx"], ["fedavgm", "FedAvgM"], ["fedadam", "FedAdam"], ["fedyogi", "FedYogi"],
      ["scaffold", "SCAFFOLD"]], ""), "SCAFFOLD corrects drift best with the SGD optimizer"),
    field("FedProx μ", h("input", { type: "number", name: "mu", min: "0", max: "10", step: "any", placeholder: "0.01" }),
      "FedProx: pull towards the global weights"),
    field("Server step", h("input", { type: "number", name: "server_lr", min: "0", max: "10", step: "any",
      placeholder: "default" }), "FedAvgM, FedAdam, FedYogi"),
    field("Minimum peers", h("input", { type: "number", name: "min_peers", min: "1", max: "64",
      placeholder: "all" }), "a round goes on with this many"),
    field("Schedule", select("schedule", [["sync", "rounds (sync)"], ["async", "asynchronous"]], "sync"),
      "async: no peer waits for the slowest"),
    field("Buffer size", h("input", { type: "number", name: "buffer_size", min: "1", max: "64",
      placeholder: "half the peers" }), "async: updates folded together"),
    field("Updates in all", h("input", { type: "number", name: "max_updates", min: "1",
      placeholder: "rounds × peers" }), "async: tasks handed out"),
  );
  const sweepStyle = h("div", { class: "segmented", role: "radiogroup", id: "sweep-style" },
    [["search", "Search: trials from a space, losers stopped early"], ["fixed", "Settings I choose"]].map(
      ([value, label]) => h("label", {}, h("input", { type: "radio", name: "sweep_style", value,
        checked: value === "search" }), label)));
  const search = h("fieldset", { id: "search-settings" },
    h("legend", {}, "Search"),
    field("Space (JSON)", h("textarea", { name: "search", rows: "7", spellcheck: "false", class: "mono" },
      SEARCH_DEFAULT), "each setting: a list of values, a range {\"low\", \"high\", \"log\"}, or one value",
    "wide"),
    h("div", { class: "grid" },
      field("Trials", h("input", { type: "number", name: "trials", min: "1", max: "1000", placeholder: "4 × peers" }),
        "configurations to try in all"),
      field("Sampler", select("sampler", [["tpe", "TPE (model-based)"], ["random", "random"]], "tpe")),
      field("Early stopping", select("pruner", [["asha", "successive halving"], ["median", "median"],
        ["none", "none"]], "asha"), "stops trials that score low at a rung"),
      field("Time budget (s)", h("input", { type: "number", name: "time_budget", min: "1", placeholder: "none" }),
        "no trial begun or continued after")));
  const hpFieldset = h("fieldset", {}, h("legend", {}, "Hyperparameters"),
    h("label", { class: "check" }, perPeerToggle, "Set them per peer"), hpTable);
  const renderStyle = () => {
    const sweep = state.mode === "sweep";
    sweepStyle.hidden = !sweep;
    search.hidden = !(sweep && state.searching);
    hpFieldset.hidden = sweep && state.searching;
  };
  const problem = h("div", { id: "start-problem" });
  const startButton = h("button", { type: "submit", class: "primary", disabled: true }, "Start training");

  const renderHp = () => {
    const isFederated = state.mode === "federated";
    const shown = HP_FIELDS.filter(([key]) => !(isFederated && key === "epochs"));
    if (!state.perPeer) {
      hpTable.replaceChildren(h("div", { class: "grid" }, shown.map(([key, label, attrs]) =>
        field(label, hpControl(key, attrs, state.hpAll[key], (v) => { state.hpAll[key] = v; })))));
      return;
    }
    while (state.hpEach.length < state.peers) state.hpEach.push({ ...state.hpAll });
    state.hpEach.length = state.peers;
    hpTable.replaceChildren(h("div", { class: "scroll" }, h("table", { class: "list per-peer" },
      h("thead", {}, h("tr", {}, h("th", {}, "Peer"), shown.map(([, label]) => h("th", {}, label)))),
      h("tbody", {}, state.hpEach.map((values, i) => h("tr", {}, h("td", {}, `#${i + 1}`),
        shown.map(([key, , attrs]) => h("td", {}, hpControl(key, attrs, values[key], (v) => { values[key] = v; })))))))));
  };

  const form = h("form", { class: "stack", id: "new-session" },
    h("section", { class: "card" }, h("h1", {}, "New session"),
      h("fieldset", { class: "grid" }, h("legend", {}, "Dataset"),
        field("CSV file", fileInput, null, "wide"),
        field("Target column", targetSelect),
        field("Task", taskSelect)),
      h("details", { class: "features" }, h("summary", {}, "Feature columns"), features),
      previewBox),
    h("section", { class: "card" }, h("h2", {}, "Training"),
      modeControl,
      h("div", { class: "grid" }, h("label", { class: "field" }, h("span", { class: "label" }, "Peers"), peersInput,
        peersHint), field("Whose peers", poolSelect, "public: the platform's and those shared with everyone")),
      federated,
      sweepStyle,
      search,
      hpFieldset,
      problem,
      h("div", { class: "row" }, startButton)));
  root.append(form);

  form.addEventListener("change", (event) => {
    const name = event.target.name;
    if (name === "mode") {
      state.mode = form.elements.mode.value;
      federated.hidden = state.mode !== "federated";
      renderHp();
      renderStyle();
      refresh();
    } else if (name === "sweep_style") {
      state.searching = form.elements.sweep_style.value === "search";
      renderStyle();
    } else if (name === "partition") {
      refresh();
    }
  });
  peersInput.addEventListener("input", () => {
    const n = Number(peersInput.value);
    if (!Number.isInteger(n) || n < 1 || n > 64) return;
    state.peers = n;
    if (state.perPeer) renderHp();
  });
  peersInput.addEventListener("change", () => { if (state.mode === "federated") refresh(); });
  perPeerToggle.addEventListener("change", () => {
    state.perPeer = perPeerToggle.checked;
    renderHp();
  });
  renderHp();
  renderStyle();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    problem.replaceChildren();
    const isFederated = state.mode === "federated";
    const data = new FormData();
    data.append("file", state.file);
    data.append("num_peers", String(state.peers));
    data.append("mode", state.mode);
    data.append("task", state.task);
    data.append("target", state.target);
    if (poolSelect.value !== "public") data.append("pool", poolSelect.value);
    if (state.features) data.append("features", JSON.stringify(state.features));
    if (!isFederated && state.searching) {
      data.append("search", form.elements.search.value);
      for (const name of ["trials", "sampler", "pruner", "time_budget"]) {
        const value = form.elements[name].value;
        if (value !== "") data.append(name, value);
      }
    } else {
      const hp = state.perPeer ? state.hpEach.map((v) => parseHp(v, isFederated)) : parseHp(state.hpAll, isFederated);
      data.append("hyperparameters", JSON.stringify(hp));
    }
    if (isFederated) {
      const asynchronous = form.elements.schedule.value === "async";
      const algorithm = form.elements.algorithm.value;
      for (const name of ["rounds", "local_epochs", "partition", "aggregation", "algorithm", "min_peers", "schedule",
        ...(asynchronous ? ["buffer_size", "max_updates"] : []), ...(algorithm === "fedprox" ? ["mu"] : []),
        ...(["fedavgm", "fedadam", "fedyogi"].includes(algorithm) ? ["server_lr"] : [])]) {
        const value = form.elements[name].value;
        if (value !== "") data.append(name, value);
      }
      if (form.elements.partition.value === "label_skew") data.append("alpha", form.elements.alpha.value);
    }
    startButton.disabled = true;
    try {
      const started = await request("/sessions/start", { method: "POST", form: data });
      location.hash = `#/sessions/${started.session_id}`;
    } catch (error) {
      problem.replaceChildren(alertBox(error));
      startButton.disabled = false;
    }
  });

  const [peers, pools] = await Promise.all([request("/peers", { signal }), request("/pools", { signal })]);
  poolSelect.append(...pools.pools.map((p) => h("option", { value: p.name }, `pool ${p.name} (${p.owner})`)));
  const { free } = peers;
  peersHint.textContent = `${free} of ${peers.total} peer${peers.total === 1 ? "" : "s"} free to train now`;
  if (free > 0) {
    state.peers = Math.min(2, free);
    peersInput.value = String(state.peers);
  }
}
