"""GGUF -> a model folder that keeps the GGUF: the format every driver in LLMasOS loads.

A GGUF file carries config, tokenizer and (usually quantized) weights as llama.cpp metadata. We
read it once, at pull/import time, into `config.json`, `generation_config.json`, `tokenizer.json`,
`tokenizer_config.json` and `gguf_tensors.json`, and keep the GGUF itself as `model.gguf`: the
weights stay in it, and loading reads them from it by their Hugging Face names
(`store/gguf_tensors.py`), so loading never needs transformers and the store holds the weights once.

The meaning of the metadata is taken from transformers' own GGUF support, so a converted folder
loads what `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` would have built (the tests
check this tensor by tensor). Two of its steps are slow on a large vocabulary, and we avoid them:
- gguf-py's `GGUFReader` walks every vocabulary string through numpy (~9 s for 49k tokens), and
  the legacy loader would parse the file with it three times (config, tokenizer, tensors). We
  parse the config once that way and read the tensor table with transformers' fast reader, then
  record the very same name/permutation mapping.
- `AutoTokenizer` re-parses the config just to choose the tokenizer class; we choose it the same way
  from the config we already have.

Models imported before this kept a dequantized float32 `model.safetensors` and the repacked
`gguf_blocks.safetensors` instead; those folders still load (pull or import them again to store
them in a tenth of the space).
"""

import tempfile
from pathlib import Path

from llmasos.errors import StoreError, UnsupportedModelError

# GGUF `general.architecture` values with a driver in LLMasOS. Mistral files say "llama".
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gpt2")
# Matrices in a GGUF block layout as `llmasos quantize` writes them (and GGUF imports of old did):
# {hf_name: uint8 [rows, bytes]}, layouts in metadata.
GGUF_BLOCKS_FILE = "gguf_blocks.safetensors"


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict:
    """Write the model folder of `gguf_path` into `out_dir`; return facts for `show`.

    The GGUF is copied in as `model.gguf` unless it is that file already. Only `out_dir` is written
    (a scratch folder is used and removed); the caller makes it atomic.
    """
    # Imported here, not at module level: transformers costs seconds to import, and the CLI imports
    # the store (and so this module) on every start, while conversion happens once per model.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from llmasos.store.gguf_tensors import parameter_count, place_gguf, write_table

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    metadata, header = _read_header(gguf_path)
    architecture = metadata["general.architecture"]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gguf_path.name} is a GGUF of architecture {architecture!r}, which LLMasOS has no driver for "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}). Use a model of a supported architecture, "
            "or import its Hugging Face safetensors folder instead."
        )

    # A folder holding only the GGUF, so that nothing lying next to the user's file (a stray
    # tokenizer_config.json) changes what transformers builds, and any file name works.
    with tempfile.TemporaryDirectory(prefix="llmasos-gguf-") as scratch:
        link = Path(scratch) / "model.gguf"
        link.symlink_to(gguf_path.resolve())
        config = AutoConfig.from_pretrained(scratch, gguf_file=link.name)
        tokenizer = _load_tokenizer(scratch, link.name, config)

    with torch.device("meta"):  # only its parameter names are needed, so no memory is spent
        model = AutoModelForCausalLM.from_config(config)
    entries = _tensor_table(header, architecture, config, model)

    # What `model.save_pretrained` would record: which class to build, in which dtype (the floats
    # that loading dequantizes to).
    config.architectures = [type(model).__name__]
    config.dtype = torch.float32
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, where every reader looks.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    _finish_tokenizer_config(out_dir / "tokenizer_config.json", tokenizer)
    place_gguf(gguf_path, out_dir)
    write_table(out_dir, entries)

    return {
        "architecture": config.model_type,
        "quantization": _quantization_name(metadata, header),
        "context_length": getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None),
        "parameter_count": parameter_count(out_dir),
        "has_chat_template": bool(tokenizer.chat_template),
    }


def _read_header(gguf_path: Path):
    """`(metadata, GgufHeader)`, with a user-facing error for anything that is not a readable GGUF."""
    from transformers.integrations.gguf import GgufHeader, read_gguf_metadata

    fix = "Download it again, or check that the path points at a .gguf model file."
    try:
        with open(gguf_path, "rb") as f:
            magic = f.read(4)
    except OSError as error:
        raise StoreError(f"Cannot read {gguf_path}: {error.strerror}. {fix}") from error
    if magic != b"GGUF":
        raise StoreError(f"{gguf_path.name} is not a GGUF file (it does not start with 'GGUF'). {fix}")

    try:
        metadata, _ = read_gguf_metadata(str(gguf_path))
    except Exception as error:  # struct.error, UnicodeDecodeError, ValueError: all mean a damaged header
        raise StoreError(f"{gguf_path.name} has an unreadable GGUF header ({error}). {fix}") from error
    try:
        header = GgufHeader.from_file(str(gguf_path))
    except (
        ValueError
    ) as error:  # the only one raised for a readable header: a tensor type with no dequantizer
        raise UnsupportedModelError(
            f"{gguf_path.name} uses a quantization LLMasOS cannot read ({error}). "
            "Pick a Q4_0, Q4_1, Q8_0, K-quant (e.g. Q4_K_M) or F16 file of the same model."
        ) from error
    end = max((header.data_start + info.offset + info.nbytes for info in header.tensors), default=0)
    if end > gguf_path.stat().st_size:
        raise StoreError(
            f"{gguf_path.name} is truncated: its tensors need {end} bytes, the file has "
            f"{gguf_path.stat().st_size}. {fix}"
        )
    return metadata, header


def _load_tokenizer(folder: str, filename: str, config):
    """The tokenizer `AutoTokenizer.from_pretrained(folder, gguf_file=filename)` returns.

    For a folder holding nothing but the GGUF, AutoTokenizer picks the class registered for the
    config's type, falling back to `TokenizersBackend` (also for Mistral's, which needs a
    tekken.json a GGUF lacks) -- after parsing the whole file again to rebuild that config.
    """
    from transformers import TokenizersBackend
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    tokenizer_class = TOKENIZER_MAPPING.get(type(config), TokenizersBackend)
    if tokenizer_class is None or tokenizer_class.__name__ == "MistralCommonBackend":
        tokenizer_class = TokenizersBackend
    return tokenizer_class.from_pretrained(folder, gguf_file=filename)


def _finish_tokenizer_config(path: Path, tokenizer) -> None:
    """State add_bos_token/add_eos_token, and drop what only described our scratch folder.

    transformers bakes the BOS/EOS choice into tokenizer.json's post-processor and leaves it out of
    tokenizer_config.json; readers that look for the flag there (llama.cpp style) should find it.
    """
    import json

    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path"):
        config.pop(key, None)
    config["add_bos_token"] = bool(tokenizer.add_bos_token)
    config["add_eos_token"] = bool(tokenizer.add_eos_token)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _tensor_table(header, architecture: str, config, model) -> list:
    """A `TensorEntry` per tensor the model uses: where its bytes are, and how transformers' legacy
    loader (`load_gguf_checkpoint`) would reshape it after dequantizing.

    The architecture's processor undoes llama.cpp's layout changes (the Q/K row permutation for llama,
    the Conv1D transpose for gpt2) and may rename (gpt2's `output.weight`). It is run here on an index
    column per tensor, so loading can apply the same change to blocks or floats without transformers;
    a change that is neither of those two is refused rather than guessed.
    """
    import numpy as np
    from gguf import GGMLQuantizationType
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    from llmasos.store.gguf_tensors import TensorEntry

    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    hf_names = _gguf_to_hf_names(architecture, config, model, processor)
    entries = []
    for info in header.tensors:
        rows = np.arange(info.shape[0], dtype=np.float64)  # an index column, for a matrix
        rows = rows[:, None] if len(info.shape) > 1 else rows
        parsed = {"tensors": {}}  # gpt2's processor stores `lm_head.weight` in here itself
        result = processor.process(
            weights=rows, name=info.name, tensor_key_mapping=hf_names, parsed_parameters=parsed
        )
        if result.name in hf_names:
            name, moved = hf_names[result.name], result.weights
        elif parsed["tensors"]:
            ((name, moved),) = parsed["tensors"].items()
            moved = moved.numpy()
        else:
            continue
        transform, heads = _transform(info.name, rows, np.asarray(moved), config)
        entries.append(
            TensorEntry(
                name=name,
                gguf_name=info.name,
                type=GGMLQuantizationType(info.ggml_type).name,
                shape=tuple(int(d) for d in info.shape),
                offset=header.data_start + info.offset,
                nbytes=info.nbytes,
                transform=transform,
                heads=heads,
            )
        )
    return entries


def _transform(gguf_name: str, rows, moved, config) -> tuple[str | None, int | None]:
    """Which change the processor made to an index column: none, a transpose, or Llama's per-head
    row interleaving undone (with the head count it used)."""
    import numpy as np

    from llmasos.store.gguf_tensors import TensorEntry

    if moved.shape == rows.shape and np.array_equal(moved, rows):
        return None, None
    if rows.ndim == 2 and moved.shape == rows.T.shape:
        return "transpose", None
    for heads in {config.num_attention_heads, getattr(config, "num_key_value_heads", None)} - {None}:
        if len(rows) % (2 * heads) == 0 and moved.shape == rows.shape:
            order = TensorEntry("", "", "", (len(rows),), 0, 0, "unpermute", heads).row_order().numpy()
            if np.array_equal(moved.reshape(-1), order.astype(np.float64)):
                return "unpermute", heads
    raise UnsupportedModelError(
        f"transformers changes the layout of {gguf_name} in a way LLMasOS cannot apply at load time; "
        "import the model's Hugging Face safetensors folder instead"
    )


def _gguf_to_hf_names(architecture: str, config, model, processor) -> dict[str, str]:
    """`{gguf_name: hf_name}`, e.g. `blk.0.attn_q.weight` -> `model.layers.0.self_attn.q_proj.weight`.

    The top-level pass of transformers' `get_gguf_hf_weights_map`. That function then repeats the
    pass for every submodule (for models converted from a base class, like Bloom), which costs ~8 s
    on a 30-layer model and adds nothing for the decoder-only families we support.
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next(key for key, name in MODEL_ARCH_NAMES.items() if name == architecture)
    name_map = get_tensor_name_map(arch, config.num_hidden_layers)
    mapping = {}
    for hf_name in model.state_dict():
        module_name, _, suffix = processor.preprocess_name(hf_name).rpartition(".")
        if (gguf_name := name_map.get_name(module_name)) is not None:
            mapping[f"{gguf_name}.{suffix}"] = hf_name
    return mapping


def _quantization_name(metadata: dict, header) -> str:
    """ "Q4_1", "F16", ...: llama.cpp's file type, else the commonest type among the weight matrices."""
    from gguf import GGMLQuantizationType, LlamaFileType

    try:
        return LlamaFileType(metadata["general.file_type"]).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (KeyError, ValueError):
        types = [info.ggml_type for info in header.tensors if len(info.shape) == 2]
        return GGMLQuantizationType(max(set(types), key=types.count)).name if types else "unknown"


def tensor_types(gguf_path: Path) -> str:
    """What a GGUF's weights are stored as, by part: "Q4_1 (layers), Q8_0 (embeddings), F32 (norms)".

    One file type ("Q4_1") hides that llama.cpp keeps some tensors in other types (embeddings in Q8_0,
    norms in F32, Q4_K_M's mix of Q4_K and Q6_K), which decides quality and size. Types come in order
    of how many weights they hold. gguf-py's reader maps the file and reads only the tensor infos.
    """
    from gguf import GGUFReader

    weights: dict[str, int] = {}
    parts: dict[str, list[str]] = {}
    for tensor in GGUFReader(gguf_path).tensors:
        kind = tensor.tensor_type.name
        weights[kind] = weights.get(kind, 0) + int(tensor.n_elements)
        part = _part(tensor.name)
        if part not in parts.setdefault(kind, []):
            parts[kind].append(part)
    order = sorted(weights, key=weights.__getitem__, reverse=True)
    return ", ".join(f"{kind} ({', '.join(sorted(parts[kind]))})" for kind in order)


def _part(gguf_name: str) -> str:
    """The part of the model a tensor belongs to, from llama.cpp's tensor names (`blk.3.attn_q.weight`)."""
    if "norm" in gguf_name:
        return "norms"
    if gguf_name.endswith(".bias"):
        return "biases"
    if gguf_name.startswith(("token_embd", "position_embd", "token_types")):
        return "embeddings"
    if gguf_name.startswith("output"):
        return "output"
    return "layers" if gguf_name.startswith("blk.") else gguf_name.removesuffix(".weight")
