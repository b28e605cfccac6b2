"""docker-compose's nginx in front of `make api`: slow clients never hold the API's app threads,
and an upload over the cap is refused in the API's own error shape."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from harness.processes import make_target
from harness.waiting import wait_until
from settings import ROOT
from tests import services

pytestmark = pytest.mark.e2e

HTTP = """
worker_processes 1;
error_log {prefix}/error.log;
pid {prefix}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy; fastcgi_temp_path {prefix}/fcgi;
    uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
    include {prefix}/site.conf;
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _site(api: str, port: int, max_upload_mb: int) -> str:
    """The compose template as the nginx image renders it, aimed at `api` and listening on `port`."""
    text = (ROOT / "deploy" / "nginx.conf.template").read_text()
    text = text.replace("${MAX_UPLOAD_MB}", str(max_upload_mb))  # the image substitutes defined variables only
    return text.replace("server api:8000;", f"server {api};").replace("listen 8080;", f"listen 127.0.0.1:{port};")


@pytest.fixture
def proxied(tmp_path: Path):
    services.require(shutil.which("nginx") is not None, "nginx (Debian's package)")
    env = {**os.environ, "API_WORKERS": "1", "MAX_UPLOAD_MB": "1", "PEERTRAIN_ENV": "production",
           "MONGODB_URI": "mongomock://localhost/proxy", "STORAGE_URL": str(tmp_path / "storage"),
           "TRUSTED_PROXIES": "1", "AUTH_LIMIT_PER_ADDRESS": "3/minute"}
    with make_target("api", env, tmp_path / "make-api.log") as base:
        port = _free_port()
        (tmp_path / "site.conf").write_text(_site(base.removeprefix("http://"), port, max_upload_mb=1))
        (tmp_path / "nginx.conf").write_text(HTTP.format(prefix=tmp_path))
        nginx = ["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
        subprocess.run([*nginx, "-t"], check=True, capture_output=True)
        subprocess.run(nginx, check=True)
        try:
            front = f"http://127.0.0.1:{port}"
            wait_until(lambda: requests.get(f"{front}/healthz", timeout=2).ok, 20, "nginx to proxy the API")
            yield front
        finally:
            subprocess.run([*nginx, "-s", "stop"], check=False)


def test_a_client_sending_its_body_slowly_does_not_hold_the_api(proxied, record_property):
    port = int(proxied.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as slow:
        # Half a sign-in body, then silence: nginx waits for the rest, the API never sees it.
        slow.sendall(b"POST /auth/signin HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 60\r\n\r\n{\"email\": \"ann@exa")
        time.sleep(0.2)
        start = time.monotonic()
        assert requests.get(f"{proxied}/healthz", timeout=5).status_code == 200  # held, it would time out
        record_property("seconds to answer beside the stalled client", round(time.monotonic() - start, 3))


def test_an_upload_over_the_cap_is_413_in_the_apis_error_shape(proxied):
    response = requests.post(f"{proxied}/sessions/start", files={"file": ("big.csv", b"0" * (2 << 20))}, timeout=10)
    assert response.status_code == 413
    assert response.json() == {"code": 413, "status": "Request Entity Too Large",
                               "message": "the upload is larger than this server accepts"}


def _signin_from(front: str, source: str, forwarded_for: str, email: str) -> int:
    """A sign-in sent from the loopback address `source`, claiming to be `forwarded_for`."""
    host, port = front.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(source, 0))
    conn.request("POST", "/auth/signin", body=json.dumps({"email": email, "password": "pw-123456"}),
                 headers={"Content-Type": "application/json", "X-Forwarded-For": forwarded_for})
    status = conn.getresponse().status
    conn.close()
    return status


def test_sign_ins_are_counted_per_real_client_address_behind_the_proxy(proxied):
    # Each attempt claims another address; nginx appends the real one, which is all the API believes.
    codes = [_signin_from(proxied, "127.0.0.1", f"198.51.100.{i}", f"u{i}@example.com") for i in range(4)]
    assert codes == [401, 401, 401, 429]
    # Another real address is counted apart, whatever it claims.
    assert _signin_from(proxied, "127.0.0.2", "127.0.0.1", "u9@example.com") == 401
