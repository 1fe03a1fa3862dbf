"""Sentence embeddings against transformers: a tiny random BertModel in a sentence-transformers folder,
pooled and normalized the way sentence-transformers does it, for texts of different lengths."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmasos.api import LLM
from llmasos.config import EngineConfig
from llmasos.errors import InvalidRequestError, UnsupportedModelError
from llmasos.models.loader import load_model
from llmasos.runtime import model_kind, open_model
from llmasos.runtime.embedder import SentenceEmbedder
from llmasos.store import ModelStore

from tiny import save_tiny_bert, save_tiny_model

TEXTS = [
    "Hello, world!",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "",
    "Once upon a time there was a small model that wanted to run on every machine. " * 3,  # > 48 tokens
    "def add(a, b): return a + b",
    "Ünïcödé ☃ and words the tokenizer never saw",
]
MAX_SEQ_LENGTH = 48  # save_tiny_bert's sentence_bert_config.json


def reference(folder: Path, texts: list[str], pooling: str, normalize: bool = True) -> torch.Tensor:
    """What sentence-transformers computes: transformers' tokenizer and BertModel, then its pooling."""
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_SEQ_LENGTH, return_tensors="pt")
    with torch.no_grad():
        hidden = BertModel.from_pretrained(folder).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    if pooling == "cls":
        vectors = hidden[:, 0]
    elif pooling == "max":
        vectors = hidden.masked_fill(mask == 0, -1e9).max(1).values
    elif pooling == "mean":
        vectors = (hidden * mask).sum(1) / mask.sum(1)
    elif pooling == "mean_sqrt_len":
        vectors = (hidden * mask).sum(1) / mask.sum(1).sqrt()
    elif pooling == "weightedmean":
        weights = mask * torch.arange(1, hidden.shape[1] + 1).float()[None, :, None]
        vectors = (hidden * weights).sum(1) / weights.sum(1)
    else:  # lasttoken
        vectors = hidden[torch.arange(len(texts)), batch["attention_mask"].sum(1) - 1]
    return torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def embedder(tiny_bert) -> SentenceEmbedder:
    return SentenceEmbedder.from_dir(tiny_bert, device="cpu")


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken"])
def test_matches_transformers_pooled_like_sentence_transformers(tmp_path, pooling):
    folder = save_tiny_bert(tmp_path, pooling=pooling, normalize=pooling != "max")
    result = SentenceEmbedder.from_dir(folder, device="cpu").embed_with_usage(TEXTS)
    expected = reference(folder, TEXTS, pooling, normalize=pooling != "max")
    torch.testing.assert_close(torch.tensor(result.vectors), expected, atol=1e-5, rtol=1e-5)


def test_tokens_as_transformers_truncated_with_cls_and_sep(tiny_bert, embedder):
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(tiny_bert)(TEXTS, truncation=True, max_length=MAX_SEQ_LENGTH)
    ids = [embedder._token_ids(text) for text in TEXTS]
    assert ids == expected["input_ids"]  # and not padded to 128, as the tokenizer.json would have it
    assert max(map(len, ids)) == MAX_SEQ_LENGTH and ids[3][-1] == ids[0][-1]  # the long text keeps [SEP]
    assert embedder.embed_with_usage(TEXTS).prompt_tokens == sum(map(len, ids))


def test_padding_and_batching_do_not_change_a_vector(embedder):
    alone = [embedder.embed_with_usage([text]).vectors[0] for text in TEXTS]
    embedder.batch_size = 2  # batches of two after sorting by length: order must come back intact
    try:
        batched = embedder.embed_with_usage(TEXTS).vectors
    finally:
        embedder.batch_size = 32
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), atol=1e-6, rtol=1e-6)
    assert embedder.dimension == len(alone[0]) == 64
    assert torch.tensor(alone).norm(dim=-1).sub(1).abs().max() < 1e-6


def test_token_ids_are_taken_as_given_and_checked(embedder):
    ids = embedder.tokenizer.encode(TEXTS[1])
    from_ids = embedder.embed_with_usage([ids, ids[:3]])
    assert from_ids.vectors[0] == embedder.embed_with_usage([TEXTS[1]]).vectors[0]
    assert from_ids.prompt_tokens == len(ids) + 3
    with pytest.raises(InvalidRequestError, match="more than this model's 48"):
        embedder.embed_with_usage([ids * 5])
    with pytest.raises(InvalidRequestError, match="outside this model's vocabulary"):
        embedder.embed_with_usage([[2, 10_000, 3]])
    with pytest.raises(InvalidRequestError, match="empty"):
        embedder.embed_with_usage([[]])
    assert embedder.embed_with_usage([]).vectors == []


def test_folder_without_the_recipe_gets_mean_pooling_normalized(tiny_bert, embedder, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(tiny_bert, folder)
    (folder / "modules.json").unlink()
    shutil.rmtree(folder / "1_Pooling")
    assert model_kind(folder) == "encoder"  # by its architecture alone
    plain = SentenceEmbedder.from_dir(folder, device="cpu")
    assert plain.max_length == MAX_SEQ_LENGTH
    assert plain.embed_with_usage(TEXTS).vectors == embedder.embed_with_usage(TEXTS).vectors


def test_masked_lm_checkpoint_with_tensorflow_names(tiny_bert, embedder, tmp_path):
    """BertForMaskedLM-style names ("bert." prefix, an MLM head) and TensorFlow's LayerNorm gamma/beta."""
    folder = tmp_path / "mlm"
    shutil.copytree(tiny_bert, folder)
    weights = load_file(folder / "model.safetensors")
    renamed = {}
    for name, tensor in weights.items():
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        renamed[f"bert.{name}"] = tensor
    renamed["cls.predictions.bias"] = torch.zeros(embedder.model.config.vocab_size)
    renamed["bert.embeddings.position_ids"] = torch.arange(64)[None]
    save_file(renamed, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    assert (
        SentenceEmbedder.from_dir(folder, device="cpu").embed_with_usage(TEXTS).vectors
        == embedder.embed_with_usage(TEXTS).vectors
    )

    save_file({**renamed, "bert.encoder.layer.0.attention.self.rotary.weight": torch.zeros(2)},
              folder / "model.safetensors")  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="unexpected weight 'bert.encoder.layer.0.attention.self"):
        SentenceEmbedder.from_dir(folder, device="cpu")
    del renamed["bert.encoder.layer.1.output.dense.bias"]
    save_file(renamed, folder / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="lacks 1 weights"):
        SentenceEmbedder.from_dir(folder, device="cpu")


def test_import_into_the_store_and_load_by_name(tiny_bert, embedder, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    store = ModelStore()
    store.import_path(tiny_bert, "tiny-bert", progress=False)
    shown = store.show("tiny-bert")
    parameters = sum(t.numel() for t in load_file(tiny_bert / "model.safetensors").values())
    assert (shown["architecture"], shown["parameters"], shown["context_length"]) == ("bert", parameters, 64)
    folder = store.resolve("tiny-bert")
    assert model_kind(folder) == "encoder"
    short = TEXTS[:3]  # within every length limit: see the next test
    assert (
        SentenceEmbedder.from_dir(folder, device="cpu").embed_with_usage(short).vectors
        == embedder.embed_with_usage(short).vectors
    )
    # the one switch opens a BERT encoder on SentenceEmbedder, for LLM and the server alike
    opened = open_model("tiny-bert", EngineConfig(device="cpu"))
    assert isinstance(opened, SentenceEmbedder) and (opened.kind, opened.name) == ("encoder", "tiny-bert")
    assert opened.embed(short) == embedder.embed_with_usage(short).vectors
    llm = LLM("tiny-bert", device="cpu")
    assert llm.kind == "encoder" and isinstance(llm.backend, SentenceEmbedder)
    assert llm.embed(short) == embedder.embed_with_usage(short).vectors
    for call, args in (("generate", (["Hi"],)), ("classify", (["Hi"],)), ("loglikelihood", ([("a", "b")],))):
        with pytest.raises(InvalidRequestError, match=f"{call}\\(\\) needs a model .* is an embedding model"):
            getattr(opened, call)(*args)


def test_store_keeps_the_sentence_transformers_recipe(tmp_path, monkeypatch):
    folder = save_tiny_bert(tmp_path / "cls-bert", pooling="cls")
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    store = ModelStore()
    store.import_path(folder, "cls-bert", progress=False)
    stored = SentenceEmbedder.from_dir(store.resolve("cls-bert"), device="cpu")
    assert (
        stored.embed_with_usage(TEXTS).vectors
        == SentenceEmbedder.from_dir(folder, device="cpu").embed_with_usage(TEXTS).vectors
    )


def test_a_text_generator_is_not_an_embedding_model(tiny_bert, tmp_path):
    llama = save_tiny_model(tmp_path / "llama", "llama")
    assert model_kind(llama) == "decoder"
    with pytest.raises(UnsupportedModelError, match="runs on the paged engine, not on the embedder one"):
        SentenceEmbedder.from_dir(llama)
    with pytest.raises(UnsupportedModelError, match="BertModel is an embedding model"):
        load_model(tiny_bert, torch.device("cpu"), torch.float32)  # what the kernel would do with it


def test_sentence_transformers_modules_we_do_not_run_are_refused(tiny_bert, tmp_path):
    folder = tmp_path / "dense"
    shutil.copytree(tiny_bert, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(
        2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    )
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedModelError, match="Dense"):
        SentenceEmbedder.from_dir(folder)
