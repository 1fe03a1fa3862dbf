"""The CLI's side of the resident daemon: find a running `llmasos serve` and talk to it.

`llmasos run`, `ps`, `pull`, `list`, `show`, `rm` and `stop` ask `Daemon.find()` first. A server at
LLMASOS_HOST (default 127.0.0.1:8000, what `llmasos serve` binds) that answers /api/version within a
moment is used, with LLMASOS_API_KEY as its bearer key when set; otherwise the verb runs in this process
(`stop` and `ps` need a server). This module imports nothing heavy: with a warm daemon a verb never loads
torch, which is what makes `llmasos run` answer at once. The probe is the standard library's; httpx
(0.4 s to import, with its transports) loads only to talk to a daemon that answered.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING

from llmasos.errors import LLMasOSError

if TYPE_CHECKING:
    import httpx

DEFAULT_HOST = "127.0.0.1:8000"
_PROBE_TIMEOUT_S = 0.5  # a server on loopback answers in milliseconds; a missing one refuses at once


class DaemonError(LLMasOSError):
    """The daemon refused (its OpenAI error message), or went away mid-answer."""


def host_url() -> str:
    host = os.environ.get("LLMASOS_HOST") or DEFAULT_HOST
    return (host if "://" in host else f"http://{host}").rstrip("/")


class Daemon:
    def __init__(self, url: str, api_key: str | None = None):
        import httpx

        self.url = url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # no read timeout: a pull or a long answer may be silent for a while between events
        self.http = httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(10.0, read=None))

    @classmethod
    def find(cls) -> Daemon | None:
        """The daemon at LLMASOS_HOST if one answers now, else None."""
        url = host_url()
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=_PROBE_TIMEOUT_S) as response:
                answer = json.loads(response.read())
        # refused, timed out, an HTTP error status, not HTTP, not JSON, a bad URL: no daemon here
        except (OSError, http.client.HTTPException, ValueError):
            return None
        if not isinstance(answer, dict) or "version" not in answer:
            return None
        return cls(url, os.environ.get("LLMASOS_API_KEY"))

    @classmethod
    def required(cls) -> Daemon:
        daemon = cls.find()
        if daemon is None:
            raise LLMasOSError(
                f"no LLMasOS server answers at {host_url()}; start one with `llmasos serve`, "
                "or point LLMASOS_HOST at one"
            )
        return daemon

    # -- requests ------------------------------------------------------------------------------
    def get(self, path: str) -> dict:
        return self._call("GET", path).json()

    def post(self, path: str, body: dict) -> dict:
        return self._call("POST", path, json=body).json()

    def delete(self, path: str, body: dict | None = None) -> dict:
        return self._call("DELETE", path, json=body).json()

    def models(self) -> list[str]:
        return [m["id"] for m in self.get("/v1/models")["data"]]

    def pull(self, model: str) -> Iterator[dict]:
        """The pull's progress events, as the store reports them; raises DaemonError if it fails."""
        yield from self._events("/api/pull", {"model": model, "stream": True}, sse=False)

    def stream_text(self, model: str, prompt: str | list[dict], params: dict) -> Iterator[str]:
        """An answer's text deltas: a chat when `prompt` is a conversation, else a plain completion.
        Closing the iterator closes the connection, which aborts the request on the server."""
        chat = not isinstance(prompt, str)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = {
            "model": model,
            "stream": True,
            **params,
            **({"messages": prompt} if chat else {"prompt": prompt}),
        }
        for event in self._events(path, body, sse=True):
            for choice in event.get("choices", []):
                text = choice["delta"].get("content") if chat else choice.get("text")
                if text:
                    yield text

    # -- plumbing ------------------------------------------------------------------------------
    def _events(self, path: str, body: dict, sse: bool) -> Iterator[dict]:
        """The JSON objects of a streamed answer (server-sent events, or NDJSON lines); an error object
        in the stream, or a server gone mid-stream, is a DaemonError."""
        import httpx

        try:
            with self.http.stream("POST", path, json=body) as response:
                self._check(response)
                for line in response.iter_lines():
                    if sse:
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        line = line.removeprefix("data: ")
                    if not line:
                        continue
                    event = json.loads(line)
                    if "error" in event:
                        raise DaemonError(f"the server at {self.url} stopped: {event['error']['message']}")
                    yield event
        except httpx.HTTPError as exc:
            raise DaemonError(f"the LLMasOS server at {self.url} went away mid-answer ({exc})") from exc

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise DaemonError(f"the LLMasOS server at {self.url} went away ({exc})") from exc
        self._check(response)
        return response

    def _check(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        response.read()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        raise DaemonError(f"the server at {self.url} answered {response.status_code}: {message}")
