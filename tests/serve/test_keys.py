"""API keys: hashed at rest, shared between processes through the file, managed from the shell."""

import json
import threading

import pytest
from typer.testing import CliRunner

from llmasos.cli.keys import keys_app
from llmasos.errors import LLMasOSError
from llmasos.serve.keys import SECRET_PREFIX, KeyStore


@pytest.fixture
def keys_file(tmp_path):
    return tmp_path / "keys.json"


def test_add_list_revoke_round_trip(keys_file):
    store = KeyStore(keys_file)
    key, secret = store.add("alice", models=["smollm2", "qwen*"], requests_per_minute=60, token_budget=1000)
    store.add("bob")
    assert secret.startswith(SECRET_PREFIX) and len(secret) >= len(SECRET_PREFIX) + 43  # 32 bytes

    again = KeyStore(keys_file)
    assert [k.name for k in again.list()] == ["alice", "bob"]
    alice = again.list()[0]
    assert alice == key
    assert alice.models == ["smollm2", "qwen*"] and alice.requests_per_minute == 60
    assert alice.tokens_per_minute is None and alice.token_budget == 1000 and not alice.revoked

    again.revoke("alice")
    assert [k.revoked for k in KeyStore(keys_file).list()] == [True, False]


def test_secret_is_hashed_at_rest(keys_file):
    _, secret = KeyStore(keys_file).add("alice")
    text = keys_file.read_text()
    assert secret not in text and secret[len(SECRET_PREFIX) :] not in text
    assert json.loads(text)["keys"][0]["hash"].startswith("sha256:")
    assert keys_file.stat().st_mode & 0o077 == 0


def test_authenticate(keys_file):
    store = KeyStore(keys_file)
    _, alice = store.add("alice")
    _, bob = store.add("bob")
    assert store.authenticate(alice).name == "alice"
    assert store.authenticate(bob).name == "bob"
    assert store.authenticate("sk-llmasos-wrong") is None
    assert store.authenticate("") is None
    store.revoke("alice")
    assert store.authenticate(alice) is None
    assert store.authenticate(bob).name == "bob"


def test_allows_model(keys_file):
    store = KeyStore(keys_file)
    anything, _ = store.add("anything")
    some, _ = store.add("some", models=["smollm2", "Qwen/*"])
    assert anything.allows_model("smollm2") and anything.allows_model("org/x")
    assert some.allows_model("smollm2") and some.allows_model("Qwen/Qwen3-0.6B")
    assert not some.allows_model("llama") and not some.allows_model("smollm2-large")


def test_allows_tool(keys_file):
    store = KeyStore(keys_file)
    anything, _ = store.add("anything")
    some, _ = store.add("some", tools=["get_*", "search"])
    none, _ = store.add("none", tools=[])
    assert anything.allows_tool("rm_rf") and some.allows_tool("get_weather") and some.allows_tool("search")
    assert not some.allows_tool("search_web") and not none.allows_tool("get_weather")
    assert KeyStore(keys_file).list()[2].tools == ["get_*", "search"], "the tools persist"


def test_errors(keys_file):
    store = KeyStore(keys_file)
    store.add("alice")
    with pytest.raises(LLMasOSError, match="already exists"):
        store.add("alice")
    store.revoke("alice")
    with pytest.raises(LLMasOSError, match=r"'alice' \(revoked\) already exists"):
        store.add("alice")
    with pytest.raises(LLMasOSError, match="no key named 'carol'"):
        store.revoke("carol")
    for bad in ("", "../x", "a b"):
        with pytest.raises(LLMasOSError, match="invalid key name"):
            store.add(bad)
    with pytest.raises(LLMasOSError, match="rpm must be at least 1"):
        store.add("dave", requests_per_minute=0)
    with pytest.raises(LLMasOSError, match="at least one model"):
        store.add("dave", models=[""])
    assert [k.name for k in store.list()] == ["alice"]  # failed changes left the file as it was


def test_reload_when_another_instance_changes_the_file(keys_file):
    server = KeyStore(keys_file)
    assert server.list() == []
    _, secret = KeyStore(keys_file).add("alice")  # `llmasos keys add` while the server runs
    assert server.authenticate(secret).name == "alice"
    KeyStore(keys_file).revoke("alice")
    assert server.authenticate(secret) is None
    assert server.reload() is False  # unchanged: only a stat


def test_budget_usage_persists_across_instances(keys_file):
    store = KeyStore(keys_file)
    _, secret = store.add("alice", token_budget=1000)
    key = store.authenticate(secret)
    store.record_usage("alice", 120)
    store.record_usage("alice", 30)
    assert key.tokens_used == 150  # counted at once, in memory
    assert KeyStore(keys_file).list()[0].tokens_used == 0  # not yet on disk
    store.flush()
    assert KeyStore(keys_file).list()[0].tokens_used == 150

    store.record_usage("alice", 50)
    KeyStore(keys_file).add("bob")  # another process writes: the pending 50 must survive the reload
    assert store.authenticate(secret).tokens_used == 200
    store.flush()
    store.flush()  # nothing pending: nothing added twice
    assert KeyStore(keys_file).list()[0].tokens_used == 200


def test_two_servers_flush_to_one_file(keys_file):
    KeyStore(keys_file).add("alice")
    one, two = KeyStore(keys_file), KeyStore(keys_file)
    one.record_usage("alice", 10)
    two.record_usage("alice", 5)
    one.flush()
    two.flush()
    assert KeyStore(keys_file).list()[0].tokens_used == 15


def test_concurrent_changes_are_not_lost(keys_file):
    server = KeyStore(keys_file)
    server.add("server")

    def add(i):
        KeyStore(keys_file).add(f"key{i}")

    def use():
        for _ in range(20):
            server.record_usage("server", 1)
            server.flush()

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)] + [threading.Thread(target=use)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keys = {k.name: k for k in KeyStore(keys_file).list()}
    assert sorted(keys) == sorted(["server", *(f"key{i}" for i in range(8))])
    assert keys["server"].tokens_used == 20


def test_corrupt_file_names_the_file_and_the_fix(keys_file):
    store = KeyStore(keys_file)
    _, secret = store.add("alice")
    keys_file.write_text('{"keys": [')
    fix = f"keys file {keys_file} is unreadable or damaged.*llmasos keys add"
    with pytest.raises(LLMasOSError, match=fix):
        KeyStore(keys_file)
    with pytest.raises(LLMasOSError, match="damaged"):  # a running server fails closed
        store.authenticate(secret)
    keys_file.write_text('{"keys": [{"name": "x"}]}')
    with pytest.raises(LLMasOSError, match="damaged"):
        KeyStore(keys_file)


def test_default_path_is_in_llmasos_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    KeyStore().add("alice")
    assert (tmp_path / "home" / "keys.json").is_file()


def test_cli(keys_file):
    runner = CliRunner()

    def keys(*args):
        return runner.invoke(keys_app, [*args, "--keys-file", str(keys_file)])

    added = keys(
        "add", "alice", "--models", "smollm2,qwen", "--tools", "get_*", "--rpm", "60", "--budget", "500"
    )
    assert added.exit_code == 0, added.output
    secret = added.stdout.strip()
    assert secret.startswith(SECRET_PREFIX) and "\n" not in secret
    assert "will not be shown again" in added.stderr
    assert KeyStore(keys_file).authenticate(secret).models == ["smollm2", "qwen"]
    assert KeyStore(keys_file).authenticate(secret).tools == ["get_*"]

    assert keys("add", "bob", "--tpm", "1000").exit_code == 0
    assert keys("add", "root", "--admin").exit_code == 0
    listed = keys("list")
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    header = ["NAME", "MODELS", "TOOLS", "ADMIN", "RPM", "TPM", "USED/BUDGET", "CREATED", "(UTC)", "REVOKED"]
    assert lines[0].split() == header
    assert lines[1].split()[:6] == ["alice", "smollm2,qwen", "get_*", "60", "-", "0/500"]  # (no ADMIN mark)
    assert lines[2].split()[:6] == ["bob", "*", "*", "-", "1000", "0/-"]
    assert lines[3].split()[:4] == ["root", "*", "*", "yes"] and KeyStore(keys_file).list()[-1].admin
    assert secret not in listed.output

    revoked = keys("revoke", "alice")
    assert revoked.exit_code == 0 and "revoked alice" in revoked.stdout
    assert keys("list").stdout.splitlines()[1].split()[-1] == "yes"

    assert isinstance(keys("add", "bob").exception, LLMasOSError)  # cli.main prints it as one line
    assert isinstance(keys("revoke", "carol").exception, LLMasOSError)
    assert keys("add", "carol", "--rpm", "0").exit_code == 2  # a usage error, from typer
