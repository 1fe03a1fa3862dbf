"""Function calling: the tools a request offers, its model's call format, the grammar that makes a
forced call valid, and the calls parsed out of a reply (whole or streamed). Pure text and JSON, no
torch: `LLM.chat`, the server and agents share it.

    request = ToolRequest.from_openai(tools, tool_choice, parallel_tool_calls)
    prompt, plan = render_chat(tokenizer, messages, request, tool_format(tokenizer))
    params = plan.sampling_params(params)       # the grammar, when the choice is forced or strict
    completion = plan.read(completion)          # .tool_calls, .text = the content
"""

from llmasos.tools.formats import FALLBACK, FORMATS, ToolFormat, detect_format, format_named
from llmasos.tools.grammar import tool_grammar
from llmasos.tools.parser import CallDelta, ParsedDelta, ToolCallParser, parse_tool_calls
from llmasos.tools.render import ToolPlan, finish_reason, render_chat, tool_format
from llmasos.tools.spec import Tool, ToolRequest

__all__ = [
    "FALLBACK", "FORMATS", "CallDelta", "ParsedDelta", "Tool", "ToolCallParser", "ToolFormat", "ToolPlan",
    "ToolRequest", "detect_format", "finish_reason", "format_named", "parse_tool_calls", "render_chat",
    "tool_format", "tool_grammar",
]  # fmt: skip
