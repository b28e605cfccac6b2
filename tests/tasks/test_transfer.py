"""A peer's transfers keep one connection per server open across requests, and get over the server closing it."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks import transfer


class Objects(BaseHTTPRequestHandler):
    """GET and PUT of objects in memory, counting the connections made to it (HTTP/1.1: kept open)."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def do_PUT(self) -> None:
        self.server.paths.append(self.path)
        self.server.objects[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(200, b"")

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        if self.path.startswith("/forbidden"):
            self._answer(403, b"no")
        else:
            self._answer(200, self.server.objects.get(self.path, b""))

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if self.server.close_after:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        if self.server.drop_after:  # gone without a word, as an idle connection a server times out
            self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Objects)
    httpd.connections, httpd.objects, httpd.paths = 0, {}, []
    httpd.close_after = httpd.drop_after = False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    transfer.close_connections()


def url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}?X-Signature=abc"


def test_a_peers_reads_and_writes_to_one_server_share_one_connection(server):
    for round_ in range(3):
        transfer.upload(url(server, f"/w{round_}"), b"weights %d" % round_)
        assert transfer.fetch(url(server, f"/w{round_}"), 100) == b"weights %d" % round_
    assert server.connections == 1
    assert server.paths[0] == "/w0?X-Signature=abc"  # the grant's query, signature and all, as it was signed


@pytest.mark.parametrize("how", ["close_after", "drop_after"])
def test_a_connection_the_server_closed_is_replaced_at_once(server, how):
    setattr(server, how, True)
    began = time.monotonic()
    for round_ in range(3):
        transfer.upload(url(server, f"/w{round_}"), b"weights")
        time.sleep(0.05)  # the server's side of an idle connection is gone by the next request
    assert transfer.fetch(url(server, "/w2"), 100) == b"weights"
    assert server.connections == 4
    assert time.monotonic() - began < 0.5 + 3 * 0.05  # no retry's pause: a closed connection is not a failure


def test_a_read_cut_short_or_refused_leaves_the_next_request_a_clean_connection(server):
    transfer.upload(url(server, "/big"), b"x" * 1000)
    with pytest.raises(transfer.TransferError, match="more than the 10"):
        transfer.fetch(url(server, "/big"), 10)
    with pytest.raises(transfer.TransferError, match="HTTP 403"):
        transfer.fetch(url(server, "/forbidden"), 10)
    assert transfer.fetch(url(server, "/big"), 1000) == b"x" * 1000
    assert server.paths.count("/forbidden?X-Signature=abc") == 1  # a refusal is not retried


def test_through_a_proxy_a_request_goes_the_way_urllib_sends_it(server, monkeypatch):
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("no_proxy", "")
    transfer.upload("http://objects.example/w?X-Signature=abc", b"weights")
    assert server.paths == ["http://objects.example/w?X-Signature=abc"]  # the absolute form a proxy is sent


def test_over_tls_one_handshake_serves_every_round_and_an_unknown_certificate_is_refused(tmp_path, monkeypatch):
    import shutil
    import ssl

    from harness import rabbitnode
    from tests import services

    services.require(shutil.which("openssl") is not None, "openssl")
    certificates = rabbitnode.Certificates.make(tmp_path / "certs")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Objects)
    httpd.connections, httpd.objects, httpd.paths, httpd.close_after, httpd.drop_after = 0, {}, [], False, False
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.cert, certificates.key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    grant = f"https://localhost:{httpd.server_address[1]}/w?X-Signature=abc"
    try:
        transfer._context.cache_clear()  # the CA store is read once per process: read it again with the test's
        with pytest.raises(transfer.TransferError, match="CERTIFICATE_VERIFY_FAILED"):
            transfer.upload(grant, b"weights", retry=False)
        monkeypatch.setenv("SSL_CERT_FILE", str(certificates.ca))
        transfer._context.cache_clear()
        for round_ in range(3):
            transfer.upload(grant, b"weights %d" % round_)
            assert transfer.fetch(grant, 100) == b"weights %d" % round_
        assert httpd.connections == 1  # one handshake for every round (the refused one never got a connection)
    finally:
        transfer.close_connections()
        transfer._context.cache_clear()
        httpd.shutdown()
        httpd.server_close()
