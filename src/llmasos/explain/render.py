"""An Explanation for people: a self-contained HTML page and a PNG heat map of the attributions.

The page has no external assets (inline CSS, no scripts, no links), so it can be mailed or opened
offline, and every piece of model or user text in it is escaped: a token may be `<script>`.
Tokens are colored by surprisal and by attribution; hovering one shows its numbers and the top
alternatives (a `title` tooltip, which needs no script).
"""

from __future__ import annotations

import html
import io
from pathlib import Path

from llmasos.explain.trace import Explanation, TokenStat

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.tokens { font-family: ui-monospace, monospace; line-height: 2.2; white-space: pre-wrap; }
.tok { padding: 2px 1px; border-radius: 3px; }
.target { outline: 2px solid #222; }
.output { border-bottom: 2px solid #888; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; }
"""

_GAP_NOTES = {  # shown when the attributions miss f(input) - f(baseline) by more than 1%
    "integrated_gradients": "the gap is over 1% of the change: raise steps, or use the pad baseline",
    "gradient_x_input": "gradient x input is a one-step estimate: integrated gradients add up",
}


def visible(text: str) -> str:
    """Token text with whitespace and control characters made visible."""
    text = text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    return "".join(ch if ch.isprintable() or ch == " " else f"\\x{ord(ch):02x}" for ch in text)


def to_html(explanation: Explanation) -> str:
    attribution = explanation.attribution
    target_token = explanation.output_tokens[attribution.target]
    tokens = explanation.prompt_tokens + explanation.output_tokens
    num_prompt = len(explanation.prompt_tokens)
    most_bits = max([t.surprisal_bits for t in tokens if t.surprisal_bits is not None] + [1.0])
    surprisal_row = "".join(
        _span(
            token,
            _surprisal_color(token.surprisal_bits, most_bits),
            _tooltip(token),
            "tok output" if i >= num_prompt else "tok",
        )
        for i, token in enumerate(tokens)
    )
    largest = max([abs(s) for s in attribution.scores] + [1e-12])
    attribution_row = "".join(
        _span(token, _attribution_color(score / largest), f"attribution {score:+.4f}\n" + _tooltip(token))
        for token, score in zip(explanation.context_tokens, attribution.scores)
    ) + _span(target_token, "transparent", "the target token\n" + _tooltip(target_token), "tok target")
    summary = [
        ("model", explanation.model),
        ("method", attribution.method),
        ("baseline", attribution.baseline),
        ("steps", str(attribution.steps)),
        ("target", f"output token {attribution.target}: '{visible(target_token.text)}'"),
        ("f(input) = log p(target)", f"{attribution.logprob:.4f} nats"),
        ("f(baseline)", f"{attribution.baseline_logprob:.4f} nats"),
        ("sum of attributions", f"{sum(attribution.scores):.4f} nats"),
        ("completeness gap", f"{attribution.completeness_gap:+.2e} nats"),
    ]
    change = abs(attribution.logprob - attribution.baseline_logprob)
    if abs(attribution.completeness_gap) > 0.01 * max(change, 1e-6):
        summary.append(("note", _GAP_NOTES[attribution.method]))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>llmasos explain: {html.escape(explanation.model)}</title>
<style>{_CSS}</style></head><body>
<h1>Why the model answered as it did</h1>
<h2>Surprisal</h2>
<p>Each token colored by its surprisal, -log2 p(token | the tokens before it), in bits: the darker, the
less expected. Output tokens are underlined. Hover a token for its numbers and the top alternatives.</p>
<div class="tokens">{surprisal_row}</div>
<h2>Attribution</h2>
<p>How much each token moved the log-probability of the outlined target token: red raised it, blue
lowered it. The attributions add up to f(input) - f(baseline), up to the completeness gap.</p>
<div class="tokens">{attribution_row}</div>
<table>{rows}</table>
</body></html>
"""


def _span(token: TokenStat, color: str, tooltip: str, css_class: str = "tok") -> str:
    return (
        f'<span class="{css_class}" style="background:{color}" title="{html.escape(tooltip)}">'
        f"{html.escape(visible(token.text))}</span>"
    )


def _tooltip(token: TokenStat) -> str:
    lines = [f"'{visible(token.text)}' (id {token.token_id})"]
    if token.logprob is None:
        lines.append("first token: nothing before it to predict it")
    else:
        lines.append(f"logprob {token.logprob:.4f} nats, surprisal {token.surprisal_bits:.2f} bits")
    lines += [f"  '{visible(a.text)}'  p={a.prob:.4f}" for a in token.alternatives]
    return "\n".join(lines)


def _surprisal_color(bits: float | None, most_bits: float) -> str:
    if bits is None:
        return "transparent"
    return f"rgba(230, 120, 0, {min(bits / most_bits, 1.0):.3f})"


def _attribution_color(share: float) -> str:
    """`share` in [-1, 1]: red for positive, blue for negative, stronger with magnitude."""
    rgb = "214, 39, 40" if share >= 0 else "31, 119, 180"
    return f"rgba({rgb}, {abs(share):.3f})"


def heatmap_png(explanation: Explanation) -> bytes:
    """The attributions over the context tokens as one row of colored cells (PNG bytes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    attribution = explanation.attribution
    scores = attribution.scores
    largest = max([abs(s) for s in scores] + [1e-12])
    figure = Figure(figsize=(max(4.0, 0.35 * len(scores) + 2.0), 2.6))
    FigureCanvasAgg(figure)  # a figure without pyplot: no global backend, safe in any thread
    axes = figure.add_subplot()
    image = axes.imshow([scores], cmap="RdBu_r", vmin=-largest, vmax=largest, aspect="auto")
    # "$" would start matplotlib's math mode in a label
    labels = [visible(t.text).replace("$", r"\$") for t in explanation.context_tokens]
    axes.set_xticks(range(len(scores)), labels, rotation=90, fontfamily="monospace")
    axes.set_yticks([])
    target_text = visible(explanation.output_tokens[attribution.target].text).replace("$", r"\$")
    axes.set_title(f"{attribution.method} attributions to log p('{target_text}'), nats", fontsize=9)
    figure.colorbar(image, ax=axes, pad=0.01)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def save(explanation: Explanation, stem: Path) -> list[Path]:
    """Write STEM.html, STEM.png and STEM.json; return their paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + suffix) for suffix in (".html", ".png", ".json")]  # runs/qwen2.5.html
    paths[0].write_text(to_html(explanation), encoding="utf-8")
    paths[1].write_bytes(heatmap_png(explanation))
    paths[2].write_text(explanation.to_json(), encoding="utf-8")
    return paths
