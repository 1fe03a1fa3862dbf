"""`llmasos bench agents` on the tiny model: every program completes under each configuration, and
the figures add up (a kept context recomputes nothing beyond the last partial block)."""

import pytest

from llmasos.agents import AgentRun, TurnRecord
from llmasos.bench.agents import format_agent_table, recomputed, run_agent_bench

from tiny import save_tiny_model, widen_context


def test_recomputed_counts_the_previous_turns_tokens_computed_again():
    turns = [TurnRecord(40, 0, 8, "", []), TurnRecord(60, 44, 8, "", []), TurnRecord(80, 20, 8, "", [])]
    assert recomputed(AgentRun("", [], turns)) == [47 - 44, 67 - 20]


@pytest.mark.slow
def test_the_bench_runs_every_configuration(tmp_path):
    path = widen_context(save_tiny_model(tmp_path / "tiny", "llama"))
    rows = run_agent_bench(
        str(path), num_agents=2, num_turns=2, tool_latency_s=0, tool_words=5, prompt_words=5, output_len=4,
        num_kv_blocks=256,
    )  # fmt: skip
    assert [r.config for r in rows] == ["baseline", "pin+las", "swap+las"]
    assert all(r.programs == 2 and r.prefill_per_turn > 0 for r in rows)
    assert all(r.recomputed_per_turn < 16 for r in rows[1:]), "only the last partial block is computed again"
    markdown = format_agent_table(rows, tmp_path / "agents.md")
    assert (tmp_path / "agents.md").read_text().strip() == markdown and "swap+las" in markdown
