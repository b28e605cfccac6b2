// The API over fetch(): the access token kept in this browser, errors in the API's one JSON shape.

const KEY = "peertrain.auth";

export const auth = {
  get() {
    try {
      const saved = JSON.parse(localStorage.getItem(KEY));
      if (saved && saved.token && saved.expiresAt > Date.now()) return saved;
    } catch { /* a damaged entry is no token */ }
    return null;
  },
  save(answer) {
    const saved = {
      token: answer.access_token,
      username: answer.username,
      expiresAt: Date.now() + answer.expires_in * 1000,
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

export function signedOut() {
  auth.clear();
  const next = location.hash && !location.hash.startsWith("#/sign") ? location.hash : "#/sessions";
  sessionStorage.setItem("peertrain.next", next);
  location.hash = "#/signin";
}

export async function request(path, { method = "GET", json, form, signal } = {}) {
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
  if (response.status === 401 && headers.Authorization) signedOut();
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
