"""The web console, driven in Debian's Chromium (Playwright's sync API) against a real server on loopback.

Browser downloads are unreachable here, so Playwright launches the system's chromium
(`apt-get install -y chromium`; .ci/run installs it when missing). The screenshots of the chat, models
and dashboard pages go to a temporary folder, or to LLMASOS_SCREENSHOTS when set
(`LLMASOS_SCREENSHOTS=docs/img python -m pytest tests/serve/test_console.py` refreshes the README's).
"""

import dataclasses
import json
import os
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from llmasos.serve.keys import KeyStore
from llmasos.serve.registry import RegistryConfig
from llmasos.store import ModelStore
from llmasos.store.card import EvalRecord, record_eval

from hub import folder_files, serve_hub
from serving import ENGINE, LiveServer, server_config, slow_engine
from tiny import save_tiny_model

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 60_000  # a first answer may wait for the engine to warm up on a busy machine


@pytest.fixture(scope="module")
def browser():
    """Chromium for this module only. Not pytest-playwright's session-wide browser: a running sync
    Playwright keeps its event loop marked as running in the main thread, so every later test's
    `asyncio.run` would fail; leaving the `with` block clears it."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"the console's browser tests drive {CHROMIUM}: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, request):
    """A fresh tab at 1280x800, failing its test on any error the page's console reports (a CSP
    violation included), but those a test expects (`console_error_expected`)."""
    expected = [mark.args[0] for mark in request.node.iter_markers("console_error_expected")]
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    expected += ["401", "403"]  # refusals the tests provoke
    unexpected = [e for e in errors if not any(text in e for text in expected)]
    assert not unexpected, unexpected


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_folder):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path))
    ModelStore().import_path(tiny_folder, "tiny", progress=False)
    return tmp_path


@pytest.fixture
def screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("LLMASOS_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shoot(page: Page, folder: Path, name: str) -> None:
    path = folder / f"console-{name}.png"
    page.screenshot(path=path)
    assert path.stat().st_size > 10_000  # a drawn page, not a blank one


def settings(page: Page, **values) -> None:
    page.locator("#chat-settings summary").click()
    for label, value in values.items():
        page.get_by_label(label, exact=True).fill(value)
    page.locator("#chat-settings summary").click()


def ask(page: Page, text: str) -> None:
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_label("Message", exact=True).press("Enter")
    answered(page)


def answered(page: Page) -> None:
    """Wait for the answer being streamed to end (the page marks the messages busy until then)."""
    expect(page.locator("#messages")).to_have_attribute("aria-busy", "false", timeout=WAIT_MS)


def test_the_page_and_its_files_carry_a_strict_policy(home):
    with LiveServer(server_config([], home, preload=False)) as server:
        page = httpx.get(f"{server.url}/")
        policy = page.headers["content-security-policy"]
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "cdn" not in page.text.lower() and "https://" not in page.text  # every asset is served here
        script = httpx.get(f"{server.url}/console/js/app.js")
        assert script.headers["content-type"].startswith("text/javascript")
        for path in ["/console/%2e%2e/console.py", "/console/..%2fapp.py", "/console/nope.js"]:
            refused = httpx.get(server.url + path)
            assert refused.status_code == 404 and "import" not in refused.text, path


def test_a_chat_streams_keeps_its_figures_and_survives_reload(home, page: Page, screenshots):
    with LiveServer(server_config(["tiny"], home)) as server:
        page.goto(server.url)
        expect(page.get_by_label("Model", exact=True)).to_have_value("tiny")
        settings(page, **{"Max tokens": "12", "Seed": "1"})
        ask(page, "Hello, how are you?")
        first = page.locator(".message.assistant").last
        expect(first.locator(".stats")).to_contain_text("tokens/s")
        assert first.locator(".content").inner_text().strip()
        ask(page, "What is the capital of France?")
        answers = page.locator(".message.assistant")
        expect(answers).to_have_count(2)
        # the second prompt starts with the first turn, which the prefix cache still holds
        stats = answers.last.locator(".stats").inner_text()
        prompt, cached = (int(s) for s in _between(stats, "prompt ", " tokens (", " from the prefix cache"))
        assert 0 < cached < prompt, stats
        shoot(page, screenshots, "chat")

        page.get_by_role("button", name="Regenerate").click()
        answered(page)
        expect(answers).to_have_count(2)
        page.locator(".message.user").first.get_by_role("button", name="Edit").click()
        page.get_by_label("Edit message").fill("Once upon a time")
        page.locator(".message.user").first.get_by_role("button", name="Send").click()
        answered(page)
        expect(page.locator(".message")).to_have_count(2)  # the later turns were replaced
        answer = page.locator(".message.assistant .content").inner_text()

        page.reload()
        expect(page.locator(".message.user .content")).to_have_text(["Once upon a time"])
        expect(page.locator(".message.assistant .content")).to_have_text(answer)
        expect(page.locator("#conversation-list button.conversation")).to_have_text(["Hello, how are you?"])

        page.set_viewport_size({"width": 390, "height": 844})  # a phone: one column, nothing off-screen
        expect(page.get_by_role("button", name="Conversations")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390


def test_stop_ends_an_answer_midway(home, page: Page, monkeypatch):
    with LiveServer(server_config(["tiny"], home)) as server:
        slow_engine(server, monkeypatch, seconds_per_step=0.05)
        page.goto(server.url)
        settings(page, **{"Max tokens": "200"})
        page.get_by_label("Message", exact=True).fill("Tell me a story")
        page.get_by_role("button", name="Send").click()
        expect(page.locator(".message.assistant .content")).not_to_be_empty(timeout=WAIT_MS)
        page.get_by_role("button", name="Stop").click()
        expect(page.locator(".message.assistant .stats")).to_contain_text("stopped")
        model = server.state.registry.loaded["tiny"]
        assert _eventually(lambda: model.in_flight == 0)  # the server saw the client go, and aborted


# Chromium (156 on) reports an inline handler under the page's CSP as soon as any document parses it,
# the sanitizer's inert one included, where it never runs: the asserts below say it ran nowhere
@pytest.mark.console_error_expected("Executing inline event handler violates")
def test_an_answer_holding_html_runs_nothing(home, page: Page):
    """The model is held to a JSON schema whose only value is an XSS payload, so its real answer, streamed
    through the server, holds <img onerror> and <script>: the page renders the HTML inert."""
    payload = "<img src='data:,' onerror='window.__xss=1'><script>window.__xss=2</script>"  # no JSON escapes
    schema = json.dumps({"enum": [payload]})
    with LiveServer(server_config(["tiny"], home)) as server:
        page.goto(server.url)
        page.locator("#chat-settings summary").click()
        page.get_by_label("JSON schema mode").check()
        page.get_by_label("JSON schema", exact=True).fill(schema)
        ask(page, "Say it")
        content = page.locator(".message.assistant .content")
        expect(content.locator("img")).to_have_count(1)  # the HTML was rendered as HTML, then sanitized
        assert content.locator("img").get_attribute("onerror") is None
        assert page.locator("#messages script").count() == 0
        assert page.evaluate("window.__xss") is None
        page.reload()  # drawn again from IndexedDB: still inert
        expect(content.locator("img")).to_have_count(1)
        assert page.evaluate("window.__xss") is None


def test_a_pull_shows_progress_and_the_model_appears(home, tiny_folder, page: Page, screenshots, monkeypatch):
    with (
        serve_hub({"org/pulled": folder_files(tiny_folder)}) as hub,
        LiveServer(server_config([], home, preload=False)) as server,
    ):
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        page.goto(f"{server.url}/#models")
        expect(page.locator("#tags-table tbody tr")).to_have_count(1)
        page.get_by_label("Pull a model").fill("org/pulled")
        page.get_by_role("button", name="Pull", exact=True).click()
        expect(page.locator("#pull-progress .success")).to_contain_text("Pulled org/pulled", timeout=WAIT_MS)
        stored = page.locator("#pull-progress label", has_text="storing").locator("progress")
        assert float(stored.get_attribute("value")) == float(stored.get_attribute("max")) > 0
        expect(page.locator("#tags-table tbody tr td:first-child")).to_have_text(["org/pulled", "tiny"])

        page.get_by_role("button", name="Load tiny").click()
        expect(page.locator("#ps-table tbody tr td:first-child")).to_have_text(["tiny"], timeout=WAIT_MS)
        expect(page.locator("#ps-table tbody tr")).to_contain_text("MB")
        shoot(page, screenshots, "models")
        page.get_by_role("button", name="Unload tiny").click()
        expect(page.locator("#ps-table tbody")).to_contain_text("No model is loaded")
        assert not server.state.registry.loaded


def test_models_and_dashboard_show_speculative_decoding(home, page: Page):
    engine = dataclasses.replace(ENGINE, speculative="ngram")
    with LiveServer(server_config(["tiny"], home, registry=RegistryConfig(["tiny"], engine))) as server:
        page.goto(f"{server.url}/#models")
        expect(page.locator("#ps-table tbody tr")).to_contain_text("no drafts yet", timeout=WAIT_MS)
        prompt = [17, 240, 33, 81, 5, 199, 64, 12, 301, 77] * 4  # input-grounded: prompt lookup finds drafts
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": True}
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).status_code == 200
        spec = httpx.get(f"{server.url}/api/ps").json()["models"][0]["speculative"]
        figures = re.compile(r"([\d.]+)% accepted, ([\d.]+) tok/forward")
        page.reload()
        for hash_, table in (("#models", "#ps-table"), ("#dashboard", "#dash-models")):
            page.goto(f"{server.url}/{hash_}")
            row = page.locator(f"{table} tbody tr")
            expect(row).to_contain_text(figures, timeout=WAIT_MS)
            rate, per_forward = figures.search(row.first.inner_text()).groups()  # the server's, rounded
            assert float(rate) == pytest.approx(100 * spec["acceptance_rate"], abs=0.051)
            assert float(per_forward) == pytest.approx(spec["tokens_per_forward"], abs=0.0051)


def test_without_a_key_the_console_asks_and_a_user_key_cannot_remove(home, page: Page):
    keys = KeyStore(home / "keys.json")
    _, user = keys.add("user")
    _, root = keys.add("root", admin=True)
    with LiveServer(server_config(["tiny"], home, preload=False)) as server:
        page.goto(server.url)
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text("this server needs an API key")
        page.get_by_label("Key (kept in this tab only)").fill(user)
        page.get_by_role("button", name="Use key").click()
        expect(page.get_by_label("Model", exact=True)).to_have_value("tiny")
        assert user not in page.url and page.evaluate("sessionStorage.getItem('llmasos.apiKey')") == user

        page.goto(f"{server.url}/#models")
        page.on("dialog", lambda confirm: confirm.accept())
        page.get_by_role("button", name="Remove tiny").click()
        expect(page.locator("#models-error")).to_contain_text("is not an admin key")
        expect(page.locator("#tags-table tbody tr td:first-child")).to_have_text(["tiny"])
        assert [m.name for m in ModelStore().list()] == ["tiny"]

        page.get_by_role("button", name="Change key").click()
        page.get_by_label("Key (kept in this tab only)").fill(root)
        page.get_by_role("button", name="Use key").click()
        page.get_by_role("button", name="Remove tiny").click()
        expect(page.locator("#tags-table tbody")).to_contain_text("The store is empty")
        assert ModelStore().list() == []


@pytest.mark.slow  # the decode rate is a mean over 10 s, so it takes that long to fall back to idle
def test_the_dashboard_moves_under_a_burst_and_returns_to_idle(home, page: Page, screenshots, monkeypatch):
    with LiveServer(server_config(["tiny"], home)) as server:
        slow_engine(server, monkeypatch, seconds_per_step=0.02)  # a burst that lasts a few snapshots
        page.goto(f"{server.url}/#dashboard")
        expect(tile(page, "running")).to_have_text("0")
        expect(tile(page, "decode")).to_have_text("0")

        def chat(i: int) -> None:
            messages = [{"role": "user", "content": f"story {i}"}]
            body = {"model": "tiny", "messages": messages, "max_tokens": 96}
            assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).status_code == 200

        burst = [threading.Thread(target=chat, args=(i,)) for i in range(8)]
        for thread in burst:
            thread.start()
        expect(tile(page, "running")).not_to_have_text("0", timeout=WAIT_MS)
        for thread in burst:
            thread.join()
        expect(tile(page, "decode")).not_to_have_text("0")
        expect(page.locator("#dash-models tbody tr td:first-child")).to_have_text(["tiny"])
        expect(page.locator("#dash-latency tbody tr").first).to_contain_text(" ms")
        shoot(page, screenshots, "dashboard")
        expect(tile(page, "running")).to_have_text("0")
        expect(tile(page, "decode")).to_have_text("0", timeout=WAIT_MS)  # no traffic: back to idle


def test_runs_show_loss_curves_and_recorded_evaluations(home, page: Page, tmp_path, monkeypatch):
    run = tmp_path / "runs" / "finetune"
    run.mkdir(parents=True)
    records = [{"step": s, "loss": 3.0 / s, "lr": 1e-4, "tokens": 512 * s} for s in range(1, 11)]
    records.append({"step": 10, "eval_loss": 0.42, "eval_perplexity": 1.52})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 11, "lo')
    monkeypatch.setenv("LLMASOS_RUNS_DIR", str(tmp_path / "runs"))
    store = ModelStore()
    digest = store.get("tiny").digest
    record = EvalRecord(
        task="arc-mini", kind="multiple_choice", metrics={"accuracy": 0.5}, num_examples=8,
        signature={"model_digest": digest}, recorded=datetime.now(timezone.utc).isoformat(),
    )  # fmt: skip
    assert record_eval(store, "tiny", type("Report", (), {"to_record": lambda self: record})())
    with LiveServer(server_config([], home, preload=False)) as server:
        body = httpx.get(f"{server.url}/api/runs").json()
        (found,) = body["runs"]
        assert found["name"] == "finetune" and found["records"] == records  # the unfinished line is left out
        assert [(e["model"], e["task"], e["metrics"]) for e in body["evaluations"]] == [
            ("tiny", "arc-mini", {"accuracy": 0.5})
        ]
        page.goto(f"{server.url}/#runs")
        article = page.locator("article.run")
        expect(article.locator("h2")).to_have_text("finetune")
        expect(article).to_contain_text("eval loss 0.4200")
        expect(article.locator("canvas")).to_have_count(1)  # uPlot drew the curves
        expect(page.locator("#evals-table tbody")).to_contain_text("accuracy 0.5000")


def tile(page: Page, name: str):
    return page.locator(f".tile[data-name={name}] strong")


def _between(text: str, *marks: str) -> list[str]:
    """The pieces of `text` between consecutive marks."""
    pieces = []
    for start, end in zip(marks, marks[1:]):
        text = text[text.index(start) + len(start) :]
        pieces.append(text[: text.index(end)])
    return pieces


def _eventually(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
