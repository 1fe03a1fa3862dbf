"""`llmasos bench agents`: N agents x M turns with tool latency, under the kernel's agent policies.

Each agent is an `llmasos.agents.Agent` on one in-process AsyncLLM: a distinct user message, then a
tool call every turn but the last (the tool sleeps `tool_latency_s` in a thread and returns a
deterministic text), so the agents' turns interleave as real agent programs do. The model's replies
are not parsed for calls (a 135M model does not call tools reliably): a script decides, so every
configuration runs the same programs. The same workload runs on each engine configuration:

- baseline: FCFS, no context preservation (a finished turn's blocks are cached until evicted);
- the agent policies: LAS, and the context pinned (or swapped to CPU memory under pressure).

The swap space is sized for every agent's context (`swap_blocks`; by default as many blocks per agent
as the KV cache has, the most one context can take): a swap space no larger than the KV cache, the
engine's default, holds the contexts of only as many agents as the cache does, so swapped blocks are
dropped before their agent is back.

Figures: program completion time p50/p99 (an agent's first turn queued to its last turn done),
agent throughput (programs a minute), prefill tokens computed and *recomputed* per turn (prompt
tokens the previous turn had already computed, but that the kernel computed again).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from llmasos.agents import Agent, AgentRun
from llmasos.bench.common import machine_facts, progress
from llmasos.outputs import ToolCall
from llmasos.sampling_params import SamplingParams

CONFIGS = {
    "baseline": {"scheduling_policy": "fcfs", "context_policy": "none"},
    "pin+las": {"scheduling_policy": "las", "context_policy": "pin"},
    "swap+las": {"scheduling_policy": "las", "context_policy": "swap"},
}
WORDS = "river stone cloud market engine garden letter window signal harbor copper meadow lantern".split()


@dataclass
class AgentBenchRow:
    config: str
    programs: int
    wall_s: float
    p50_s: float
    p99_s: float
    prefill_per_turn: float  # prompt tokens computed per turn (not served by the prefix cache)
    recomputed_per_turn: float  # of those, tokens the agent's previous turn had computed already
    preemptions: int

    @property
    def throughput(self) -> float:
        """Agent programs completed a minute."""
        return 60 * self.programs / self.wall_s


def recomputed(run: AgentRun) -> list[int]:
    """Per turn after the first: prompt tokens that the previous turn had computed (its prompt and its
    output, all but the last token) and that were computed again, i.e. not served from the cache."""
    out = []
    for before, turn in zip(run.turns, run.turns[1:]):
        kept = min(before.prompt_tokens + before.output_tokens - 1, turn.prompt_tokens)
        out.append(max(kept - turn.cached_tokens, 0))
    return out


def _scripted(num_turns: int):
    """Calls the tool on every turn but the last, whatever the model wrote."""
    turns = []

    def parse(text: str) -> list[ToolCall]:
        turns.append(text)
        return (
            [ToolCall(f"c{len(turns)}", "lookup", json.dumps({"query": f"q{len(turns)}"}))]
            if len(turns) < num_turns
            else []
        )

    return parse


async def _run_agents(
    llm, num_agents: int, num_turns: int, tool_latency_s: float, tool_words: int, prompt_words: int,
    output_len: int, seed: int,
) -> tuple[list[AgentRun], list[float]]:  # fmt: skip
    rng = random.Random(seed)

    def lookup(query: str) -> str:
        """Look a query up."""
        time.sleep(tool_latency_s)
        words = random.Random(query).choices(WORDS, k=tool_words)
        return f"Results for {query}: " + " ".join(words)

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    agents = [
        Agent(llm, [lookup], "Use the tools.", name=f"agent{i}", params=params, parse=_scripted(num_turns))
        for i in range(num_agents)
    ]
    questions = [" ".join(rng.choices(WORDS, k=prompt_words)) for _ in agents]

    async def timed(agent: Agent, question: str) -> tuple[AgentRun, float]:
        start = time.monotonic()
        run = await agent.arun(question)
        return run, time.monotonic() - start

    results = await asyncio.gather(*(timed(a, q) for a, q in zip(agents, questions)))
    return [r for r, _ in results], [t for _, t in results]


def run_agent_bench(
    model: str = "smollm2",
    num_agents: int = 8,
    num_turns: int = 4,
    tool_latency_s: float = 0.5,
    tool_words: int = 40,
    prompt_words: int = 150,
    output_len: int = 16,
    num_kv_blocks: int = 96,
    configs: list[str] | None = None,
    seed: int = 0,
    swap_blocks: int | None = None,
) -> list[AgentBenchRow]:
    """One row per configuration, each on a fresh engine with the same KV cache (num_kv_blocks, so
    that the agents' contexts do not all fit and something must give). `swap_blocks`: the CPU blocks
    of "swap" (None: num_agents x num_kv_blocks, room for every agent's context)."""
    from llmasos.api import AsyncLLM

    swap_blocks = num_agents * num_kv_blocks if swap_blocks is None else swap_blocks
    rows = []
    for name in configs or list(CONFIGS):
        progress.print(f"[bold]agents[/]: {name} ({num_agents} agents x {num_turns} turns)")
        llm = AsyncLLM(model, num_kv_blocks=num_kv_blocks, swap_blocks=swap_blocks, **CONFIGS[name])
        try:
            start = time.monotonic()
            runs, times = asyncio.run(
                _run_agents(
                    llm, num_agents, num_turns, tool_latency_s, tool_words, prompt_words, output_len, seed
                )
            )
            wall = time.monotonic() - start
            stats = llm.stats
        finally:
            llm.shutdown()
        turns = [t for r in runs for t in r.turns]
        redone = [n for r in runs for n in recomputed(r)]
        rows.append(
            AgentBenchRow(
                config=name,
                programs=len(runs),
                wall_s=wall,
                p50_s=statistics.median(times),
                p99_s=_percentile(times, 0.99),
                prefill_per_turn=sum(t.prompt_tokens - t.cached_tokens for t in turns) / len(turns),
                recomputed_per_turn=sum(redone) / max(len(turns) - len(runs), 1),
                preemptions=stats.num_preemptions,
            )
        )
    return rows


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def format_agent_table(rows: list[AgentBenchRow], output: Path | None = None) -> str:
    """The table (printed) with each row's gain over the baseline; Markdown to `output` if given."""
    from rich.console import Console
    from rich.table import Table

    base = rows[0]
    header = ["config", "programs/min", "x base", "p50 s", "p99 s", "prefill tok/turn", "recomputed tok/turn",
              "x fewer", "preemptions"]  # fmt: skip
    lines = []
    for r in rows:
        fewer = base.recomputed_per_turn / r.recomputed_per_turn if r.recomputed_per_turn else float("inf")
        lines.append(
            [r.config, f"{r.throughput:.1f}", f"{r.throughput / base.throughput:.2f}", f"{r.p50_s:.1f}",
             f"{r.p99_s:.1f}", f"{r.prefill_per_turn:.0f}", f"{r.recomputed_per_turn:.0f}",
             "-" if r is base else f"{fewer:.1f}", str(r.preemptions)]
        )  # fmt: skip
    table = Table(*header, box=None)
    for line in lines:
        table.add_row(*line)
    Console().print(table)
    facts = machine_facts()
    markdown = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(line) + " |" for line in lines]
        + ["", "; ".join(f"{k}: {v}" for k, v in facts.items())]
    )
    if output is not None:
        output.write_text(markdown + "\n")
    return markdown
