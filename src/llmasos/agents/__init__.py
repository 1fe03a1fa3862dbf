"""Agents: programs that call tools over many turns, run as processes of the kernel.

    from llmasos import LLM
    from llmasos.agents import Agent

    def get_weather(city: str, unit: str = "C") -> dict:
        \"\"\"The weather now in a city.\"\"\"
        return {"city": city, "temperature": 21, "unit": unit}

    agent = Agent(LLM("qwen3"), tools=[get_weather], instructions="Be brief.")
    print(agent.run("Is it warm in Paris?").answer)

Tools are plain functions: their JSON schema comes from their type hints (pydantic). Each call is
checked against the allowed tools, audited (name, arguments' sha256, duration, outcome) and its
result passes the injection guard before it re-enters the prompt. With the engine's
context_policy "pin" or "swap", the kernel keeps a turn's KV while its tools run.
"""

from llmasos.agents.functions import FunctionTool, ToolCall
from llmasos.agents.loop import Agent, AgentRun, TurnRecord, hermes_tool_calls

__all__ = ["Agent", "AgentRun", "FunctionTool", "ToolCall", "TurnRecord", "hermes_tool_calls"]
