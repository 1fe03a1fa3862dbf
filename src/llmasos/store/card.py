"""Model cards: what a stored model is, where it came from, how it was made, how it scored and
what it cannot do. `llmasos show NAME --card` prints one.

A card is assembled when asked, from what the store already holds, so it cannot drift from the model:
- the manifest: name, source, format, file digests, facts;
- the model's own files: README.md front matter (`license:`, `language:`) as Hugging Face cards
  have it, GGUF metadata (`general.license`, `general.languages`), and the `model_card.json` that
  `llmasos pretrain`, `finetune` and `dpo` write (base model, data digest, method, final figures;
  for a store dataset its digest, sources and recipe, from llmasos.data's manifest);
- card data beside the manifest, `$LLMASOS_HOME/cards/<name>.json`, for what arrives after import:
  evaluation results (`record_eval`, called by `llmasos eval`) and limits a user writes by hand:

      {"limits": ["answers in English only"],
       "evaluations": {"sha256:<model digest>": [{"task": ..., "kind": ..., "metrics": {...},
                        "num_examples": ..., "signature": {...}, "recorded": "<ISO 8601>"}]}}

Results are keyed by the model's digest, so a different model imported under the same name does not
inherit them (the same bytes imported again under that name, while the card data stays, get them
back). The file is changed under the
store's lock and replaced atomically, like a manifest; `llmasos rm` deletes it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from llmasos.errors import ModelNotFoundError, StoreError
from llmasos.store.catalog import CATALOG
from llmasos.store.sources import _safetensors_header
from llmasos.store.store import _NAME_RE, Manifest, ModelStore, _write_atomically

# Perplexity added by each llama.cpp quantization on Llama-3-8B, as llama.cpp's `llama-quantize` lists
# them (tools/quantize/quantize.cpp). No library ships these figures; they are the ones GGUF users
# already compare quantizations by.
QUALITY_LOSS = {
    "Q2_K": 3.5199, "Q2_K_S": 3.1836, "Q3_K_S": 1.6321, "Q3_K_M": 0.6569, "Q3_K_L": 0.5562,
    "Q4_0": 0.4685, "Q4_1": 0.4511, "Q4_K_S": 0.2689, "Q4_K_M": 0.1754, "Q5_0": 0.1316,
    "Q5_1": 0.1062, "Q5_K_S": 0.1049, "Q5_K_M": 0.0569, "Q6_K": 0.0217, "Q8_0": 0.0026,
}  # fmt: skip
_FLOATS = ("F32", "F16", "BF16")  # GGUF file types that are not quantized
# What the training toolchain's model_card.json holds besides method, base and data: model facts at
# its top level; final figures at the top level (pretrain) or under "results" (finetune, dpo).
_TRAINING_FACTS = ("tokenizer", "parameters", "trainable_parameters")
_TRAINING_RESULTS = ("steps", "tokens", "train_loss", "eval_loss", "eval_perplexity", "seconds")
_DATA_KEYS = ("limits", "evaluations")


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation of the model: the headline figures and the signature that reproduces them."""

    task: str
    kind: str
    metrics: dict[str, float]
    num_examples: int
    signature: dict  # EvalSignature's fields
    recorded: str  # ISO 8601, UTC

    @classmethod
    def from_dict(cls, data: object) -> EvalRecord:
        if not isinstance(data, dict):
            raise ValueError("an evaluation is not a JSON object")
        record = cls(**data)
        if not isinstance(record.metrics, dict) or not all(
            isinstance(value, int | float) for value in record.metrics.values()
        ):
            raise ValueError(f"the metrics of the '{record.task}' evaluation are not numbers")
        if not isinstance(record.signature, dict):
            raise ValueError(f"the signature of the '{record.task}' evaluation is not a JSON object")
        return record


class SupportsRecord(Protocol):
    def to_record(self) -> EvalRecord: ...


@dataclass
class CardData:
    """What `$LLMASOS_HOME/cards/<name>.json` holds."""

    limits: list[str] = field(default_factory=list)
    evaluations: dict[str, list[EvalRecord]] = field(default_factory=dict)  # model digest -> records

    @classmethod
    def from_dict(cls, data: object) -> CardData:
        if not isinstance(data, dict):
            raise ValueError("it is not a JSON object")
        unknown = sorted(set(data) - set(_DATA_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}; the keys are {', '.join(_DATA_KEYS)}")
        limits = data.get("limits", [])
        if not isinstance(limits, list) or not all(isinstance(limit, str) for limit in limits):
            raise ValueError("'limits' is not a list of strings")
        evaluations = data.get("evaluations", {})
        if not isinstance(evaluations, dict) or not all(isinstance(v, list) for v in evaluations.values()):
            raise ValueError("'evaluations' is not an object of lists by model digest")
        return cls(
            limits=limits,
            evaluations={
                digest: [EvalRecord.from_dict(record) for record in records]
                for digest, records in evaluations.items()
            },
        )


@dataclass
class ModelCard:
    """What `llmasos show NAME --card` prints (`render_card`), and as JSON with `--json`."""

    name: str
    digest: str
    source: str
    upstream: str | None  # where a catalog model comes from upstream
    format: str
    created: str
    license: str  # an SPDX-like id as Hugging Face cards write it ("apache-2.0"), or "unknown"
    license_from: str  # where the licence was read, so a reader can check it
    languages: list[str]
    facts: dict
    files: dict[str, dict]  # relpath -> {"digest": "sha256:<hex>", "size": int}
    training: dict | None  # the model's model_card.json, as the training toolchain wrote it
    evaluations: list[EvalRecord]
    limits: list[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict) -> ModelCard:
        """The card as `to_json` wrote it (the server's /api/show sends it so)."""
        return cls(**{**data, "evaluations": [EvalRecord.from_dict(r) for r in data["evaluations"]]})


def build_card(store: ModelStore, name: str) -> ModelCard:
    """The card of a model in the store."""
    manifest = store.get(name)
    folder = store.path(name)
    training = _training(folder)
    declared, languages = _declared(manifest, folder)
    license, license_from = _license(store, declared, training)
    data = read_card_data(store, name)
    entry = CATALOG.get(manifest.source.removeprefix("catalog:"))
    return ModelCard(
        name=manifest.name,
        digest=manifest.digest,
        source=manifest.source,
        upstream=f"{entry.hf_repo} ({entry.description}), from PyPI {entry.requirement}" if entry else None,
        format=manifest.format,
        created=manifest.created,
        license=license,
        license_from=license_from,
        languages=languages,
        facts=manifest.facts,
        files=manifest.files,
        training=training,
        evaluations=data.evaluations.get(manifest.digest, []),
        limits=_limits(manifest, folder, training, languages) + data.limits,
    )


def record_eval(store: ModelStore, model_name: str, report: SupportsRecord) -> bool:
    """Add an evaluation's headline figures to the model's card; a run with the same signature
    replaces the earlier one (same model, task and settings: the same measurement). `report` is an
    evaluation report (llmasos.eval.EvalReport), which makes its own plain record: the store stays
    below the evaluation and knows only the record.

    Returns False, recording nothing, when `model_name` is not a model in the store: a folder or
    .gguf evaluated in place has no card. A report of other bytes than the stored model's is refused.
    """
    if not (_NAME_RE.fullmatch(model_name) and (store.manifests / f"{model_name}.json").is_file()):
        return False
    record = report.to_record()
    with store.lock():
        digest = store.get(model_name).digest  # read under the lock: a re-import changes it
        if record.signature["model_digest"] != digest:
            raise StoreError(
                f"this {record.task} report is of model {record.signature['model_digest'][:19]}, but "
                f"'{model_name}' in the store is now {digest[:19]}; evaluate '{model_name}' again"
            )
        data = read_card_data(store, model_name)
        kept = [r for r in data.evaluations.get(digest, []) if r.signature != record.signature]
        data.evaluations[digest] = [*kept, record]
        path = card_data_path(store, model_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(asdict(data), indent=2, ensure_ascii=False) + "\n"
        _write_atomically(path, text, store.tmp)
    return True


def card_data_path(store: ModelStore, name: str) -> Path:
    return store.home / "cards" / f"{name}.json"


def read_card_data(store: ModelStore, name: str) -> CardData:
    """The model's card data; empty when none was written yet."""
    path = card_data_path(store, name)
    if not path.is_file():
        return CardData()
    try:
        return CardData.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise StoreError(
            f"the card data of '{name}' ({path}) is damaged ({e}); fix it by hand, or delete the file "
            "to lose its hand-written limits and recorded evaluations"
        ) from e


def render_card(card: ModelCard) -> str:
    """The card as Markdown, in the sections of a Hugging Face model card. Lists rather than tables:
    a terminal wraps a long digest or path in a list item, while a table cell would cut it short."""
    facts = card.facts
    params = facts.get("parameter_count")
    details = [
        ("license", f"{card.license} ({card.license_from})"),
        ("source", f"`{card.source}`"),
        *[("upstream", card.upstream)] * bool(card.upstream),
        ("format", card.format),
        ("architecture", facts.get("architecture")),
        ("parameters", f"{params / 1e6:.1f}M" if params else "unknown"),
        ("weights", facts.get("quantization") or facts.get("dtype")),
        ("context length", facts.get("context_length") or "unknown"),
        ("chat template", "yes" if facts.get("has_chat_template") else "no"),
        ("languages", ", ".join(card.languages) or "unknown"),
        ("digest", f"`{card.digest}`"),
        ("added", card.created),
    ]
    files = [(f"`{rel}`", f"`{f['digest']}` ({f['size']} bytes)") for rel, f in sorted(card.files.items())]
    lines = [f"# {card.name}", "", "## Model details", "", *_bullets(details)]
    lines += ["", "## Files", "", *_bullets(files)]
    lines += ["", "## Training", "", *_training_section(card.training)]
    lines += ["", "## Evaluation", "", *_evaluation_section(card)]
    lines += ["", "## Limitations", "", *[f"- {limit}" for limit in card.limits]]
    return "\n".join(lines) + "\n"


def _training_section(training: dict | None) -> list[str]:
    if training is None:
        return ["No training record: this model was not made by `llmasos pretrain`, `finetune` or `dpo`."]
    results, base, data = _results(training), training.get("base_model"), training.get("data") or {}
    rows = [
        ("method", training.get("method")),
        ("base model", f"{base.get('name')} (`{base.get('digest')}`)" if base else "none (from scratch)"),
        ("data", ", ".join(f"`{path}`" for path in data.get("files") or [data.get("path")])),
        ("data digest", f"`{data.get('digest')}`"),
    ]
    for dataset in [data["dataset"]] if data.get("dataset") else data.get("datasets") or []:
        rows += _dataset_rows(dataset)
    rows += [(key.replace("_", " "), training[key]) for key in _TRAINING_FACTS if key in training]
    rows += [(key.replace("_", " "), results[key]) for key in _TRAINING_RESULTS if key in results]
    rows.append(("date", training.get("created") or training.get("date")))
    lines = _bullets(rows)
    hyperparameters = training.get("hyperparameters") or {}
    if hyperparameters:
        lines += ["", "### Training hyperparameters", "", *_bullets(hyperparameters.items())]
    return lines


def _dataset_rows(dataset: dict) -> list[tuple[str, str]]:
    """A store dataset the model was trained on (llmasos.data): its digest and lineage."""
    recipe = dataset.get("recipe") or {}
    rows = [("dataset", f"{dataset.get('name')} (`{dataset.get('digest')}`, {dataset.get('rows')} rows)")]
    rows += [
        ("dataset source", f"{s.get('source')} (`{s.get('digest')}`)") for s in dataset.get("sources") or []
    ]
    if recipe:
        steps = "; ".join(recipe.get("steps") or [])
        rows.append(("dataset recipe", f"{recipe.get('path')} (`{recipe.get('digest')}`): {steps}"))
    return rows


def _evaluation_section(card: ModelCard) -> list[str]:
    if not card.evaluations:
        return [f"No evaluation recorded: run `llmasos eval {card.name} --task FILE`."]
    lines = []
    for record in card.evaluations:
        signature = record.signature
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in record.metrics.items())
        lines += [
            f"- **{record.task}** ({record.kind}, {record.num_examples} examples): {metrics}",
            f"  - signature: {signature.get('shots')} shots, template `{signature.get('prompt_template')}`, "
            f"{signature.get('dtype')}, quantization {signature.get('quantization')}, "
            f"seed {signature.get('seed')}, task `{signature.get('task_digest')}`, "
            f"llmasos {signature.get('llmasos_version')}; recorded {record.recorded}",
        ]
    return lines


def _bullets(rows) -> list[str]:
    return [f"- **{key}**: {value}" for key, value in rows]


def _limits(manifest: Manifest, folder: Path, training: dict | None, languages: list[str]) -> list[str]:
    """What a user should know before relying on the model, derived from what is known of it."""
    context = manifest.facts.get("context_length")
    if context:
        limits = [f"context window: {context} tokens, prompt and answer together"]
    else:
        limits = ["context window unknown: the config gives no max_position_embeddings"]
    quantization, by = manifest.facts.get("quantization"), "its GGUF file"
    if quantization is None and "gguf_blocks.safetensors" in manifest.files:
        quantization = _block_layout(folder / "gguf_blocks.safetensors")
        by = "`llmasos quantize` (the CPU kernel runs these blocks, a GPU the float weights)"
    if quantization and quantization not in _FLOATS:
        loss = QUALITY_LOSS.get(quantization)
        figure = "no published figure of its quality loss"
        if loss is not None:
            figure = f"llama.cpp measures +{loss:.4f} perplexity on Llama-3-8B; small models lose more"
        limits.append(f"weights quantized to {quantization} by {by}: {figure}")
    if training is not None:
        results = _results(training)
        if results.get("steps") == 0:
            limits.append("untrained: its weights are random, so its output is noise")
        elif training.get("method") == "pretrain":
            limits.append(f"pretrained from scratch on {results.get('tokens')} tokens: it knows only those")
    if "adapter_config.json" in manifest.files:
        base = (training or {}).get("base_model") or {}
        limits.append(f"a LoRA adapter: it runs only on its base model {base.get('name', '')}".rstrip())
    limits.append("no safety tuning known: put the server's guards in front of untrusted users")
    if not languages:
        limits.append("languages unknown: neither its README.md nor its GGUF metadata names them")
    return limits


def _declared(manifest: Manifest, folder: Path) -> tuple[tuple[str, str] | None, list[str]]:
    """((licence, where it was read) or None, languages) as the model's own files declare them:
    README.md front matter first (the model author's card), then GGUF metadata."""
    readme = _readme_metadata(folder)
    gguf = _gguf_metadata(manifest.name, folder) if "model.gguf" in manifest.files else {}
    license = None
    if readme.get("license"):
        other = readme.get("license_name") if readme["license"] == "other" else None
        license = str(other or readme["license"]), "README.md front matter"
    elif gguf.get("general.license"):
        license = str(gguf["general.license"]), "GGUF metadata general.license"
    languages = readme.get("language") or gguf.get("general.languages") or []
    return license, [languages] if isinstance(languages, str) else [str(lang) for lang in languages]


def _license(store: ModelStore, declared: tuple[str, str] | None, training: dict | None) -> tuple[str, str]:
    """The declared licence; without one, a tuned model's base's, found by digest so that another
    model stored under the base's name is not taken for it."""
    if declared:
        return declared
    base = (training or {}).get("base_model") or {}
    name = str(base.get("name"))
    if base.get("digest") and _NAME_RE.fullmatch(name):
        try:
            manifest, folder = store.get(name), store.path(name)
        except (ModelNotFoundError, StoreError):  # the base is gone or broken: its licence is unknown
            manifest = None
        if manifest is not None and manifest.digest == base["digest"]:
            inherited = _license(store, _declared(manifest, folder)[0], _training(folder))
            if inherited[0] != "unknown":
                return inherited[0], f"of its base model {name}"
    return "unknown", "no README.md license, GGUF general.license or base model with one"


def _results(training: dict) -> dict:
    """pretrain writes its final figures at the top level, finetune and dpo under "results"."""
    return training.get("results") or training


def _readme_metadata(folder: Path) -> dict:
    """The YAML front matter of a Hugging Face README.md; empty without one."""
    from huggingface_hub.repocard import metadata_load

    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    try:
        return metadata_load(readme) or {}
    except Exception as e:  # yaml's errors, a block that is not a mapping, undecodable bytes
        raise StoreError(
            f"{readme} has unreadable front matter ({e}); fix the model's README.md and import it again"
        ) from e


def _gguf_metadata(name: str, folder: Path) -> dict:
    """The GGUF key-value metadata without the tensors: transformers' reader (gguf-py's walks
    every vocabulary string), with the languages array decoded."""
    from transformers.integrations.gguf import read_gguf_metadata

    try:
        metadata, _ = read_gguf_metadata(str(folder / "model.gguf"), string_arrays=("general.languages",))
    except Exception as e:  # struct.error, UnicodeDecodeError, ValueError: a damaged header
        raise StoreError(f"model.gguf of '{name}' is unreadable ({e}); run `llmasos verify {name}`") from e
    return metadata


def _training(folder: Path) -> dict | None:
    """The model_card.json the training toolchain wrote into the model; None for other models."""
    path = folder / "model_card.json"
    if not path.is_file():
        return None
    try:
        training = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise StoreError(f"{path} is not JSON ({e}); train or import the model again") from e
    if not isinstance(training, dict):
        raise StoreError(f"{path} is not a JSON object; train or import the model again")
    return training


def _block_layout(path: Path) -> str:
    """The commonest layout among the blocks `llmasos quantize` wrote (their header's metadata)."""
    layouts = list(_safetensors_header(path).get("__metadata__", {}).values())
    return max(set(layouts), key=layouts.count) if layouts else "unknown"
