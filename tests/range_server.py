"""A local HTTP server for "remote" scenes without a network: files of one folder served
with Range requests, ETags and byte counts, in a thread (tests/geo and bench/bench_remote.py).

Paths under a prefix in ``drop`` have their connection closed without an answer (a flaky
server); ``requests`` and ``sent`` count what was asked and sent, per path.
"""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
from collections import Counter
from email.utils import formatdate
from pathlib import Path


class RangeServer:
    """Serve ``root`` on 127.0.0.1 (a free port) until :meth:`close`; ``url(name)`` is a
    file's address. ``sent`` counts body bytes sent per path, ``requests`` GET requests and
    ``heads`` HEAD requests."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.sent: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()  # GET requests
        self.heads: Counter[str] = Counter()  # HEAD requests
        self.drop: set[str] = set()
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _file(self) -> Path | None:
                name = self.path.split("?", 1)[0].lstrip("/")
                path = (server.root / name).resolve()
                inside = server.root.resolve() in path.parents
                return path if inside and path.is_file() else None

            def _head(self, path: Path, status: int, length: int, extra: dict) -> None:
                stat = path.stat()
                self.send_response(status)
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                tag = hashlib.sha256(f"{stat.st_mtime_ns}/{stat.st_size}".encode()).hexdigest()
                self.send_header("ETag", f'"{tag[:16]}"')
                self.send_header("Last-Modified", formatdate(stat.st_mtime, usegmt=True))
                for key, value in extra.items():
                    self.send_header(key, value)
                self.end_headers()

            def _serve(self, body: bool) -> None:
                key = self.path.split("?", 1)[0]
                with server._lock:
                    (server.requests if body else server.heads)[key] += 1
                if any(key.startswith(p) for p in server.drop):
                    self.close_connection = True
                    self.connection.close()
                    return
                path = self._file()
                if path is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = path.stat().st_size
                match = re.match(r"bytes=(\d*)-(\d*)$", self.headers.get("Range", ""))
                if match and (match.group(1) or match.group(2)):
                    if match.group(1):
                        start = int(match.group(1))
                        end = min(int(match.group(2) or size - 1), size - 1)
                    else:
                        start, end = max(size - int(match.group(2)), 0), size - 1
                    self._head(path, 206, end - start + 1,
                               {"Content-Range": f"bytes {start}-{end}/{size}"})
                else:
                    start, end = 0, size - 1
                    self._head(path, 200, size, {})
                if body:
                    with path.open("rb") as file:
                        file.seek(start)
                        data = file.read(end - start + 1)
                    self.wfile.write(data)
                    with server._lock:
                        server.sent[key] += len(data)

            def do_GET(self) -> None:
                self._serve(True)

            def do_HEAD(self) -> None:
                self._serve(False)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that hangs up (GDAL after a dropped reply) is no news

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        """The address of ``name`` (a path relative to the root)."""
        return f"http://127.0.0.1:{self.httpd.server_port}/{name}"

    def bytes_sent(self, prefix: str = "/") -> int:
        """Body bytes sent for paths starting with ``prefix``."""
        with self._lock:
            return sum(n for k, n in self.sent.items() if k.startswith(prefix))

    def close(self) -> None:
        """Stop serving and free the port."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
