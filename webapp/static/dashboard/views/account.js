// Sign in and sign up.

import { auth, request, signinMessage } from "../api.js";
import { alertBox, field, h } from "../dom.js";

function afterSignIn() {
  const next = sessionStorage.getItem("peertrain.next") || "#/sessions";
  sessionStorage.removeItem("peertrain.next");
  location.hash = next;
}

async function signIn(email, password) {
  auth.save(await request("/auth/signin", { method: "POST", json: { email, password } }));
  afterSignIn();
}

function card(title, form, footer) {
  return h("section", { class: "card narrow" }, h("h1", {}, title), form, h("p", { class: "muted" }, footer));
}

function submitting(form, action) {
  const problem = h("div");
  form.prepend(problem);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    problem.replaceChildren();
    try {
      await action(new FormData(form));
    } catch (error) {
      problem.replaceChildren(alertBox(error));
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

export function signinView(root) {
  const why = signinMessage();
  const form = submitting(h("form", { class: "stack", id: "signin" },
    field("Email", h("input", { name: "email", type: "email", autocomplete: "username", required: true })),
    field("Password", h("input", { name: "password", type: "password", autocomplete: "current-password",
      required: true })),
    h("button", { type: "submit", class: "primary" }, "Sign in"),
  ), (data) => signIn(data.get("email"), data.get("password")));
  root.append(card("Sign in", form, ["No account yet? ", h("a", { href: "#/signup" }, "Sign up")]));
  if (why) form.prepend(h("div", { class: "alert", role: "status" }, why));
  form.querySelector("input").focus();
}

export function signupView(root) {
  const form = submitting(h("form", { class: "stack", id: "signup" },
    field("Username", h("input", { name: "username", autocomplete: "nickname", required: true, minlength: 3,
      maxlength: 40, pattern: "[A-Za-z0-9_.\\-]+" }), "letters, digits, '_', '.' or '-'"),
    field("Email", h("input", { name: "email", type: "email", autocomplete: "username", required: true })),
    field("Password", h("input", { name: "password", type: "password", autocomplete: "new-password", required: true,
      minlength: 8 }), "at least 8 characters"),
    h("button", { type: "submit", class: "primary" }, "Create account"),
  ), async (data) => {
    const account = Object.fromEntries(["username", "email", "password"].map((k) => [k, data.get(k)]));
    await request("/auth/signup", { method: "POST", json: account });
    await signIn(account.email, account.password);
  });
  root.append(card("Create an account", form, ["Have one? ", h("a", { href: "#/signin" }, "Sign in")]));
  form.querySelector("input").focus();
}
