// Building the page: elements from data (text only, never markup) and how numbers and times read.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "value") el.value = value;
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

export function field(label, control, hint, extraClass = "") {
  return h("label", { class: `field ${extraClass}`.trim() }, h("span", { class: "label" }, label), control,
    hint ? h("small", { class: "hint" }, hint) : null);
}

export function badge(status) {
  return h("span", { class: `badge ${String(status || "").toLowerCase()}` }, status || "–");
}

export function alertBox(error) {
  const box = h("div", { class: "alert", role: "alert" }, error.message || String(error));
  const details = error.details ? error.details() : [];
  if (details.length) box.append(h("ul", {}, details.map((line) => h("li", {}, line))));
  return box;
}

export function number(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString();
  return Number(value.toPrecision(digits)).toString();
}

export function percent(value) {
  if (value === null || value === undefined) return "–";
  return `${(value * 100).toFixed(1)}%`;
}

export function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

// A span of time as people say it: "42 s", "3 min 05 s", "1 h 02 min".
export function span(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

// From `start` to `end` (ISO times; no end: now).
export function duration(start, end) {
  if (!start) return "–";
  return span(((end ? new Date(end) : new Date()).getTime() - new Date(start).getTime()) / 1000);
}

export function ago(iso) {
  if (!iso) return "never";
  const seconds = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  return when(iso);
}

export const FINISHED = new Set(["COMPLETED", "FAILED", "CANCELLED", "INTERRUPTED"]);

export function repeat(seconds, task, signal) {
  // Refresh a view while it is shown; stops when the view is left.
  const timer = setInterval(() => { if (!document.hidden) task(); }, seconds * 1000);
  signal.addEventListener("abort", () => clearInterval(timer));
}
