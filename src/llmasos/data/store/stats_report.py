"""The stats of a dataset (stats.py) as Markdown plus one PNG of four panels: lengths, tokens,
languages, what each step removed. matplotlib's Figure is used without pyplot, so it renders with
Agg whatever the display (a server, CI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmasos.data.store.stats import DatasetStats, bucket_label


def write(stats: DatasetStats, folder: Path) -> Path:
    """Write <name>-stats.md and <name>-stats.png into `folder`; returns the Markdown's path."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = stats.manifest.name.replace("/", "--") + "-stats"
    picture = folder / f"{stem}.png"
    _plot(stats, picture)
    markdown = folder / f"{stem}.md"
    markdown.write_text(render(stats, picture.name), encoding="utf-8")
    return markdown


def render(stats: DatasetStats, picture: str) -> str:
    m = stats.manifest
    rows = max(1, m.rows)
    lines = [
        f"# Dataset {m.name}",
        "",
        f"- digest `{m.digest}`, {m.rows} rows, column `{stats.column}`",
        f"- {stats.total_chars} characters ({stats.total_chars / rows:.1f} a row), "
        f"{stats.total_tokens} {stats.token_unit} ({stats.total_tokens / rows:.1f} a row)",
    ]
    if stats.token_unit == "whitespace words":
        lines.append("- no tokenizer given: counts are whitespace words; pass `--tokenizer MODEL` for tokens")
    lines += [
        "",
        f"![stats]({picture})",
        "",
        "## Lengths",
        "",
        f"| length | rows (characters) | rows ({stats.token_unit}) |",
    ]
    lines.append("|---|---:|---:|")
    used = np.nonzero(stats.chars + stats.tokens)[0]
    for b in range(used.min(), used.max() + 1) if len(used) else []:
        lines.append(f"| {bucket_label(b)} | {stats.chars[b]} | {stats.tokens[b]} |")
    lines += ["", "## Languages", ""]
    if stats.languages is None:
        lines.append(
            "not measured: the dataset has no `language` column (a recipe's `language_id` step writes one)"
        )
    else:
        lines += [f"- {lang}: {n} ({100 * n / rows:.1f}%)" for lang, n in stats.languages.most_common()]
    clusters = stats.duplicate_clusters
    in_clusters = sum(size * n for size, n in clusters.items())
    lines += ["", "## Exact duplicates (case and whitespace aside)", ""]
    if clusters:
        lines.append(
            f"{sum(clusters.values())} clusters hold {in_clusters} rows; removing the copies would drop "
            f"{in_clusters - sum(clusters.values())} rows; the largest cluster has {max(clusters)} rows"
        )
    else:
        lines.append("none: every row is distinct")
    lines += ["", "## PII and secrets found", ""]
    if not stats.pii:
        lines.append("not measured: no recipe with a `scrub` step made this dataset or its ancestors")
    for dataset, found in stats.pii.items():
        lines.append(
            f"- by the recipe of {dataset}: " + ", ".join(f"{k} {v}" for k, v in found.most_common())
        )
    lines += ["", "## What each step removed", ""]
    if not stats.steps:
        lines.append("no recipe made this dataset or its ancestors (imported as is)")
    for dataset, steps in stats.steps.items():
        lines += [f"Recipe of {dataset}:", "", "| step | rows in | removed | why |", "|---|---:|---:|---|"]
        for step, counts in steps.items():
            removed = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("removed:")}
            why = ", ".join(f"{k} {v}" for k, v in removed.items())
            lines.append(f"| {step} | {counts.get('in', 0)} | {sum(removed.values())} | {why} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _plot(stats: DatasetStats, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 8), layout="constrained")
    (chars, tokens), (languages, steps) = figure.subplots(2, 2)
    for axes, counts, unit in ((chars, stats.chars, "characters"), (tokens, stats.tokens, stats.token_unit)):
        used = np.nonzero(counts)[0]
        span = range(used.min(), used.max() + 1) if len(used) else range(1)
        axes.bar([bucket_label(b) for b in span], [counts[b] for b in span])
        axes.set(title=f"rows by length in {unit}", xlabel=unit, ylabel="rows")
        axes.tick_params(axis="x", labelrotation=45)
    if stats.languages:
        top = stats.languages.most_common(12)
        languages.bar([k for k, _ in top], [v for _, v in top])
        languages.set(title="language mix", ylabel="rows")
    else:
        languages.text(0.5, 0.5, "language not measured", ha="center", va="center")
        languages.set_axis_off()
    several = len(stats.steps) > 1  # then a step is named with the dataset its recipe made
    removed = {
        f"{step} ({dataset})" if several else step: sum(
            v for k, v in counts.items() if k.startswith("removed:")
        )
        for dataset, report in stats.steps.items()
        for step, counts in report.items()
    }
    if removed:
        steps.barh(list(removed), list(removed.values()))
        steps.set(title="rows removed per step", xlabel="rows")
        steps.invert_yaxis()
    else:
        steps.text(0.5, 0.5, "no recipe: nothing removed", ha="center", va="center")
        steps.set_axis_off()
    figure.suptitle(f"{stats.manifest.name} ({stats.manifest.rows} rows, {stats.manifest.digest[:19]})")
    figure.savefig(path, dpi=80)
