"""A fault-injecting reverse proxy for an S3-protocol server: flaky storage, for tests.

Point ``AWS_ENDPOINT_URL`` at :attr:`FlakyS3Proxy.url` and, on about ``fault_rate`` of the
requests (seeded RNG), the client gets one of

* ``500``: a 500 ``InternalError`` S3 error document;
* ``503``: a 503 ``SlowDown`` S3 error document (S3's throttling answer);
* ``reset``: the connection reset (RST, SO_LINGER 0) without any response; half of these happen
  after the server already applied the request, as when a response is lost on the way back;
* ``reset_body``: a GET answered with its status, headers and part of its body, then reset.

Everything else is forwarded unchanged (Host header included, so request signatures still hold),
with HTTP/1.1 keep-alive towards the client and chunked request bodies passed through as they
are. :attr:`counts` says how many requests arrived and how many faults of each kind were
injected, so a test can assert the faults really happened. Standard library only.

The proxy runs in a thread of the test process: code that forks (DataLoader workers) must run in a
subprocess, since a forked child holds copies of the proxy's sockets, so a reset sends nothing
until that child exits and the client waits for its read timeout instead.
"""

from __future__ import annotations

import fcntl
import http.client
import io
import random
import socket
import struct
import termios
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULTS = ("500", "503", "reset", "reset_body")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
               "content-length"}
_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}
# requests whose repetition changes nothing: only these may be reset after the server applied them
_IDEMPOTENT = {"GET", "HEAD", "PUT", "DELETE"}


class FlakyS3Proxy:
    """``with FlakyS3Proxy(upstream) as proxy: ... proxy.url ... proxy.counts``."""

    def __init__(self, upstream: str, fault_rate: float = 0.05, seed: int = 0, faults: tuple[str, ...] = FAULTS):
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; choose from {FAULTS}")
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.fault_rate = fault_rate
        self.faults = tuple(faults)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FlakyS3Proxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="flaky-s3-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FlakyS3Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def counts(self) -> dict[str, int]:
        """``requests`` and one count per fault kind actually injected (all keys always present)."""
        with self._lock:
            return {"requests": self._counts["requests"], **{k: self._counts[k] for k in FAULTS}}

    @property
    def faults_injected(self) -> int:
        counts = self.counts
        return sum(counts[k] for k in FAULTS)

    def _draw(self, method: str) -> tuple[str | None, bool]:
        """The fault for one request (or None), and whether a reset comes after forwarding."""
        with self._lock:
            self._counts["requests"] += 1
            if self._rng.random() >= self.fault_rate:
                return None, False
            kinds = [k for k in self.faults if k != "reset_body" or method == "GET"] or [None]
            return self._rng.choice(kinds), method in _IDEMPOTENT and self._rng.random() < 0.5

    def _count(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] += 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3's connection pool expects

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _proxy(self) -> None:
        proxy: FlakyS3Proxy = self.server.proxy  # type: ignore[attr-defined]
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        body = self._read_chunked() if chunked else self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault, after = proxy._draw(self.command)
        if fault in _ERRORS:
            proxy._count(fault)
            return self._error(*_ERRORS[fault])
        if fault == "reset" and not after:
            proxy._count(fault)
            return self._reset()
        status, reason, headers, data = self._forward(body, chunked)
        if fault == "reset" or (fault == "reset_body" and not data):
            proxy._count("reset")
            return self._reset()
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        # HEAD keeps the server's Content-Length (the object's size) and sends no body
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "reset_body":
            cut = proxy._rng.randrange(1, len(data)) if len(data) > 1 else 0
            self.wfile.write(data[:cut])
            proxy._count(fault)
            return self._reset(drain=True)
        self.wfile.write(data)

    def _read_chunked(self) -> bytes:
        """The raw chunked body, framing included, to pass on exactly as it came."""
        raw = bytearray()
        while True:
            line = self.rfile.readline()
            raw += line
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, up to the empty line
                    line = self.rfile.readline()
                    raw += line
                    if line in (b"\r\n", b"\n", b""):
                        return bytes(raw)
            raw += self.rfile.read(size + 2)

    def _forward(self, body: bytes, chunked: bool) -> tuple[int, str, list[tuple[str, str]], bytes]:
        proxy: FlakyS3Proxy = self.server.proxy  # type: ignore[attr-defined]
        # a fresh upstream connection per request: the proxy never adds a fault of its own
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=300)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                # Expect: 100-continue was answered here already; the server gets the whole body
                if name.lower() not in ("connection", "keep-alive", "expect", "content-length"):
                    conn.putheader(name, value)
            if not chunked:
                conn.putheader("Content-Length", str(len(body)))
            conn.putheader("Connection", "close")
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            if self.command == "HEAD" and resp.getheader("Content-Length") is not None:
                headers.append(("Content-Length", resp.getheader("Content-Length")))
            return resp.status, resp.reason, headers, data
        finally:
            conn.close()

    def _error(self, status: int, code: str, message: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>flaky-{id(self):x}</RequestId><HostId>flaky-s3-proxy</HostId></Error>").encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self, drain: bool = False) -> None:
        """Abort the connection with a RST (SO_LINGER 0), not a graceful FIN."""
        sock = self.connection
        if drain:  # let what was sent reach the client first, so the reset lands mid-body
            deadline = time.monotonic() + 2
            while _unsent(sock) and time.monotonic() < deadline:
                time.sleep(0.001)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        # the socket's file descriptor closes only once its file objects are closed too
        self.wfile.close()
        self.rfile.close()
        sock.close()
        self.wfile = io.BytesIO()  # the base class flushes wfile after every request


def _unsent(sock: socket.socket) -> int:
    """Bytes still in the kernel's send queue (Linux TIOCOUTQ); 0 where unknown."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0
