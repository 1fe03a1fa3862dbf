"""Transparency: what a model found surprising, what else it considered, and which input tokens
drove a chosen output token; as data (`Explanation`, JSON) and for people (HTML page, PNG heat map).
"""

from llmasos.explain.render import heatmap_png, save, to_html
from llmasos.explain.trace import Alternative, Attribution, Explanation, TokenStat, explain

__all__ = [
    "Alternative",
    "Attribution",
    "Explanation",
    "TokenStat",
    "explain",
    "heatmap_png",
    "save",
    "to_html",
]
