"""LLMasOS as an lm-evaluation-harness model: custom tasks on local JSONL files run end to end through
lm_eval, and the scores lm_eval gets are the kernel's, which equal transformers' on the same weights."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llmasos import LLM, SamplingParams
from llmasos.errors import InvalidRequestError
from llmasos.eval.harness import LLMasOSLM, sampling_params
from llmasos.runtime import scoring

ENGINE = dict(device="cpu", max_model_len=48, num_kv_blocks=64, block_size=8)
MODEL_ARGS = ",".join(f"{key}={value}" for key, value in {"model": "tiny", **ENGINE}.items())
TASKS = ["tiny_mc", "tiny_gen", "tiny_ppl"]
UNTIL, MAX_GEN_TOKS = ["."], 6

MC_DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Rome", "a model"], "answer": 0},
    {"question": "The capital of Italy is", "choices": ["Paris", "Rome"], "answer": 1},
    {"question": "Hello, world! How are", "choices": ["you today?", "the capital"], "answer": 0},
    {"question": "", "choices": ["Once upon a time", "def add(a, b):"], "answer": 0},  # empty context
]
GEN_DOCS = [
    {"prompt": "Once upon a time", "target": " there was a small model."},
    {"prompt": "def add(a, b):\n", "target": "    return a + b"},
]
PPL_DOCS = [
    {"text": "Hello, world! How are you today?"},
    {"text": " ".join(["Once upon a time there was a small model that wanted to run on every machine."] * 5)},
]


def write_task(folder, name: str, docs: list[dict], **config) -> None:
    """A harness task on a local JSONL file: datasets' packaged `json` builder, so nothing is downloaded."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    dataset = {"data_files": {"test": str(data)}, "cache_dir": str(folder / "datasets-cache")}
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": dataset, "test_split": "test", **config}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_task(
        folder, "tiny_mc", MC_DOCS, output_type="multiple_choice", doc_to_text="{{question}}",
        doc_to_choice="choices", doc_to_target="answer",
        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}],
    )  # fmt: skip
    write_task(
        folder, "tiny_gen", GEN_DOCS, output_type="generate_until", doc_to_text="{{prompt}}",
        doc_to_target="{{target}}", metric_list=[{"metric": "exact_match"}],
        generation_kwargs={"until": UNTIL, "max_gen_toks": MAX_GEN_TOKS, "do_sample": False},
    )  # fmt: skip
    write_task(
        folder, "tiny_ppl", PPL_DOCS, output_type="loglikelihood_rolling", doc_to_text="",
        doc_to_target="{{text}}", metric_list=[{"metric": m} for m in ("word_perplexity", "bits_per_byte")],
    )  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def evaluation(store, task_dir):
    """One run of all three tasks, the model named as a user names it: `llmasos` and its model_args."""
    return simple_evaluate(
        model="llmasos", model_args=MODEL_ARGS, tasks=TASKS,
        task_manager=TaskManager(include_path=str(task_dir)), log_samples=True, bootstrap_iters=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def llm(store):
    return LLM("tiny", **ENGINE)


@pytest.fixture(scope="module")
def hf(store):
    """The same store folder read by transformers alone: its model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = store.path("tiny")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def hf_score(model, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    """Sum of log p(continuation | context) and whether each continuation token is the argmax."""
    tokens = context_ids + continuation_ids
    with torch.no_grad():
        logprobs = model(torch.tensor([tokens])).logits[0, :-1].log_softmax(-1)[-len(continuation_ids) :]
    targets = torch.tensor(continuation_ids)
    chosen = logprobs.gather(1, targets.unsqueeze(1)).sum().item()
    return chosen, bool((logprobs.argmax(-1) == targets).all())


def hf_loglikelihood(hf, context: str, continuation: str) -> tuple[float, bool]:
    """lm_eval's causal-model recipe, with transformers' tokenizer: trailing context spaces move to the
    continuation, the joined text is split where the context's tokens end, an empty context is BOS."""
    model, tokenizer = hf
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    if not stripped:
        return hf_score(model, [tokenizer.bos_token_id], encode(continuation))
    whole, context_ids = encode(stripped + continuation), encode(stripped)
    return hf_score(model, context_ids, whole[len(context_ids) :])


def hf_rolling(hf, text: str, max_seq_len: int) -> float:
    """lm_eval's own rolling windows (as its HF backend uses them), each scored by transformers."""
    model, tokenizer = hf
    windows = get_rolling_token_windows(
        token_list=tokenizer(text, add_special_tokens=False)["input_ids"],
        prefix_token=tokenizer.bos_token_id, max_seq_len=max_seq_len, context_len=1,
    )  # fmt: skip
    return sum(hf_score(model, *make_disjoint_window(window))[0] for window in windows)


def responses(evaluation, task: str) -> tuple[list, list]:
    """Per request of the task, in order: its arguments and lm_eval's response to it."""
    samples = sorted(evaluation["samples"][task], key=lambda s: s["doc_id"])
    arguments = [tuple(args) for s in samples for args in s["arguments"]]
    return arguments, [resp[0] for s in samples for resp in s["resps"]]


def test_multiple_choice_scores_are_the_kernels_and_equal_transformers(evaluation, llm, hf):
    metrics = evaluation["results"]["tiny_mc"]
    assert {"acc,none", "acc_norm,none"} <= set(metrics)
    pairs, got = responses(evaluation, "tiny_mc")
    assert len(pairs) == sum(len(doc["choices"]) for doc in MC_DOCS)
    assert ("", " Once upon a time") in pairs  # the empty context reached the backend as lm_eval sent it
    direct = scoring.loglikelihood(llm, pairs)
    for pair, (logprob, greedy), (kernel_logprob, kernel_greedy) in zip(pairs, got, direct):
        reference_logprob, reference_greedy = hf_loglikelihood(hf, *pair)
        assert logprob == pytest.approx(kernel_logprob, abs=1e-4) and greedy == kernel_greedy
        assert logprob == pytest.approx(reference_logprob, abs=1e-3) and greedy == reference_greedy
    # acc is the share of documents whose right answer got the highest loglikelihood
    at, correct = 0, 0
    for doc in MC_DOCS:
        scores = [logprob for logprob, _ in got[at : at + len(doc["choices"])]]
        correct += scores.index(max(scores)) == doc["answer"]
        at += len(doc["choices"])
    assert metrics["acc,none"] == pytest.approx(correct / len(MC_DOCS))


def test_generate_until_task_generates_greedily_through_the_engine(evaluation, llm):
    assert "exact_match,none" in evaluation["results"]["tiny_gen"]
    requests, got = responses(evaluation, "tiny_gen")
    assert [context for context, _ in requests] == [doc["prompt"] for doc in GEN_DOCS]
    params = SamplingParams(temperature=0, max_tokens=MAX_GEN_TOKS, stop=UNTIL)
    prompts = [llm.tokenizer.encode(doc["prompt"], add_special_tokens=False) for doc in GEN_DOCS]
    expected = [out.outputs[0] for out in llm.generate(prompts, params)]
    assert got == [out.text for out in expected]
    assert any(got) and all(len(out.token_ids) <= MAX_GEN_TOKS and "." not in out.text for out in expected)


def test_loglikelihood_rolling_task_equals_transformers_windows(evaluation, llm, hf):
    assert {"word_perplexity,none", "bits_per_byte,none"} <= set(evaluation["results"]["tiny_ppl"])
    requests, got = responses(evaluation, "tiny_ppl")
    texts = [text for (text,) in requests]
    assert texts == [doc["text"] for doc in PPL_DOCS]
    assert len(llm.tokenizer.encode(texts[1], add_special_tokens=False)) > 2 * ENGINE["max_model_len"]
    assert got == pytest.approx(scoring.loglikelihood_rolling(llm, texts), abs=1e-4)
    # the engine's window holds max_model_len - 1 prompt tokens (one more is sampled), which is
    # lm_eval's window of max_model_len - 2 inputs predicting one token past them
    reference = [hf_rolling(hf, text, ENGINE["max_model_len"] - 2) for text in texts]
    assert got == pytest.approx(reference, abs=1e-3)


def test_gen_kwargs_map_onto_sampling_params():
    greedy = sampling_params({"until": ["\n\n", "Q:"], "max_gen_toks": 7, "do_sample": False}, 256)
    assert (greedy.stop, greedy.max_tokens, greedy.temperature) == (["\n\n", "Q:"], 7, 0.0)
    default = sampling_params({"until": "\n"}, 256)  # no do_sample, no temperature: greedy, as in lm_eval
    assert (default.stop, default.max_tokens, default.temperature) == (["\n"], 256, 0.0)
    sampled = sampling_params({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 5}, 256)
    assert (sampled.temperature, sampled.top_p, sampled.max_tokens) == (0.7, 0.9, 5)
    with pytest.raises(InvalidRequestError, match="num_beams"):
        sampling_params({"until": ["\n"], "num_beams": 4}, 256)


def test_bad_model_args_are_clear_errors(store):
    with pytest.raises(InvalidRequestError, match="model=NAME"):
        LLMasOSLM.create_from_arg_string("max_model_len=64")
    with pytest.raises(InvalidRequestError, match="max_lenght"):
        LLMasOSLM.create_from_arg_string("model=tiny,max_lenght=64")
    with pytest.raises(InvalidRequestError, match="batch_size"):
        LLMasOSLM.create_from_arg_string("model=tiny", {"batch_size": "many"})


def test_model_args_win_over_lm_evals_own_settings(store):
    """lm_eval's CLI always passes batch_size and device; model_args given by the user win."""
    lm = LLMasOSLM.create_from_arg_string(f"{MODEL_ARGS},batch_size=3", {"batch_size": 1, "device": "cuda:0"})
    assert lm.llm.engine.config.max_num_seqs == 3
    assert lm.llm.engine.config.device == "cpu"
    request = Instance("generate_until", {}, ("Hello", {"until": ["."], "max_gen_toks": 48}), 0)
    with pytest.raises(InvalidRequestError, match="no room for the prompt"):
        lm.generate_until([request])
    request = Instance("generate_until", {}, ("Hello", {"until": ["."], "typical_p": 0.5}), 0)
    with pytest.raises(InvalidRequestError, match="typical_p"):
        lm.generate_until([request])


def harness_cli(*args: str) -> subprocess.CompletedProcess:
    """The user-facing command: `python -m llmasos.eval.harness` with lm_eval's own arguments."""
    command = [sys.executable, "-m", "llmasos.eval.harness", *args]
    return subprocess.run(command, env=dict(os.environ), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_command_runs_a_task_as_lm_eval_does(evaluation, task_dir, tmp_path):
    result = harness_cli(
        "--model", "llmasos", "--model_args", MODEL_ARGS, "--tasks", "tiny_mc",
        "--include_path", str(task_dir), "--batch_size", "auto", "--output_path", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (saved,) = tmp_path.rglob("results_*.json")
    metrics = json.loads(saved.read_text())["results"]["tiny_mc"]
    assert metrics["acc,none"] == pytest.approx(evaluation["results"]["tiny_mc"]["acc,none"])
    assert metrics["acc_norm,none"] == pytest.approx(evaluation["results"]["tiny_mc"]["acc_norm,none"])


@pytest.mark.slow
def test_the_command_reports_a_bad_model_arg_in_one_line(store, task_dir):
    result = harness_cli("--model", "llmasos", "--model_args", "dtype=float32", "--tasks", "tiny_mc",
                         "--include_path", str(task_dir))  # fmt: skip
    assert result.returncode == 1
    assert "Error: --model llmasos needs the model to evaluate" in result.stderr
    assert "Traceback" not in result.stderr


WITHOUT_LM_EVAL = """
import sys
from importlib.abc import MetaPathFinder

class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "lm_eval":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NotInstalled())
from llmasos.errors import LLMasOSError
try:
    import llmasos.eval.harness
except LLMasOSError as error:
    print(error)
"""


@pytest.mark.slow
def test_without_lm_eval_the_import_says_how_to_install_it():
    command = [sys.executable, "-c", WITHOUT_LM_EVAL]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pip install 'llmasos[eval]'" in result.stdout
