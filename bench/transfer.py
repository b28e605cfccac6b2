"""Benchmark a peer's transfers: a round's weights written and read through grants, on a kept connection or a new one.

A peer writes its weights once a round through a write grant (and reads the global weights through a read grant
when they do not travel in the task). `tasks.transfer` keeps each thread's connection to a server open between
transfers; the baseline, in the same process and through the same functions, forgets the connection before each
transfer, as every transfer opened a new one before. The server is an object store over HTTPS with a certificate
of its own CA (`harness.rabbitnode.Certificates`, openssl), reached directly or through a proxy that holds every
byte back half a round trip each way, to stand in for a peer on the other side of the internet.

Run: .venv/bin/python -m bench.transfer [--rounds 40] [--rtt-ms 0,20] [--size 56000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from harness.rabbitnode import Certificates
from tasks import transfer


class Objects(BaseHTTPRequestHandler):
    """An object store: PUT and GET by path, HTTP/1.1 (connections kept open, as S3 and nginx keep them)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as nginx, granian and MinIO answer: no 40 ms wait for a delayed ACK
    objects: dict[str, bytes] = {}

    def do_PUT(self) -> None:
        self.objects[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(b"")

    def do_GET(self) -> None:
        self._answer(self.objects.get(self.path, b""))

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def serve_https(certificates: Certificates) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Objects)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.cert, certificates.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def delaying_proxy(target: int, one_way: float) -> int:
    """A TCP proxy to 127.0.0.1:`target` that delivers every byte `one_way` seconds after it came; its port."""
    ready: list[int] = []
    started = threading.Event()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        async def take() -> None:
            while data := await reader.read(1 << 16):
                queue.put_nowait((loop.time() + one_way, data))
            queue.put_nowait((loop.time() + one_way, b""))

        async def give() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        await asyncio.gather(take(), give(), return_exceptions=True)

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    async def main() -> None:
        server = await asyncio.start_server(client, "127.0.0.1", 0)
        ready.append(server.sockets[0].getsockname()[1])
        started.set()
        await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    started.wait(10)
    return ready[0]


def rounds(port: int, size: int, count: int, kept: bool) -> list[float]:
    """Seconds per round: the peer's weights written, then read back, each through its grant."""
    grant = f"https://localhost:{port}/rounds/weights.safetensors?X-Amz-Signature=bench"
    data = os.urandom(size)
    times = []
    for _ in range(count):
        began = time.perf_counter()
        for work in ((lambda: transfer.upload(grant, data)), (lambda: transfer.fetch(grant, size))):
            if not kept:
                transfer.close_connections()  # every transfer on a new connection, as before connections were kept
            work()
        times.append(time.perf_counter() - began)
    return times


def measure(label: str, run: Callable[[bool], list[float]]) -> None:
    new = statistics.median(run(False))
    kept = statistics.median(run(True))
    print(f"  {label:<34} new connection each {new * 1000:7.1f} ms   kept {kept * 1000:7.1f} ms   "
          f"x{new / kept:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--rtt-ms", default="0,20", help="round trips to stand in for, comma-separated")
    parser.add_argument("--size", type=int, default=56_000, help="bytes of weights (the 20,000 x 40 job's MLP)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="peertrain-bench-transfer-") as scratch:
        certificates = Certificates.make(Path(scratch) / "certs")
        os.environ["SSL_CERT_FILE"] = str(certificates.ca)
        transfer._context.cache_clear()
        server = serve_https(certificates)
        print(f"{args.size:,} bytes written then read back per round, over HTTPS; median of {args.rounds} rounds")
        for rtt in (float(r) for r in args.rtt_ms.split(",")):
            port = server.server_address[1] if rtt == 0 else delaying_proxy(server.server_address[1], rtt / 2000)
            measure(f"round trip {rtt:g} ms" + (" (direct)" if rtt == 0 else " (delaying proxy)"),
                    lambda kept, port=port: rounds(port, args.size, args.rounds, kept))
        transfer.close_connections()
        server.shutdown()


if __name__ == "__main__":
    main()
