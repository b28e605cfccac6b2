// The sessions list and the peers page: tables refreshed while they are shown.

import { request } from "../api.js";
import { FINISHED, ago, alertBox, badge, duration, h, number, percent, repeat, when } from "../dom.js";

export async function sessionsView(root, signal) {
  const body = h("tbody");
  const table = h("div", { class: "scroll" }, h("table", { class: "list", id: "sessions" },
    h("thead", {}, h("tr", {}, ["Started", "Dataset", "Mode", "Peers", "Status", "Result", "Took", ""].map((t) =>
      h("th", {}, t)))),
    body));
  const empty = h("p", { class: "muted", hidden: true }, "No sessions yet. ", h("a", { href: "#/new" },
    "Start one"), " on the peers that are online.");
  root.append(h("section", { class: "card" },
    h("div", { class: "row between" }, h("h1", {}, "Sessions"), h("a", { class: "button primary", href: "#/new" },
      "New session")),
    table, empty));

  const load = async () => {
    const { items } = await request("/sessions", { signal });
    empty.hidden = items.length > 0;
    table.hidden = items.length === 0;
    body.replaceChildren(...items.map((s) => {
      const link = `#/sessions/${s.id}`;
      return h("tr", {},
        h("td", {}, h("a", { href: link }, when(s.created_at))),
        h("td", { class: "wrap" }, s.filename),
        h("td", {}, s.mode),
        h("td", { class: "num" }, s.num_peers),
        h("td", {}, badge(s.status), s.reason ? h("div", { class: "reason" }, s.reason) : null),
        // The held-out measure the session is judged by (accuracy, or R² for regression).
        h("td", { class: "num outcome" }, s.metric && s.best_value !== null && s.best_value !== undefined
          ? `${s.metric.replace("val_", "")} ${s.metric.includes("accuracy") ? percent(s.best_value)
            : number(s.best_value)}` : "–"),
        h("td", { class: "num" }, s.started_at ? duration(s.started_at, s.finished_at) : "–"),
        h("td", {}, h("a", { href: link }, "Open")));
    }));
    return items.some((s) => !FINISHED.has(s.status));
  };
  await load();
  repeat(5, () => load().catch(() => {}), signal);
}

export async function peersView(root, signal) {
  const summary = h("p", { class: "muted" });
  const body = h("tbody");
  const problem = h("div");
  const enrolled = h("div", { id: "enrolled" });
  const nameInput = h("input", { name: "peer_name", placeholder: "e.g. my-laptop", required: true,
    pattern: "[A-Za-z0-9][A-Za-z0-9_\\-]*", maxlength: "63", "aria-label": "the machine's peer name" });
  const addForm = h("form", { class: "row", id: "add-machine", hidden: true }, nameInput,
    h("button", { type: "submit", class: "primary" }, "Get the command"));
  const addButton = h("button", { type: "button", id: "add-machine-button" }, "Add a machine");
  addButton.addEventListener("click", () => { addForm.hidden = false; nameInput.focus(); });
  addForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    problem.replaceChildren();
    try {
      const answer = await request("/peers", { method: "POST", json: { name: nameInput.value.trim() } });
      const command = h("pre", { class: "command", id: "join-command" }, answer.command);
      const copy = h("button", { type: "button", class: "link" }, "Copy");
      copy.addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText(answer.command));
      enrolled.replaceChildren(h("p", {}, `Run this on the machine `, h("strong", {}, answer.name),
        ` (with `, h("code", {}, "pip install 'peertrain[peer]'"), ` done there). The token works once, until `,
        new Date(answer.expires_at).toLocaleTimeString(), "; it is not shown again."), command, copy);
      addForm.hidden = true;
      load().catch(() => {});
    } catch (error) {
      problem.replaceChildren(alertBox(error));
    }
  });

  root.append(h("section", { class: "card" }, h("div", { class: "row between" }, h("h1", {}, "Peers"), addButton),
    summary, addForm, problem, enrolled,
    h("div", { class: "scroll" }, h("table", { class: "list", id: "peers" },
      h("thead", {}, h("tr", {}, ["Peer", "Owner", "Status", "Host", "Last seen", "Session", "Used", "Refused",
        "Timed out", "Failed", "Reputation"].map((t) => h("th", {}, t)))),
      body)),
    h("p", { class: "muted small" }, "A peer is a machine running the peer worker; it shows here once it reports ",
      "in. Add yours with “Add a machine”: it serves only your sessions (start one with “mine”) until you share it ",
      "with everyone or through a pool. Reputation is the share of its tasks whose work was used ",
      "(a newcomer starts at 0.5); a QUARANTINED peer had its updates refused in three sessions running and gets ",
      "no work until an operator restores it.")));

  const act = async (name, change) => {
    problem.replaceChildren();
    try {
      if (change === null) await request(`/peers/${encodeURIComponent(name)}`, { method: "DELETE" });
      else await request(`/peers/${encodeURIComponent(name)}`, { method: "PATCH", json: change });
      await load();
    } catch (error) {
      problem.replaceChildren(alertBox(error));
    }
  };
  const actions = (p) => {
    const button = (label, change, attrs = {}) => h("button", { type: "button", class: "link", ...attrs,
      onclick: () => act(p.name, change) }, label);
    return h("span", {},
      p.paused ? button("Resume", { paused: false }) : button("Pause", { paused: true }),
      p.public ? button("Stop sharing", { public: false }) : button("Share with everyone", { public: true }),
      button("Remove", null, { "data-action": "remove" }));
  };

  const load = async () => {
    const answer = await request("/peers", { signal });
    summary.textContent = `${answer.total} known · ${answer.online} online · ${answer.free} free to train`;
    body.replaceChildren(...answer.peers.map((p) => h("tr", { dataset: { peer: p.name } },
      h("td", {}, h("strong", {}, p.name), p.mine ? h("div", { class: "actions small" }, actions(p)) : ""),
      h("td", {}, p.owner ? `${p.owner}${p.mine ? " (you)" : ""}${p.public ? " · shared" : ""}` : "platform"),
      h("td", {}, badge(p.status), p.paused ? h("span", { class: "muted small" }, " paused") : ""),
      h("td", { class: "wrap" }, p.hostname || "–"),
      h("td", {}, ago(p.last_seen)),
      h("td", { class: "mono" }, p.session_id ? p.session_id.slice(0, 8) : "–"),
      h("td", { class: "num" }, String(p.accepted)),
      // Why its last update was refused, on hover: the coordinator's words, never the peer's.
      h("td", { class: "num", title: p.last_rejection || "" }, String(p.rejected)),
      h("td", { class: "num" }, String(p.timed_out)),
      h("td", { class: "num" }, String(p.failed)),
      h("td", { class: "num", "data-reputation": p.reputation.toFixed(2) }, p.reputation.toFixed(2)))));
  };
  await load();
  repeat(5, () => load().catch(() => {}), signal);
}
