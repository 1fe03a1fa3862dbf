"""The transformers engine against transformers itself: tiny random T5, BART, BERT (with a 3-label
classification head) and RoBERTa folders, saved with `save_pretrained`, loaded from the folder and
from the store, and run through generate, loglikelihood, classify and embed."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from llmasos.config import EngineConfig
from llmasos.errors import InvalidRequestError, UnsupportedModelError
from llmasos.runtime import Backend, model_kind, open_model
from llmasos.runtime.embedder import SentenceEmbedder
from llmasos.runtime.transformers_engine import TransformersEngine
from llmasos.sampling_params import SamplingParams
from llmasos.store import ModelStore

from tiny import CORPUS, save_tiny_model
from tiny_families import LABELS, SAVERS

PROMPTS = ["Hello, world!", "The capital of France is", "def add(a, b):\n    return a + b", "Once"]
GREEDY = SamplingParams(temperature=0, max_tokens=10)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return {name: save(tmp_path_factory.mktemp(name)) for name, save in SAVERS.items()}


@pytest.fixture(scope="module")
def store(tmp_path_factory, folders):
    """A store of its own holding every folder under its family's name."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMASOS_HOME", str(tmp_path_factory.mktemp("home")))
        for name, folder in folders.items():
            ModelStore().import_path(folder, name, progress=False)
        yield ModelStore()


@pytest.fixture(scope="module")
def engines(folders, store):
    """`load(family, source)`: a family's transformers engine, from its folder or the store, loaded once."""
    loaded = {}

    def load(family: str, source: str = "folder") -> TransformersEngine:
        if (family, source) not in loaded:
            path = folders[family] if source == "folder" else store.resolve(family)
            loaded[family, source] = TransformersEngine(path, device="cpu", batch_size=2)
        return loaded[family, source]

    return load


def hf_model(folder: Path, family: str):
    import transformers

    auto = {
        "t5": transformers.AutoModelForSeq2SeqLM,
        "bart": transformers.AutoModelForSeq2SeqLM,
        "bert-classifier": transformers.AutoModelForSequenceClassification,
    }.get(family, transformers.AutoModel)
    return auto.from_pretrained(folder).eval(), transformers.AutoTokenizer.from_pretrained(folder)


def test_model_kind(folders, tmp_path):
    kinds = {family: model_kind(folder) for family, folder in folders.items()}
    assert kinds == {"t5": "seq2seq", "bart": "seq2seq", "bert-classifier": "classifier", "bert": "encoder",
                     "roberta": "encoder"}  # fmt: skip
    assert model_kind(save_tiny_model(tmp_path / "llama", "llama")) == "decoder"
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps({"model_type": "bert", "id2label": LABELS}))
    assert model_kind(tmp_path / "bare") == "classifier"  # no architecture: id2label names the head
    (tmp_path / "phi").mkdir()
    (tmp_path / "phi" / "config.json").write_text(json.dumps({"architectures": ["PhiForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="PhiForCausalLM generates text but has no native driver"):
        model_kind(tmp_path / "phi")


@pytest.mark.parametrize("source", ["folder", "store"])
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_generate_is_transformers_greedy(folders, engines, family, source):
    model, tokenizer = hf_model(folders[family], family)
    outputs = engines(family, source).generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outputs):
        inputs = tokenizer(prompt, return_tensors="pt")
        # BART's config forces EOS at the length limit; the engine asks for exactly what SamplingParams says
        expected = model.generate(**inputs, do_sample=False, max_new_tokens=10, forced_eos_token_id=None)
        completion = out.outputs[0]
        assert completion.token_ids == expected[0, 1:].tolist()
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        prompt_tokens, completion_tokens = len(out.prompt_token_ids), len(completion.token_ids)
        assert out.usage == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
        assert completion.finish_reason == (
            "length" if model.config.eos_token_id not in completion.token_ids else "stop"
        )


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_batched_equals_one_by_one(engines, family):
    engine = engines(family)
    short = SamplingParams(temperature=0, max_tokens=4)
    with_logprobs = SamplingParams(temperature=0, max_tokens=10, logprobs=2)
    twice = SamplingParams(temperature=0, max_tokens=10, n=2)
    params = [GREEDY, short, with_logprobs, twice, short]
    prompts = PROMPTS + ["The capital of Italy is Rome."]
    batched = engine.generate(prompts, params)  # two groups, in batches of 2 with padding
    for prompt, sp, out in zip(prompts, params, batched):
        alone = engine.generate([prompt], sp)[0]
        assert out.prompt == prompt and len(out.outputs) == sp.n
        for got, expected in zip(out.outputs, alone.outputs, strict=True):
            assert (got.index, got.text, got.token_ids, got.finish_reason) == (
                expected.index, expected.text, expected.token_ids, expected.finish_reason
            )  # fmt: skip
            for got_lp, expected_lp in zip(got.logprobs or [], expected.logprobs or [], strict=True):
                assert got_lp == pytest.approx(expected_lp, abs=1e-5)
    assert batched[2].outputs[0].logprobs and batched[0].outputs[0].logprobs is None
    assert len({tuple(out.outputs[0].token_ids) for out in batched}) >= 4  # rows mixed up would show


def test_stop_strings_and_max_tokens(engines):
    engine = engines("t5")
    full = engine.generate(["Hello, world!"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    text, ids = full[0].outputs[0].text, full[0].outputs[0].token_ids
    stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if text[i : i + 2].isalnum())
    at = text.find(stop)

    for include in (False, True):
        params = SamplingParams(
            temperature=0, max_tokens=16, ignore_eos=True, stop=[stop], include_stop_str_in_output=include
        )
        out = engine.generate(["Hello, world!"], params)[0].outputs[0]
        assert (out.finish_reason, out.stop_reason) == ("stop", stop)
        assert out.text == text[: at + len(stop) * include]
        k = len(out.token_ids)  # up to the token that completed the stop string, as the engine keeps them
        assert (
            out.token_ids == ids[:k]
            and stop in engine.tokenizer.decode(ids[:k])
            and stop not in engine.tokenizer.decode(ids[: k - 1])
        )

    short = engine.generate(["Hello, world!"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert short[0].outputs[0].finish_reason == "length" and short[0].outputs[0].token_ids == ids[:3]


def test_eos_and_stop_tokens(engines, folders, tmp_path):
    """A copy of the T5 whose EOS is a token it generates (the first new one from the third on): EOS
    ends the output (in the ids, not the text), ignore_eos runs on; a stop token id ends it with that
    id as the reason."""
    engine = engines("t5")
    prompt, params = "The capital of France is", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ids = engine.generate([prompt], params)[0].outputs[0].token_ids
    j = next(j for j in range(2, len(ids)) if ids[j] not in ids[:j])
    moved = shutil.copytree(folders["t5"], tmp_path / "t5-eos")
    for name in ("config.json", "generation_config.json"):
        config = json.loads((moved / name).read_text())
        (moved / name).write_text(json.dumps({**config, "eos_token_id": ids[j]}))
    eos_engine = TransformersEngine(moved, device="cpu")
    decode = engine.tokenizer.decode

    out = eos_engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert (out.finish_reason, out.stop_reason, out.token_ids) == ("stop", None, ids[: j + 1])
    assert out.text == decode(ids[:j], skip_special_tokens=True)
    out = eos_engine.generate([prompt], params)[0].outputs[0]
    assert (out.finish_reason, out.token_ids) == ("length", ids)

    for include in (False, True):
        stop_params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[ids[j]],
                                     include_stop_str_in_output=include)  # fmt: skip
        out = engine.generate([prompt], stop_params)[0].outputs[0]
        assert (out.finish_reason, out.stop_reason, out.token_ids) == ("stop", ids[j], ids[: j + 1])
        assert out.text == decode(ids[: j + include], skip_special_tokens=True)


def test_logprobs_are_the_raw_model_distribution(folders, engines):
    model, tokenizer = hf_model(folders["t5"], "t5")
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3)
    completion = engines("t5").generate(["Hello, world!"], params)[0].outputs[0]
    ids = completion.token_ids
    decoder_input = torch.tensor([[model.config.decoder_start_token_id, *ids[:-1]]])
    with torch.no_grad():
        logits = model(
            **tokenizer("Hello, world!", return_tensors="pt"), decoder_input_ids=decoder_input
        ).logits
    expected = logits[0].log_softmax(-1)
    for i, (token, entry) in enumerate(zip(ids, completion.logprobs)):
        top = expected[i].topk(3)
        assert set(entry) == {token, *top.indices.tolist()}  # greedy: the chosen token is the top one
        assert entry[token] == pytest.approx(expected[i, token].item(), abs=1e-4)
    assert completion.cumulative_logprob == pytest.approx(sum(e[t] for e, t in zip(completion.logprobs, ids)))
    assert engines("t5").generate(["Hello, world!"], GREEDY)[0].outputs[0].logprobs is None


def test_sampling_seeds_and_n(engines):
    engine = engines("t5")
    seeded = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=7, n=3, max_tokens=8, ignore_eos=True)
    first = engine.generate(["Once"], seeded)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1  # n samples, not one copied
    assert first.usage["completion_tokens"] == sum(len(c.token_ids) for c in first.outputs) == 24
    others = [
        SamplingParams(temperature=1.0, max_tokens=8, n=2),
        SamplingParams(temperature=0.8, seed=1, max_tokens=5),
    ]
    in_batch = engine.generate(["Hello", "Once", "The capital"], [others[0], seeded, others[1]])
    for out in (engine.generate(["Once"], seeded)[0], in_batch[1]):  # same seed, same outputs, whatever
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in first.outputs]
    assert [len(out.outputs) for out in in_batch] == [2, 3, 1]


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_loglikelihood_is_the_model_loss(folders, engines, family):
    model, tokenizer = hf_model(folders[family], family)
    pairs = [
        ("Hello, world!", "How are you?"),
        ("The capital of France is", " Paris"),
        ("Once", "upon a time there was"),
    ]
    results = engines(family).loglikelihood(pairs)  # batches of 2, padded on both sides
    for (source, target), (logprob, greedy) in zip(pairs, results):
        labels = tokenizer(text_target=target, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model(**tokenizer(source, return_tensors="pt"), labels=labels)
        assert logprob == pytest.approx(-out.loss.item() * labels.shape[1], rel=1e-4)
        assert greedy == bool((out.logits.argmax(-1) == labels).all())


@pytest.mark.parametrize("source", ["folder", "store"])
def test_classify_is_softmax_of_the_logits(folders, engines, source):
    model, tokenizer = hf_model(folders["bert-classifier"], "bert-classifier")
    texts = CORPUS + ["Paris", "and words the tokenizer never saw " * 20]  # the last is cut to 64 positions
    results = engines("bert-classifier", source).classify(texts)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits.softmax(-1)
    assert all(list(r) == list(LABELS.values()) for r in results)
    torch.testing.assert_close(
        torch.tensor([list(r.values()) for r in results]), expected, atol=1e-5, rtol=1e-5
    )
    assert all(sum(r.values()) == pytest.approx(1.0) for r in results)


def test_multi_label_classifier_uses_sigmoids(folders, tmp_path):
    folder = shutil.copytree(folders["bert-classifier"], tmp_path / "multi")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    model, tokenizer = hf_model(folder, "bert-classifier")
    with torch.no_grad():
        expected = model(**tokenizer(CORPUS, padding=True, return_tensors="pt")).logits.sigmoid()
    results = TransformersEngine(folder, device="cpu").classify(CORPUS)
    torch.testing.assert_close(
        torch.tensor([list(r.values()) for r in results]), expected, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("source", ["folder", "store"])
def test_bert_embeds_on_its_one_path(folders, store, source):
    """A BERT encoder has a native driver, so it embeds with SentenceEmbedder only: open_model picks it,
    and this engine refuses the folder. The vectors are transformers' BertModel, mean-pooled and
    normalized as the folder's recipe says."""
    path = folders["bert"] if source == "folder" else store.resolve("bert")
    opened = open_model(str(path) if source == "folder" else "bert", EngineConfig(device="cpu"))
    assert isinstance(opened, SentenceEmbedder) and opened.kind == "encoder"
    model, tokenizer = hf_model(folders["bert"], "bert")
    batch = tokenizer(CORPUS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(torch.tensor(opened.embed(CORPUS)), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(UnsupportedModelError, match="encoder model that runs on the embedder engine, not on"):
        TransformersEngine(path, device="cpu")


def test_open_model_picks_the_engine_of_each_kind(folders, store):
    for family, kind in (("t5", "seq2seq"), ("bart", "seq2seq"), ("bert-classifier", "classifier"),
                         ("roberta", "encoder")):  # fmt: skip
        opened = open_model(family, EngineConfig(device="cpu", max_num_seqs=3))
        assert isinstance(opened, TransformersEngine) and isinstance(opened, Backend)
        assert (opened.kind, opened.name, opened.batch_size, opened.dtype) == (kind, family, 3, torch.float32)
    assert open_model("bert-classifier").labels == tuple(LABELS[i] for i in range(len(LABELS)))


def test_embed_roberta_is_normalized_mean_pooling(folders, engines):
    model, tokenizer = hf_model(folders["roberta"], "roberta")
    texts = CORPUS + ["Paris"]
    vectors = torch.tensor(engines("roberta").embed(texts))
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(vectors, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(len(texts)))


def test_wrong_kind_calls_say_what_to_use(engines):
    with pytest.raises(
        InvalidRequestError,
        match=r"generate\(\) needs a seq2seq model.*classifier model: it labels text: use classify\(\)",
    ):
        engines("bert-classifier").generate(["Hello"])
    with pytest.raises(InvalidRequestError, match=r"it generates text from text: use generate\(\)"):
        engines("t5").embed(["Hello"])
    with pytest.raises(InvalidRequestError, match=r"classify\(\) needs a classifier model.*use embed\(\)"):
        engines("roberta").classify(["Hello"])
    with pytest.raises(InvalidRequestError, match=r"loglikelihood\(\) needs a seq2seq model"):
        engines("roberta").loglikelihood([("Hello", "world")])


def test_bad_requests_and_folders_are_clear_errors(engines, folders, tmp_path):
    bart = engines("bart", "store")  # named "bart" in the messages
    with pytest.raises(InvalidRequestError, match="repetition_penalty=1.2 is not supported"):
        bart.generate(["Hello"], SamplingParams(repetition_penalty=1.2))
    with pytest.raises(InvalidRequestError, match="2 prompts but 1 SamplingParams"):
        bart.generate(["Hello", "world"], [GREEDY])
    long_prompt = " ".join(CORPUS * 3)
    with pytest.raises(
        InvalidRequestError, match="more than the 64 positions of bart; shorten it or set trunc"
    ):
        bart.generate([long_prompt], GREEDY)
    with pytest.raises(
        InvalidRequestError, match="max_tokens asks for 100 tokens, more than the 64 positions"
    ):
        bart.generate(["Hello"], SamplingParams(max_tokens=100))
    cut = bart.generate([long_prompt], SamplingParams(temperature=0, max_tokens=4, truncate_prompt_tokens=20))
    assert cut[0].prompt_token_ids == bart.tokenizer(long_prompt)["input_ids"][-20:]

    with pytest.raises(UnsupportedModelError, match="decoder model that runs on the paged engine, not on"):
        TransformersEngine(save_tiny_model(tmp_path / "llama", "llama"), device="cpu")
    # a classifier's config over a plain encoder's weights: its head would be random
    headless = shutil.copytree(folders["bert"], tmp_path / "headless")
    config = json.loads((headless / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    (headless / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedModelError, match="lacks 2 weights that BertForSequenceClassification needs"
    ):
        TransformersEngine(headless, device="cpu")


def test_states_what_it_lacks_once_on_load(folders, caplog):
    with caplog.at_level(logging.INFO, logger="llmasos"):
        engine = TransformersEngine(folders["roberta"], device="cpu")
        engine.embed(["Hello"])
    notes = [r.getMessage() for r in caplog.records if "transformers engine" in r.getMessage()]
    lacks = "paged KV cache, continuous batching, prefix caching"
    expected = f"{folders['roberta'].name} (encoder) runs on the transformers engine, without {lacks}"
    assert notes == [f"{expected}; requests are batched per call"]
    assert engine.lacks == ("paged KV cache", "continuous batching", "prefix caching")
