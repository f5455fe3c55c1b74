"""A local HTTP file server on 127.0.0.1 for image URL lists (synthetic data, tests).

    python -m infra.local.http --root data/synthetic/images --port 8000
"""

from __future__ import annotations

import argparse
import functools
import http.server
import sys
import threading
from dataclasses import dataclass
from pathlib import Path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


@dataclass
class HttpServer:
    server: http.server.ThreadingHTTPServer
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start(root: str | Path, port: int = 0) -> HttpServer:
    """Serve ``root`` on 127.0.0.1 from a daemon thread (port 0 picks a free one)."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="clipcap-http", daemon=True)
    thread.start()
    return HttpServer(server, thread)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    srv = start(args.root, args.port)
    print(f"serving {args.root} at {srv.base_url}")
    srv.thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
