// The API over fetch(): the access and refresh tokens kept in this browser, errors in the API's one JSON shape.

const KEY = "peertrain.auth";
const MESSAGE = "peertrain.signin-message";

export const auth = {
  // The sign-in kept here, while either token may still work (an expired access token is renewed).
  get() {
    try {
      const saved = JSON.parse(localStorage.getItem(KEY));
      const now = Date.now();
      if (saved && saved.token && (saved.expiresAt > now || (saved.refresh && saved.refreshExpiresAt > now))) {
        return saved;
      }
    } catch { /* a damaged entry is no token */ }
    return null;
  },
  // A sign-in's answer, or a renewal's (which keeps the refresh token it was made with).
  save(answer) {
    const before = this.get() || {};
    const saved = {
      token: answer.access_token,
      username: answer.username,
      expiresAt: Date.now() + answer.expires_in * 1000,
      refresh: answer.refresh_token || before.refresh,
      refreshExpiresAt: answer.refresh_token ? Date.now() + answer.refresh_expires_in * 1000 : before.refreshExpiresAt,
    };
    localStorage.setItem(KEY, JSON.stringify(saved));
    return saved;
  },
  clear() {
    localStorage.removeItem(KEY);
  },
  headers() {
    const saved = this.get();
    return saved ? { Authorization: `Bearer ${saved.token}` } : {};
  },
};

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `the server answered ${status}`);
    this.status = status;
    this.body = body || {};
  }

  // The per-field messages ("num_peers: only 2 peer(s) online and free"), flattened.
  details() {
    const lines = [];
    const walk = (value, prefix) => {
      if (Array.isArray(value) && value.every((v) => typeof v === "string")) {
        lines.push(prefix ? `${prefix}: ${value.join(" ")}` : value.join(" "));
      } else if (value && typeof value === "object") {
        for (const [key, inner] of Object.entries(value)) walk(inner, prefix ? `${prefix}.${key}` : key);
      } else if (value !== undefined) {
        lines.push(prefix ? `${prefix}: ${value}` : String(value));
      }
    };
    walk(this.body.errors, "");
    return lines;
  }
}

// A new access token from the refresh token: true if it was renewed. One renewal at a time, however many
// requests found the token expired.
let renewing = null;
export function renew() {
  renewing ??= (async () => {
    const saved = auth.get();
    if (!saved || !saved.refresh) return false;
    const response = await fetch("/auth/refresh", {
      method: "POST", headers: { Accept: "application/json", Authorization: `Bearer ${saved.refresh}` },
    });
    if (!response.ok) return false;
    auth.save(await response.json());
    return true;
  })().catch(() => false).finally(() => { renewing = null; });
  return renewing;
}

// The sign-in no longer works: to the sign-in page, which says why, and back here after.
export function signedOut(message = "") {
  if (message) sessionStorage.setItem(MESSAGE, message);
  auth.clear();
  const next = location.hash && !location.hash.startsWith("#/sign") ? location.hash : "#/sessions";
  sessionStorage.setItem("peertrain.next", next);
  location.hash = "#/signin";
}

export function signinMessage() {
  const message = sessionStorage.getItem(MESSAGE);
  sessionStorage.removeItem(MESSAGE);
  return message;
}

export async function request(path, { method = "GET", json, form, signal, renewed = false } = {}) {
  const headers = { Accept: "application/json", ...auth.headers() };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  const response = await fetch(path, { method, headers, body, signal });
  const type = response.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await response.json() : null;
  if (response.status === 401 && headers.Authorization) {
    if (!renewed && await renew()) return request(path, { method, json, form, signal, renewed: true });
    signedOut("your sign-in expired; sign in again");
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export async function download(path, fallbackName) {
  // A link cannot carry the Authorization header: fetch the file, then hand it to the browser.
  const response = await fetch(path, { headers: auth.headers() });
  if (!response.ok) {
    const type = response.headers.get("Content-Type") || "";
    throw new ApiError(response.status, type.includes("json") ? await response.json() : null);
  }
  const disposition = response.headers.get("Content-Disposition") || "";
  const name = (disposition.match(/filename="([^"]+)"/) || [])[1] || fallbackName;
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
