"""`llmasos bench data` on a tiny corpus: every step of both systems in the table with its MB/s,
peak RSS and the LLMasOS / bare ratio, and both systems keeping the same rows (the same steps ran);
never the speed (the machine is shared)."""

import pytest
from typer.testing import CliRunner

from llmasos.bench.data import parse_size
from llmasos.cli import app
from llmasos.errors import LLMasOSError


@pytest.mark.slow
def test_bench_data_table_has_every_step_its_rss_and_the_ratio(tmp_path):
    out = tmp_path / "bench.md"
    result = CliRunner().invoke(
        app, ["bench", "data", "--size", "300KB", "--workdir", str(tmp_path / "work"), "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    rows = [line.strip("|").split("|") for line in lines if line.startswith("| 0.3 MB")]
    table = {(r[1].strip(), r[2].strip()): [c.strip() for c in r] for r in rows}
    assert set(table) == {("LLMasOS", "import"), ("LLMasOS", "prepare"), ("LLMasOS", "import+prepare"),
                          ("datatrove bare", "bare")}  # fmt: skip
    for key in [("LLMasOS", "import"), ("LLMasOS", "prepare"), ("datatrove bare", "bare")]:
        assert float(table[key][5]) > 0 and float(table[key][6].removesuffix(" MiB")) > 50, table[key]
    assert float(table[("LLMasOS", "import+prepare")][7].removesuffix("x")) > 0
    kept = table[("LLMasOS", "prepare")][3]
    assert kept == table[("datatrove bare", "bare")][3] and int(kept) < int(table[("LLMasOS", "import")][3])
    assert "recipe: gopher_quality, exact_dedup, near_dedup, scrub" in out.read_text()


def test_sizes_parse_and_bad_ones_say_how_to_write_them():
    assert parse_size("250MB") == 250_000_000 and parse_size("1gb") == 10**9 and parse_size("0.5 KB") == 500
    with pytest.raises(LLMasOSError, match="e.g. 250MB"):
        parse_size("250 megabytes")
