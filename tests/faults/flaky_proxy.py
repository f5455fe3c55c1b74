"""A fault-injecting HTTP proxy in front of the local moto S3 server (test helper, not a test module).

``FlakyProxy(upstream, fail_every=7)`` listens on 127.0.0.1 and forwards every request to ``upstream``, but
answers every ``fail_every``-th request with ``503 SlowDown`` (S3's own throttling reply) without forwarding it.
``restart(down_s)`` closes the listening socket for ``down_s`` seconds and reopens it on the same port: clients
see connection errors meanwhile, as during an S3 outage. Counts: ``forwarded``, ``failed``, ``restarts``.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import time
import urllib.parse

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FlakyProxy:
    def __init__(self, upstream: str, fail_every: int = 7, port: int = 0):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.fail_every, self.port = fail_every, port
        self.forwarded = self.failed = self.restarts = self._seen = 0
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FlakyProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self._read_body()
                with proxy._lock:
                    proxy._seen += 1
                    fail = proxy._seen % proxy.fail_every == 0
                    proxy.failed += fail
                    proxy.forwarded += not fail
                if fail:
                    msg = b"<Error><Code>SlowDown</Code><Message>injected fault</Message></Error>"
                    self._reply(503, [("Content-Type", "application/xml")], msg)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                # a HEAD reply has no body but the object's Content-Length (its size): pass that one through
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self._reply(resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP
                                          and k.lower() != "content-length"], data, length)

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes,
                       length: str | None = None) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", length if length is not None else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()
        self.restarts += 1
