"""The daemon's /api: the store and the loaded models over HTTP, with admin keys guarding the changes."""

import json

import httpx
import pytest

from llmasos.serve.keys import KeyStore
from llmasos.store import ModelStore

from hub import folder_files, serve_hub
from serving import LiveServer, server_config
from tiny import save_tiny_model

LOAD_TIMEOUT = 300  # a first load may build the CPU kernels


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_folder):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path))
    ModelStore().import_path(tiny_folder, "tiny", progress=False)
    return tmp_path


def pull_lines(url: str, model: str, headers=None) -> list[dict]:
    with httpx.stream("POST", f"{url}/api/pull", json={"model": model}, headers=headers, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        return [json.loads(line) for line in r.iter_lines() if line]


def test_the_store_and_the_loaded_models_over_http(home, tiny_folder, monkeypatch):
    with (
        serve_hub({"org/pulled": folder_files(tiny_folder)}) as hub,
        LiveServer(server_config([], home, preload=False)) as server,
    ):
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        url = server.url
        assert httpx.get(f"{url}/api/version").json()["version"]
        (tiny,) = httpx.get(f"{url}/api/tags").json()["models"]
        assert tiny["name"] == "tiny" and tiny["architecture"] == "llama" and tiny["size"] > 0
        shown = httpx.post(f"{url}/api/show", json={"model": "tiny"}).json()
        assert shown["details"]["digest"] == tiny["digest"] and shown["card"]["name"] == "tiny"
        missing = httpx.post(f"{url}/api/show", json={"model": "nope"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"

        lines = pull_lines(url, "org/pulled")
        assert lines[-1]["status"] == "success" and lines[-1]["name"] == "org/pulled"
        storing = [e for e in lines if e["status"] == "storing"]
        assert storing[-1]["completed"] == storing[-1]["total"] > 0  # bytes, as the bar shows them
        assert any(e["status"] == "downloading" for e in lines)
        assert {m["name"] for m in httpx.get(f"{url}/api/tags").json()["models"]} == {"tiny", "org/pulled"}
        failed = pull_lines(url, "org/absent")
        assert (
            failed[-1]["error"]["type"] == "invalid_request_error"
            and "org/absent" in failed[-1]["error"]["message"]
        )

        loaded = httpx.post(f"{url}/api/load", json={"model": "org/pulled"}, timeout=LOAD_TIMEOUT).json()
        assert loaded["loaded"] == "org/pulled" and loaded["memory_bytes"] > 0
        assert [m["model"] for m in httpx.get(f"{url}/api/ps").json()["models"]] == ["org/pulled"]
        assert httpx.post(f"{url}/api/stop", json={"model": "org/pulled"}).json() == {
            "unloaded": "org/pulled"
        }
        assert httpx.post(f"{url}/api/stop", json={"model": "org/pulled"}).json() == {"unloaded": None}
        httpx.post(f"{url}/api/load", json={"model": "org/pulled"}, timeout=LOAD_TIMEOUT)
        deleted = httpx.request("DELETE", f"{url}/api/delete", json={"model": "org/pulled"})
        assert deleted.json() == {"deleted": "org/pulled"} and not server.state.registry.loaded
        assert [m["name"] for m in httpx.get(f"{url}/api/tags").json()["models"]] == ["tiny"]
        gone = httpx.request("DELETE", f"{url}/api/delete", json={"model": "org/pulled"})
        assert gone.status_code == 404


def test_changes_need_an_admin_key_once_keys_exist(home):
    keys = KeyStore(home / "keys.json")
    _, user = keys.add("user")
    _, root = keys.add("root", admin=True)
    as_user, as_root = {"Authorization": f"Bearer {user}"}, {"Authorization": f"Bearer {root}"}
    with LiveServer(server_config(["tiny"], home, preload=False)) as server:
        url = server.url
        assert httpx.get(f"{url}/api/tags").status_code == 401
        assert httpx.get(f"{url}/api/tags", headers=as_user).status_code == 200
        for method, path, body in [
            ("POST", "/api/pull", {"model": "org/x"}),
            ("POST", "/api/load", {"model": "tiny"}),
            ("POST", "/api/stop", {"model": "tiny"}),
            ("DELETE", "/api/delete", {"model": "tiny"}),
            ("GET", "/api/keys", None),
        ]:
            refused = httpx.request(method, url + path, json=body, headers=as_user)
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_required", path
        assert "tiny" in [m["name"] for m in httpx.get(f"{url}/api/tags", headers=as_root).json()["models"]]

        made = httpx.post(f"{url}/api/keys", json={"name": "ci", "models": ["tiny"]}, headers=as_root).json()
        listed = httpx.get(f"{url}/api/keys", headers=as_root).json()["keys"]
        assert {k["name"] for k in listed} == {"user", "root", "ci"} and all("hash" not in k for k in listed)
        assert (
            httpx.get(f"{url}/api/ps", headers={"Authorization": f"Bearer {made['secret']}"}).status_code
            == 200
        )
        assert httpx.request("DELETE", f"{url}/api/keys/ci", headers=as_root).json() == {"revoked": "ci"}
        assert (
            httpx.get(f"{url}/api/ps", headers={"Authorization": f"Bearer {made['secret']}"}).status_code
            == 401
        )
        deleted = httpx.request("DELETE", f"{url}/api/delete", json={"model": "tiny"}, headers=as_root)
        assert deleted.status_code == 200 and not ModelStore().list()
