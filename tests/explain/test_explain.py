"""`llmasos.explain` on the tiny Llama: the trace equals transformers on the same weights, integrated
gradients are complete, and the page and heat map are safe and well formed."""

import io
import json
import math
from html.parser import HTMLParser

import pytest
import torch

from llmasos import LLM
from llmasos.errors import InvalidRequestError
from llmasos.explain import Alternative, Attribution, Explanation, TokenStat, explain
from llmasos.explain.render import heatmap_png, save, to_html, visible

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(store):
    return LLM("tiny", device="cpu", max_model_len=64, num_kv_blocks=64, block_size=8)


@pytest.fixture(scope="module")
def explained(llm):
    return explain(llm, PROMPT, max_tokens=6, top_k=3, target=2, steps=32, baseline="pad")


def target_logprob(model, embeds: torch.Tensor, token_id: int) -> torch.Tensor:
    """log p(token_id | context) at the last position, per row of `embeds`."""
    return model(inputs_embeds=embeds).logits[:, -1].log_softmax(-1)[:, token_id]


def test_the_trace_equals_transformers_on_the_same_weights(llm, hf_model, explained):
    tokens = explained.prompt_tokens + explained.output_tokens
    ids = [t.token_id for t in tokens]
    assert ids[: len(explained.prompt_tokens)] == llm.tokenizer.encode(PROMPT)
    with torch.no_grad():
        logprobs = hf_model(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert explained.prompt_tokens[0].logprob is None and explained.prompt_tokens[0].alternatives == []
    for position, token in enumerate(tokens[1:], start=1):
        row = logprobs[position - 1]
        assert token.logprob == pytest.approx(row[token.token_id].item(), abs=1e-4)
        assert token.surprisal_bits == pytest.approx(-token.logprob / math.log(2))
        assert token.text == llm.tokenizer.decode([token.token_id], skip_special_tokens=False)
        top = row.topk(3)
        assert [a.token_id for a in token.alternatives] == top.indices.tolist()
        assert [a.prob for a in token.alternatives] == pytest.approx(top.values.exp().tolist(), abs=1e-5)
    for token in explained.output_tokens:  # greedy: each output token is the most likely one
        assert token.alternatives[0].token_id == token.token_id
    # the gradient pass describes the kernel's model: same log-probability of the target token
    target = explained.output_tokens[explained.attribution.target]
    assert explained.attribution.token_id == target.token_id
    assert explained.attribution.logprob == pytest.approx(target.logprob, abs=1e-4)


def test_chat_messages_get_the_chat_template(llm):
    messages = [{"role": "user", "content": "Hello, world!"}]
    explanation = explain(llm, messages, max_tokens=2, steps=4)
    assert explanation.prompt == llm.tokenizer.apply_chat_template(messages)
    ids = [t.token_id for t in explanation.prompt_tokens]
    assert ids == llm.tokenizer.encode(explanation.prompt)


def test_integrated_gradients_are_complete(llm, hf_model, explained):
    """sum of attributions = f(input) - f(baseline), checked against an independent forward pass."""
    from transformers import AutoTokenizer

    attribution = explained.attribution
    context = [t.token_id for t in explained.context_tokens]
    assert len(attribution.scores) == len(context) == len(explained.prompt_tokens) + attribution.target
    pad = AutoTokenizer.from_pretrained(llm.engine.model_dir).pad_token_id
    embed = hf_model.get_input_embeddings()
    with torch.no_grad():
        inputs, reference = embed(torch.tensor([context, [pad] * len(context)])).unbind(0)
        f_input, f_baseline = target_logprob(hf_model, torch.stack([inputs, reference]), attribution.token_id)
    change = (f_input - f_baseline).item()
    assert abs(change) > 0.1  # a baseline that changes nothing would make completeness trivial
    assert attribution.logprob == pytest.approx(f_input.item(), abs=1e-4)
    assert attribution.baseline_logprob == pytest.approx(f_baseline.item(), abs=1e-4)
    assert sum(attribution.scores) == pytest.approx(change, rel=1e-2)
    assert attribution.completeness_gap == pytest.approx(sum(attribution.scores) - change, abs=1e-4)
    # the tolerance has teeth: too few integration steps miss it
    coarse = explain(llm, PROMPT, max_tokens=6, target=2, steps=4, baseline="pad").attribution
    assert sum(coarse.scores) != pytest.approx(change, rel=1e-2)


def test_gradient_x_input_is_the_gradient_times_the_input(llm, hf_model, explained):
    attribution = explain(llm, PROMPT, max_tokens=6, target=2, method="gradient_x_input", baseline="zeros")
    attribution = attribution.attribution
    context = [t.token_id for t in explained.context_tokens]
    inputs = hf_model.get_input_embeddings()(torch.tensor([context])).detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(target_logprob(hf_model, inputs, attribution.token_id).sum(), inputs)
    expected = (gradient * inputs).sum(-1)[0]
    assert attribution.steps == 1 and len(attribution.scores) == len(context)
    torch.testing.assert_close(torch.tensor(attribution.scores), expected.detach(), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        zero_output = target_logprob(hf_model, torch.zeros_like(inputs), attribution.token_id).item()
    assert attribution.baseline_logprob == pytest.approx(zero_output, abs=1e-4)
    integrated = explain(llm, PROMPT, max_tokens=6, target=2, baseline="zeros").attribution.scores
    assert not torch.allclose(torch.tensor(attribution.scores), torch.tensor(integrated), atol=1e-2)


@pytest.mark.parametrize(
    ("prompt", "options", "message"),
    [
        (PROMPT, {"max_tokens": 4, "target": 4}, r"target=4 is out of range.*\[0, 3\]"),
        (PROMPT, {"target": -1}, "target=-1 is out of range"),
        (PROMPT, {"method": "saliency"}, "unknown attribution method 'saliency'"),
        (PROMPT, {"baseline": "ones"}, "unknown baseline 'ones'"),
        (PROMPT, {"steps": 0}, "steps=0"),
        (PROMPT, {"top_k": 21}, r"top_k=21 .*\[0, 20\]"),
        ("", {}, "the prompt is empty"),
        ([], {}, "non-empty list of chat messages"),
    ],
)
def test_bad_input_is_refused_with_the_fix(llm, prompt, options, message):
    with pytest.raises(InvalidRequestError, match=message):
        explain(llm, prompt, **options)


HOSTILE = ["<script>alert(1)</script>", "a&b \"q\" 's'", "\n", "$x$", "</span><img src=x>"]


def hostile_explanation() -> Explanation:
    """Tokens a page must escape, and one whose "$" would start matplotlib's math mode."""

    def stat(i: int, text: str) -> TokenStat:
        lp = None if i == 0 else -0.5 * i
        alternatives = [] if i == 0 else [Alternative(99, "<b>alt</b>", 0.25)]
        return TokenStat(i, text, lp, None if lp is None else -lp / math.log(2), alternatives)

    tokens = [stat(i, text) for i, text in enumerate(HOSTILE)]
    attribution = Attribution("integrated_gradients", "pad", 8, 0, 4, [0.5, -0.2, 0.1, 0.3], -1.0, -2.0, 0.3)
    return Explanation("tiny", "".join(HOSTILE), tokens[:4], tokens[4:] + [stat(5, "end")], attribution)


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attributes, self.text, self.titles = [], set(), "", []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes |= {name for name, _ in attrs}
        self.titles += [value for name, value in attrs if name == "title"]

    def handle_data(self, data):
        self.text += data


@pytest.mark.parametrize("source", ["hostile", "model"])
def test_the_page_is_self_contained_and_escapes_every_token(source, explained):
    explanation = hostile_explanation() if source == "hostile" else explained
    page = to_html(explanation)
    parser = PageParser()
    parser.feed(page)
    parser.close()
    page_tags = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "div", "span", "table"}
    assert set(parser.tags) <= page_tags | {"tr", "th", "td"}
    assert not parser.attributes & {"src", "href", "action", "srcset"}  # nothing is fetched
    assert not any(marker in page.lower() for marker in ("http:", "https:", "url(", "@import"))
    for token in explanation.prompt_tokens + explanation.output_tokens:
        assert visible(token.text) in parser.text
    alternatives = {a.text for t in explanation.output_tokens for a in t.alternatives}
    assert all(any(visible(text) in title for title in parser.titles) for text in alternatives)
    assert f"{explanation.attribution.completeness_gap:+.2e}" in parser.text


@pytest.mark.parametrize("source", ["hostile", "model"])
def test_the_heat_map_is_a_png_matplotlib_reads_back(source, explained):
    from matplotlib.image import imread

    data = heatmap_png(hostile_explanation() if source == "hostile" else explained)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = imread(io.BytesIO(data), format="png")
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
    assert image[..., :3].std() > 0  # something was drawn


def test_save_writes_the_page_the_heat_map_and_the_json(tmp_path, explained):
    html_path, png_path, json_path = save(explained, tmp_path / "out" / "explain")
    assert html_path.read_text(encoding="utf-8") == to_html(explained)
    assert png_path.read_bytes().startswith(b"\x89PNG")
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["attribution"]["scores"] == explained.attribution.scores
    assert [t["token_id"] for t in data["output_tokens"]] == [t.token_id for t in explained.output_tokens]
    assert data["prompt_tokens"][1]["surprisal_bits"] == explained.prompt_tokens[1].surprisal_bits
