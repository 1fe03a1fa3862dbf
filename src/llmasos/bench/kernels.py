"""`llmasos bench kernels`: the CPU block matmuls of one model, timed on their own.

For each row count (1: single-request decode; 16: C3's batch; more: a prompt chunk), every
quantized matrix of the model's layers and its output head runs through the integer kernel at
16- and 8-bit activations, in the best build this CPU runs (VNNI where it has it) and the AVX2 build, and, as
the peer in the same run, through BLAS on its rows dequantized to float32 (what the engine does above
`kernel_row_limit`). Figures: milliseconds for all the layers' matmuls (and the head's) of one step,
and multiply-accumulates a second.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from rich.console import Console
from rich.table import Table

from llmasos.bench.common import machine_facts
from llmasos.errors import LLMasOSError

BLAS = "BLAS float32"
ROW_COUNTS = (1, 16, 64)  # single-request decode, C3's batch, a prompt chunk


@dataclass
class KernelRow:
    rows: int
    part: str  # "layers" or "head"
    system: str
    seconds: float  # one step's matmuls of this part
    macs: int

    @property
    def gmacs(self) -> float:
        return self.macs / self.seconds / 1e9


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _one_step(ops, bits: int | None, inputs: list, shapes: list) -> None:
    """Every matrix of one part once, through the integer kernel at `bits` (None: BLAS on floats)."""
    import torch

    for x, (packed, qtype, in_features, out_features) in zip(inputs, shapes):
        if bits is None:
            torch.nn.functional.linear(x, ops.gguf_dequantize(packed, qtype, in_features, out_features))
        else:
            ops.gguf_linear(x, packed, qtype, in_features, out_features, bits)


def kernel_systems() -> dict[str, tuple[object, int | None]]:
    """Name -> (kernel build, activation bits or None for BLAS): the best build this CPU runs and,
    where that is a VNNI one, the AVX2 build beside it."""
    from llmasos.ops.kernels import build, supported_isas

    builds = {
        isa: build(isa) for isa in dict.fromkeys([*supported_isas()[:1], "avx2"]) if isa in supported_isas()
    }
    builds = {isa: ops for isa, ops in builds.items() if ops is not None}
    if not builds:
        raise LLMasOSError(
            "the CPU kernels are not built here (they need x86 AVX2 or ARM NEON with the dot product, "
            "and a C++ compiler)"
        )
    systems = {f"int{bits} {isa}": (ops, bits) for isa, ops in builds.items() for bits in (16, 8)}
    return systems | {BLAS: (next(iter(builds.values())), None)}


def run_kernel_bench(model: str, row_counts: Sequence[int] = ROW_COUNTS, repeats: int = 5) -> list[KernelRow]:
    """Every block matrix of `model` through each system at each row count: the best of `repeats`."""
    import torch

    from llmasos.api import LLM
    from llmasos.ops.quant import LAYOUTS, QuantLinear

    systems = kernel_systems()
    network = LLM(model, device="cpu").module
    parts: dict[str, list[QuantLinear]] = {"layers": [], "head": []}
    for module in network.modules():
        if isinstance(module, QuantLinear):
            parts["head" if module is network.lm_head else "layers"].append(module)
    if not parts["layers"]:
        raise LLMasOSError(f"{model} has no matrices in GGUF blocks; try a GGUF or `llmasos quantize` copy")
    results = []
    for rows in row_counts:
        for part, modules in parts.items():
            if not modules:
                continue
            inputs = [torch.randn(rows, m.in_features) for m in modules]
            shapes = [(m.packed, LAYOUTS[m.qtype][0], m.in_features, m.out_features) for m in modules]
            macs = rows * sum(m.in_features * m.out_features for m in modules)
            for system, (ops, bits) in systems.items():
                seconds = _best_seconds(partial(_one_step, ops, bits, inputs, shapes), repeats)
                results.append(KernelRow(rows, part, system, seconds, macs))
    return results


def print_kernel_table(results: list[KernelRow], model: str) -> None:
    """One table: per row count and part, each system's step time, rate, and ratio to BLAS."""
    facts = machine_facts()
    table = Table("rows", "matrices", "system", "one step", "GMAC/s", "vs BLAS",
                  title=f"llmasos bench kernels: {model}", caption="\n".join(facts.values()))  # fmt: skip
    blas = {(r.rows, r.part): r.seconds for r in results if r.system == BLAS}
    for r in results:
        table.add_row(str(r.rows), r.part, r.system, f"{r.seconds * 1e3:.2f} ms", f"{r.gmacs:.1f}",
                      f"{blas[r.rows, r.part] / r.seconds:.2f}x")  # fmt: skip
    Console(width=None if sys.stdout.isatty() else 160).print(table)
