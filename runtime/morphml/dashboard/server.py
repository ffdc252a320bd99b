"""The dashboard's HTTP server: the page, its static assets, and a read-only JSON API.

Routes (GET and HEAD only; any other method gets 405):

- `/` (index.html) and `/static/<file>`: the page and its assets, from the package. They hold
  no experiment data, so they are served without a token (a browser cannot put an
  Authorization header on a navigation); the page takes the token from its URL fragment
  (`#token=...`, never sent to the server) or asks for it.
- `/api/summary`: counts, phase, best, metric and goal, the Pareto front, the current revision.
- `/api/trials`, `/api/curves`, `/api/attempts`, `/api/losses` with `?since=REV&offset=N&limit=M`:
  the rows changed after revision REV, a page at a time (DashboardData.changed).
- `/api/trial/<id>`: one trial with its architecture graph, attempts and learning curve.

With tokens configured (the master: the experiment's token and an optional read-only view
token), every `/api/` request needs `Authorization: Bearer <token>`: none gives 401 (with
`WWW-Authenticate: Bearer`), a wrong one 403. Without tokens (`morphml dashboard`, bound to
loopback by default) the API is open. Every answer carries `Cache-Control: no-store` and a
Content-Security-Policy that allows nothing but this origin.

Imports: the standard library and morphml.dashboard.data (and, through it, the journal).
"""

from __future__ import annotations

import gzip
import hmac
import json
import logging
import socket
import threading
import urllib.parse
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from morphml.distributed.journal import JournalError

from .data import RESOURCES, DashboardData

log = logging.getLogger("morphml.dashboard")

STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".txt": "text/plain; charset=utf-8"}
GZIP_ABOVE = 16384  # bytes of JSON
# The page loads only its own scripts and styles and talks only to its own origin. ECharts sets
# element styles from script, hence 'unsafe-inline' for styles only.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def static_file(name: str) -> bytes | None:
    """The bytes of static/<name> from the package (None when there is no such file)."""
    parts = [p for p in name.split("/") if p]
    if not parts or any(p in (".", "..") or p.startswith(".") for p in parts):
        return None
    node = resources.files("morphml.dashboard").joinpath("static", *parts)
    try:
        return node.read_bytes() if node.is_file() else None
    except OSError:
        return None


class V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class DashboardServer:
    """Serves one DashboardData over HTTP from a daemon thread (ThreadingHTTPServer)."""

    def __init__(self, data: DashboardData, host: str = "127.0.0.1", port: int = 0,
                 tokens: Sequence[str] = ()):
        self.data = data
        self.host, self.requested_port = host.strip("[]"), port
        self.tokens = [t.encode() for t in tokens if t]
        self.port: int | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}/"

    def start(self) -> int:
        """Listens on host:port (0: a free one) and serves from a thread; returns the port."""
        handler = type("Handler", (DashboardHandler,), {"server_state": self})
        server_class: type[ThreadingHTTPServer] = ThreadingHTTPServer
        if ":" in self.host:
            server_class = V6Server
        try:
            self._httpd = server_class((self.host, self.requested_port), handler)
        except OSError as exc:
            raise OSError(f"dashboard port: cannot listen on {self.host}:{self.requested_port} ({exc})") from exc
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="dashboard-http", daemon=True)
        self._thread.start()
        log.info("dashboard on %s", self.url)
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def authorize(self, header: str | None) -> HTTPStatus | None:
        """None when the request may read the API, else the status to refuse it with."""
        if not self.tokens:
            return None
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return HTTPStatus.UNAUTHORIZED
        given = value.strip().encode()
        # compare_digest against every token (no early exit on the first match: same time either way)
        ok = [hmac.compare_digest(given, token) for token in self.tokens]
        return None if any(ok) else HTTPStatus.FORBIDDEN


class DashboardHandler(BaseHTTPRequestHandler):
    server_state: DashboardServer
    server_version = "morphml-dashboard"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: Any, extra: dict[str, str] | None = None) -> None:
        body = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        # A page of 2000 trials is ~1 MB of JSON and ~10x less gzipped: worth it through kubectl port-forward.
        if len(body) > GZIP_ABOVE and "gzip" in (self.headers.get("Accept-Encoding") or ""):
            body = gzip.compress(body, compresslevel=1)
            extra = {**(extra or {}), "Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
        self._send(status, body, "application/json", extra)

    def _error(self, status: HTTPStatus, message: str) -> None:
        extra = {"WWW-Authenticate": 'Bearer realm="morphml-dashboard"'} if status == HTTPStatus.UNAUTHORIZED else None
        self._json(status, {"error": message}, extra)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        if path in ("/", "/index.html"):
            self._send(200, static_file("index.html") or b"", STATIC_TYPES[".html"])
            return
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            body = static_file(name)
            if body is None:
                self._error(HTTPStatus.NOT_FOUND, f"no static file {name!r}")
                return
            suffix = name[name.rfind("."):] if "." in name else ""
            self._send(200, body, STATIC_TYPES.get(suffix, "application/octet-stream"))
            return
        if not path.startswith("/api/"):
            self._error(HTTPStatus.NOT_FOUND, f"no page {path!r}: the dashboard is at /")
            return
        refused = self.server_state.authorize(self.headers.get("Authorization"))
        if refused == HTTPStatus.UNAUTHORIZED:
            self._error(refused, "this dashboard needs a token: send Authorization: Bearer <token> "
                                 "(the experiment's token or its read-only view token)")
            return
        if refused is not None:
            self._error(refused, "wrong token for this dashboard")
            return
        try:
            self._api(path[len("/api/"):], urllib.parse.parse_qs(url.query))
        except JournalError as exc:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
        except Exception as exc:  # a bug: say so to the client instead of dropping the connection
            log.exception("dashboard %s", path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")

    def _api(self, name: str, query: dict[str, list[str]]) -> None:
        data = self.server_state.data
        data.refresh()
        if name == "summary":
            self._json(200, data.summary())
            return
        if name.startswith("trial/"):
            trial = data.trial(urllib.parse.unquote(name[len("trial/"):]))
            if trial is None:
                self._error(HTTPStatus.NOT_FOUND, f"no trial {name[len('trial/'):]!r} in the journal")
            else:
                self._json(200, trial)
            return
        if name in RESOURCES:
            numbers = {}
            for key, default in (("since", 0), ("offset", 0), ("limit", 2000)):
                text = (query.get(key) or [str(default)])[0]
                try:
                    numbers[key] = int(text)
                except ValueError:
                    numbers[key] = -1
                if numbers[key] < 0:
                    self._error(HTTPStatus.BAD_REQUEST, f"{key}={text!r}: allowed an integer >= 0")
                    return
            self._json(200, data.changed(name, numbers["since"], numbers["offset"], numbers["limit"]))
            return
        self._error(HTTPStatus.NOT_FOUND, f"no API {name!r}: allowed summary, trial/<id>, {', '.join(RESOURCES)}")

    def _refuse(self) -> None:
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command}: the dashboard is read-only (GET, HEAD)")

    def do_POST(self) -> None:
        self._refuse()

    def do_PUT(self) -> None:
        self._refuse()

    def do_DELETE(self) -> None:
        self._refuse()

    def do_PATCH(self) -> None:
        self._refuse()
