"""`llmasos bench quality`: what quantized execution costs in output quality (issue 4's CPU goal).

Perplexity of a held-out text (bench/data/heldout.txt: prose written for this benchmark, so in no
model's training data; or --data) under sliding windows, for the same model run several ways:
its weights in float32 (the reference), its own GGUF blocks when it has them, and the int8 (Q8_0)
and int4 (Q4_1) copies `llmasos quantize` makes (made on first use, kept in the store). The goal:
each within 2% of the float model's perplexity.

For a GGUF model the float reference is its blocks dequantized: the only float weights there are
offline. The block variants score the text in steps of at most MAX_KERNEL_ROWS tokens, so every
matmul runs in the integer kernel that decode uses, with its activations rounded to 16 bits (the
default) or 8 (`--activation-bits 8`, llama.cpp's): the figure is what decoding actually computes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmasos.bench.common import machine_facts, progress

HELDOUT = Path(__file__).with_name("data") / "heldout.txt"
GOAL_PERCENT = 2.0


@dataclass
class QualityRow:
    variant: str
    model: str
    weights: str  # what the matmuls ran on
    activations: str  # float32, or the integers the block kernel rounds them to
    perplexity: float
    num_tokens: int
    change_percent: float  # against the float reference

    @property
    def meets_goal(self) -> bool:
        return abs(self.change_percent) <= GOAL_PERCENT


def run_quality_bench(
    model: str = "smollm2",
    data: Path = HELDOUT,
    context: int = 512,
    stride: int = 256,
    targets: Sequence[str] = ("int8", "int4"),
    activation_bits: Sequence[int] = (16, 8),
) -> list[QualityRow]:
    """The float32 reference, then every block variant (the model's own blocks and the `targets`
    copies, made on first use) at each of `activation_bits`: perplexity on `data` and its change."""
    from llmasos.api import LLM
    from llmasos.eval.perplexity import perplexity
    from llmasos.eval.run import weight_quantization
    from llmasos.ops.quant import MAX_KERNEL_ROWS
    from llmasos.store import ModelStore
    from llmasos.train.quantize import quantize_model

    text = data.read_text(encoding="utf-8")
    store = ModelStore()
    blocks = [("native", model)]
    for to in targets:
        name = f"{model}-{to}"
        if name not in {m.name for m in store.list()}:
            progress.print(f"quantizing {model} to {to} as {name}")
            quantize_model(store, model, to, name)
        blocks.append((to, name))
    variants = [("float32", model, {"gguf_blocks": False})]
    for bits in activation_bits:  # chunks the integer kernel takes, as decode steps do
        kernel = {"max_num_batched_tokens": MAX_KERNEL_ROWS, "activation_bits": bits}
        variants += [(variant, name, kernel) for variant, name in blocks]
    rows: list[QualityRow] = []
    for variant, name, config in variants:
        progress.print(f"perplexity of {name} ({variant})")
        llm = LLM(name, max_model_len=context + 1, **config)
        result = perplexity(llm, text, context=context, stride=stride)
        weights = weight_quantization(llm.module)
        activations = f"int{config['activation_bits']}" if weights else "float32"
        reference = rows[0].perplexity if rows else result.perplexity
        change = 100 * (result.perplexity / reference - 1)
        rows.append(
            QualityRow(
                variant, name, weights or "float32", activations, result.perplexity, result.num_tokens, change
            )
        )
        del llm
    return rows


def report_quality(
    rows: list[QualityRow], model: str, data: Path, context: int, stride: int, output: Path | None = None
) -> None:
    """Print the rows as one table (and write them, with the machine's facts, as JSON to `output`)."""
    facts = machine_facts()
    title = f"llmasos bench quality: {model} on {data.name} ({rows[0].num_tokens} tokens, "
    title += f"window {context}, stride {stride})"
    table = Table("variant", "model", "weights", "activations", "perplexity", "vs float32",
                  f"within {GOAL_PERCENT:g}%", title=title, caption="\n".join(facts.values()))  # fmt: skip
    for row in rows:
        change, met = f"{row.change_percent:+.2f}%", "yes" if row.meets_goal else "NO"
        table.add_row(row.variant, row.model, row.weights, row.activations, f"{row.perplexity:.3f}",
                      change, met)  # fmt: skip
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    if output:
        output.write_text(json.dumps({"facts": facts, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
