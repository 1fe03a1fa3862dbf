"""The CLI as a user runs it: real subprocesses, a real terminal for the chat, clean errors."""

import os
import subprocess
import sys

import pexpect
import pytest

from tiny import save_tiny_model

LLMASOS = [sys.executable, "-c", "from llmasos.cli import main; main()"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama"))


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "LLMASOS_HOME": str(tmp_path / "home")}


def llmasos(env, *args, **kwargs):
    return subprocess.run([*LLMASOS, *args], env=env, capture_output=True, text=True, timeout=300, **kwargs)


def test_run_answers_a_prompt(model_dir, env):
    result = llmasos(env, "run", model_dir, "Hello", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_run_with_a_draft_model_answers_as_without(model_dir, env, tmp_path):
    draft = str(save_tiny_model(tmp_path / "draft", "llama", seed=1, draft=True))
    greedy = ["run", model_dir, "Hello", "--max-tokens", "12", "--temperature", "0"]
    plain = llmasos(env, *greedy)
    drafted = llmasos(env, *greedy, "--speculative", "draft", "--draft-model", draft)
    assert drafted.returncode == 0, drafted.stderr
    assert drafted.stdout == plain.stdout and plain.stdout.strip()


def test_run_pulls_a_hub_repo_id_first(model_dir, env):
    from pathlib import Path

    from hub import folder_files, serve_hub

    with serve_hub({"org/tiny": folder_files(Path(model_dir))}) as hub:
        result = llmasos({**env, "HF_ENDPOINT": hub.url}, "run", "org/tiny", "Hello", "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and hub.authorizations  # the answer, after the files came over HTTP
    assert "org/tiny" in llmasos(env, "list").stdout  # and the model is in the store now


def test_store_verbs(model_dir, env):
    assert llmasos(env, "import", model_dir, "--name", "tiny").returncode == 0
    listing = llmasos(env, "list").stdout
    assert "tiny" in listing and "llama" in listing
    show = llmasos(env, "show", "tiny").stdout
    assert "architecture  llama" in show and "chat_template  True" in show
    assert llmasos(env, "verify", "tiny").stdout.strip() == "tiny: ok"
    assert llmasos(env, "run", "tiny", "Hello", "--max-tokens", "4").returncode == 0
    assert llmasos(env, "rm", "tiny").returncode == 0
    assert "tiny" not in llmasos(env, "list").stdout


def test_show_of_a_gguf_names_its_tensor_types(env, tmp_path):
    from gguf import GGMLQuantizationType as Q

    from tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", Q.Q8_0)
    assert llmasos(env, "import", str(gguf), "--name", "tiny-q8").returncode == 0
    show = llmasos(env, "show", "tiny-q8").stdout
    assert "tensor_types  Q8_0 (embeddings, layers), F32 (norms)" in show
    assert "dtype" not in show


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "no-such-model", "hi"], "llmasos list"),
        (["run", "smollm2x", "hi"], "not in the store"),
        (["show", "nothing"], "not in the store"),
        (["run", "{model}", "hi", "--temperature", "-1"], "temperature"),
        (["run", "{model}", "hi", "--speculative", "draft"], "--draft-model"),
        (["run", "{model}", "hi", "--speculative", "draft", "--draft-model", "nodraft"], "draft model"),
        (["import", "/no/such/path"], "/no/such/path"),
    ],
)
def test_errors_are_one_clean_line(model_dir, env, args, message):
    result = llmasos(env, *[a.format(model=model_dir) for a in args])
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: ")


def open_chat(env, model, *flags, timeout=120):
    """`llmasos run MODEL` in a real terminal, at its first prompt."""
    chat = pexpect.spawn(LLMASOS[0], [*LLMASOS[1:], "run", model, *flags], env=env, timeout=timeout)
    chat.expect_exact(">>> ")
    return chat


def assert_leaves_cleanly(chat):
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_interactive_chat_keeps_history_and_leaves_cleanly(model_dir, env):
    chat = open_chat(env, model_dir, "--max-tokens", "6")
    chat.sendline("Hello")
    chat.expect_exact(">>> ")
    chat.sendintr()  # Ctrl-C at the prompt does not end the program
    chat.expect_exact("/bye")
    chat.sendline("How are you?")
    chat.expect_exact(">>> ")
    chat.sendline("/bye")
    assert_leaves_cleanly(chat)
    chat = open_chat(env, model_dir)
    chat.sendeof()  # Ctrl-D leaves too
    assert_leaves_cleanly(chat)


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_not_the_chat(smollm2_gguf, env):
    """With the real model (long answers): Ctrl-C mid-answer ends that answer, the chat goes on."""
    chat = open_chat(env, str(smollm2_gguf), "--max-tokens", "400", timeout=300)
    chat.sendline("Tell me a long story about a dragon.")
    chat.expect_exact("dragon.")  # the terminal's echo of the question
    chat.expect(r"\w+ \w+ \w+")  # the answer has started streaming
    chat.sendintr()
    chat.expect_exact("[stopped]")
    chat.expect_exact(">>> ")
    chat.sendline("What is the capital of France?")
    chat.expect_exact("Paris")
    chat.expect_exact(">>> ")
    chat.sendline("/bye")
    assert_leaves_cleanly(chat)


def test_help_and_list_start_without_torch_and_show_every_verb(env):
    """The verbs import what they need when they run: `llmasos --help` and `llmasos list` load
    neither torch nor transformers, and every verb module has registered its commands."""
    code = (
        "import sys\nfrom llmasos.cli import main\ncode = 0\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "sys.exit(code or ('torch' in sys.modules or 'transformers' in sys.modules) * 3)"
    )
    for args in (["--help"], ["list"], ["bench", "--help"]):
        result = subprocess.run(
            [sys.executable, "-c", code, *args], env={**env, "COLUMNS": "200"}, capture_output=True, text=True
        )
        assert result.returncode == 0, (args, result.returncode, result.stderr)
    verbs = "run pull import list show quantize rm verify serve ps eval explain task pretrain finetune dpo"
    listed = llmasos({**env, "COLUMNS": "200"}, "--help").stdout
    assert all(f" {verb} " in listed for verb in [*verbs.split(), "top", "bench", "keys"])
    bench = llmasos({**env, "COLUMNS": "200"}, "bench", "--help").stdout
    commands = ("serve", "guards", "kernels", "quality", "train", "data")
    assert all(f" {command} " in bench for command in commands)


def test_run_here_imports_only_what_an_answer_needs_and_exits_cleanly(model_dir, env):
    """`llmasos run` that answers in this process (no daemon at LLMASOS_HOST) loads neither the
    server (fastapi, uvicorn), nor transformers, nor httpx (the daemon probe is the standard
    library's), nor torch's extension builder once the kernels are built; its quick exit (no
    interpreter teardown) still runs atexit handlers and flushes the answer."""
    from llmasos.ops.kernels import kernels

    heavy = ["fastapi", "uvicorn", "starlette", "transformers", "httpx"]
    heavy += ["torch.utils.cpp_extension"] if kernels() is not None else []  # built: imported directly
    code = (
        f"import atexit, sys\nheavy = {heavy!r}\n"
        "atexit.register(lambda: print('loaded:', [m for m in heavy if m in sys.modules], file=sys.stderr))\n"
        "from llmasos.cli import main\nmain()"
    )
    env = {**env, "LLMASOS_HOST": "127.0.0.1:9"}  # a port where no daemon answers
    args = ["run", model_dir, "Hello", "--max-tokens", "4"]
    first = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    assert first.returncode == 0 and first.stdout.strip(), first.stderr  # may build the kernels
    again = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout and "loaded: []" in again.stderr, again.stderr
