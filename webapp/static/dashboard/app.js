// The dashboard's views, chosen by the URL's #fragment; each view gets a signal that aborts when it is left.

import { auth, signedOut } from "./api.js";
import { alertBox, h } from "./dom.js";
import { signinView, signupView } from "./views/account.js";
import { peersView, sessionsView } from "./views/lists.js";
import { newSessionView } from "./views/new-session.js";
import { sessionView } from "./views/session.js";

const ROUTES = [
  [/^#\/signin$/, signinView, { open: true }],
  [/^#\/signup$/, signupView, { open: true }],
  [/^#\/sessions$/, sessionsView, { nav: "sessions" }],
  [/^#\/sessions\/([0-9a-f]{24})$/, sessionView, { nav: "sessions" }],
  [/^#\/new$/, newSessionView, { nav: "new" }],
  [/^#\/peers$/, peersView, { nav: "peers" }],
];

let current = null;

function header(navName) {
  const who = auth.get();
  document.getElementById("nav").hidden = !who;
  document.getElementById("who").hidden = !who;
  document.getElementById("username").textContent = who ? who.username : "";
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", link.dataset.nav === navName);
  }
}

async function show() {
  if (current) current.abort();
  current = new AbortController();
  const { signal } = current;
  const hash = location.hash || "#/sessions";
  const route = ROUTES.find(([pattern]) => pattern.test(hash));
  if (!route) {
    location.replace("#/sessions");
    return;
  }
  const [pattern, view, options] = route;
  if (!options.open && !auth.get()) {
    signedOut();
    return;
  }
  if (options.open && auth.get()) {
    location.replace("#/sessions");
    return;
  }
  header(options.nav);
  const root = document.getElementById("view");
  root.replaceChildren();
  const params = hash.match(pattern).slice(1);
  try {
    await view(root, ...params, signal);
  } catch (error) {
    if (signal.aborted || error.name === "AbortError") return;
    root.append(alertBox(error));
  }
}

document.getElementById("signout").addEventListener("click", () => {
  auth.clear();
  location.hash = "#/signin";
});
window.addEventListener("hashchange", show);
show();
