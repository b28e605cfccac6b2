"""A TCP proxy in front of the API that drops the first event stream part-way, as a flaky network would."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable


class DroppingProxy:
    """Relays connections to the API on `upstream_port`; the first `GET …/events` answer is cut after `after`
    bytes (headers included): nothing more is passed on, and both ends are closed `linger` seconds later (so
    the client has read what it got, as over a link that goes silent, then dies). `received` keeps what the
    client got of that answer."""

    def __init__(self, upstream_port: int, after: int, linger: float = 1.0) -> None:
        self.upstream_port = upstream_port
        self.after = after
        self.linger = linger
        self.cuts = 0
        self.cut_at: float | None = None  # time.monotonic() of the cut
        self.received = b""
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.server.close()

    def last_complete_event_id(self) -> str:
        """The id of the last event the client received whole before the cut."""
        body = self.received.split(b"\r\n\r\n", 1)[1].decode("utf-8", "replace")
        complete = body[: body.rfind("\n\n") + 1]
        return re.findall(r"^id: *(\S+)$", complete, re.M)[-1]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            state = {"stream_from": None, "sent": 0}
            threading.Thread(target=_pipe, args=(client, upstream, self._requests(upstream, state)),
                             daemon=True).start()
            threading.Thread(target=_pipe, args=(upstream, client, self._answers(client, state)),
                             daemon=True).start()

    def _requests(self, upstream: socket.socket, state: dict) -> Callable[[bytes], bool]:
        def send(data: bytes) -> bool:
            if b"/events HTTP/1." in data:
                with self.lock:
                    if self.cuts == 0 and state["stream_from"] is None:
                        state["stream_from"] = state["sent"]
            upstream.sendall(data)
            return True

        return send

    def _answers(self, client: socket.socket, state: dict) -> Callable[[bytes], bool]:
        def send(data: bytes) -> bool:
            start = state["stream_from"]
            if start is None:
                client.sendall(data)
                state["sent"] += len(data)
                return True
            ours = max(0, start - state["sent"])  # where the stream's answer begins in this chunk
            cut = state["sent"] + len(data) - start >= self.after
            if cut:
                data = data[: start + self.after - state["sent"]]
            client.sendall(data)
            self.received += data[ours:]
            state["sent"] += len(data)
            if cut:
                with self.lock:
                    self.cuts += 1
                    self.cut_at = time.monotonic()
                state["stream_from"] = None
                time.sleep(self.linger)
            return not cut

        return send


def _pipe(source: socket.socket, target: socket.socket, send: Callable[[bytes], bool]) -> None:
    try:
        while data := source.recv(65536):
            if not send(data):
                break
    except OSError:
        pass
    finally:
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
