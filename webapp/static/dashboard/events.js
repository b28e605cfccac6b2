// A session's event stream (GET /sessions/<id>/events, Server-Sent Events) read with fetch():
// EventSource cannot send the Authorization header. After a dropped connection it reconnects with
// Last-Event-ID, so the server replays exactly what was missed.

import { auth, ApiError, renew, signedOut } from "./api.js";

const MAX_DELAY_MS = 5000;
const SILENCE_MS = 1800; // the server is heard at least every second (webapp/stream.py KEEPALIVE_SECONDS)

// Parse SSE text as it arrives: call `dispatch({type, id, data})` for every complete event.
export class SseParser {
  constructor(dispatch) {
    this.dispatch = dispatch;
    this.buffer = "";
    this.id = null; // the last event ID: it carries over to events that name none, as in EventSource
    this.reset();
  }

  reset() {
    this.type = "";
    this.data = [];
  }

  push(text) {
    this.buffer += text;
    let end;
    while ((end = this.buffer.indexOf("\n")) >= 0) {
      let line = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 1);
      if (line.endsWith("\r")) line = line.slice(0, -1);
      this.line(line);
    }
  }

  line(line) {
    if (line === "") {
      if (this.data.length) this.dispatch({ type: this.type || "message", id: this.id, data: this.data.join("\n") });
      this.reset();
      return;
    }
    if (line.startsWith(":")) return; // a comment: the server's keep-alive
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "event") this.type = value;
    else if (name === "data") this.data.push(value);
    else if (name === "id" && !value.includes("\0")) this.id = value;
  }
}

// Follow the stream until its `end` event (resolves with that event's data) or until `signal` aborts.
// `onEvent(type, data, id)` gets every event; `onState("live" | "reconnecting" | "server-stopped" | "ended")` the
// connection's ("server-stopped": the server said it was stopping, and the stream reconnects until it is back).
// `after`: the id of the last event already shown (a resumed session's stream goes on from there).
// A stream that says nothing for SILENCE_MS (the server sends at least a keep-alive every second) is
// "disconnected": a server that hangs or a link that went silent is let go and asked again.
export async function follow(path, { onEvent, onState = () => {}, signal, after = null }) {
  let lastId = after;
  let delay = 500;
  let serverStopped = false;
  let renewed = false; // once per refusal: a token renewed and refused again is a sign-in that expired
  while (!signal.aborted) {
    let ended = null;
    let silent = false;
    const attempt = new AbortController();
    const leave = () => attempt.abort();
    signal.addEventListener("abort", leave);
    let heard = Date.now();
    const watchdog = setInterval(() => {
      if (Date.now() - heard > SILENCE_MS) {
        silent = true;
        attempt.abort();
      }
    }, 250);
    try {
      const headers = { Accept: "text/event-stream", ...auth.headers() };
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      const response = await fetch(path, { headers, signal: attempt.signal, cache: "no-store" });
      heard = Date.now();
      if (!response.ok) {
        const type = response.headers.get("Content-Type") || "";
        const error = new ApiError(response.status, type.includes("json") ? await response.json() : null);
        if (response.status === 401) {
          if (!renewed && await renew()) {
            renewed = true;
            continue; // a new access token: the same request again, at once
          }
          signedOut("your sign-in expired; sign in again");
        }
        if (response.status < 500) throw Object.assign(error, { fatal: true });
        throw error;
      }
      serverStopped = false;
      renewed = false;
      onState("live");
      const parser = new SseParser((event) => {
        if (event.id !== null) lastId = event.id;
        let data = null;
        try {
          data = JSON.parse(event.data);
        } catch {
          return; // not ours to read
        }
        delay = 500;
        onEvent(event.type, data, event.id);
        if (event.type === "end") ended = data;
        if (event.type === "stopping") serverStopped = true;
      });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      while (ended === null) {
        const { value, done } = await reader.read();
        if (done) break;
        heard = Date.now();
        parser.push(value);
      }
      if (ended !== null) {
        reader.cancel().catch(() => {});
        onState("ended");
        return ended;
      }
    } catch (error) {
      if (signal.aborted) return null;
      if (error.fatal) throw error;
    } finally {
      clearInterval(watchdog);
      signal.removeEventListener("abort", leave);
    }
    onState(serverStopped ? "server-stopped" : silent ? "disconnected" : "reconnecting");
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, MAX_DELAY_MS);
  }
  return null;
}
