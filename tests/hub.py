"""A local stand-in for the Hugging Face hub, on loopback, serving model folders as repos.

It answers the requests huggingface_hub (2.x) makes for `HfApi.repo_info` and `snapshot_download`:
revision info (`/api/models/{repo}/revision/{rev}`), the file tree (`/api/models/{repo}/tree/{commit}`)
and file resolution (`/{repo}/resolve/{commit}/{file}`: HEAD for ETag, X-Repo-Commit and size, GET
for the bytes). No X-Xet-* headers are sent, so files come over plain HTTP. Each repo has one commit;
a revision is "main" or that commit. It records every request's Authorization header, so a test can
show that HF_TOKEN was sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

_API = re.compile(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


def commit_of(repo: str) -> str:
    """The one commit of `repo` on the local hub."""
    return hashlib.sha1(repo.encode()).hexdigest()


def unreachable_url() -> str:
    """An endpoint on a loopback port nothing listens on: the hub as seen offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by its path in the repo, as the hub would hold the folder pushed whole."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class LocalHub:
    url: str  # what HF_ENDPOINT is set to
    repos: dict[str, dict[str, bytes]]  # repo id -> path in the repo -> bytes
    authorizations: list[str | None] = field(default_factory=list)  # per request, in order


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub

    def do_HEAD(self):
        self._serve(send_body=False)

    def do_GET(self):
        self._serve(send_body=True)

    def log_message(self, *args):
        pass

    def _serve(self, send_body: bool):
        self.hub.authorizations.append(self.headers.get("Authorization"))
        path = unquote(urlparse(self.path).path)
        api, resolve = _API.fullmatch(path), _RESOLVE.fullmatch(path)
        repo, rev = api.group(1, 3) if api else resolve.group(1, 2) if resolve else (None, None)
        files = self.hub.repos.get(repo)
        if files is None:
            return self._reply(404, b"{}", {"X-Error-Code": "RepoNotFound"}, send_body)
        commit = commit_of(repo)
        if rev not in ("main", commit):
            return self._reply(404, b"{}", {"X-Error-Code": "RevisionNotFound"}, send_body)
        json_type = {"Content-Type": "application/json"}
        if api and api.group(2) == "revision":
            info = {"id": repo, "sha": commit, "siblings": [{"rfilename": f} for f in files]}
            self._reply(200, json.dumps(info).encode(), json_type, send_body)
        elif api:
            tree = [
                {"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for f, data in files.items()
            ]
            self._reply(200, json.dumps(tree).encode(), json_type, send_body)
        elif resolve.group(3) in files:
            data = files[resolve.group(3)]
            headers = {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": commit}
            self._reply(200, data, headers, send_body)
        else:
            self._reply(404, b"{}", {"X-Error-Code": "EntryNotFound"}, send_body)

    def _reply(self, status: int, body: bytes, headers: dict[str, str], send_body: bool):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


@contextmanager
def serve_hub(repos: dict[str, dict[str, bytes]]) -> Iterator[LocalHub]:
    """The hub on a free loopback port for the duration of the block; set HF_ENDPOINT to `.url`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    hub = LocalHub(f"http://127.0.0.1:{server.server_port}", repos)
    server.RequestHandlerClass = type("Handler", (_Handler,), {"hub": hub})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
