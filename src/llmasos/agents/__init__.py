"""Agents: programs that call tools over many turns, run as processes of the kernel.

    from llmasos import LLM
    from llmasos.agents import Agent

    def get_weather(city: str, unit: str = "C") -> dict:
        \"\"\"The weather now in a city.\"\"\"
        return {"city": city, "temperature": 21, "unit": unit}

    agent = Agent(LLM("qwen3"), tools=[get_weather], instructions="Be brief.")
    print(agent.run("Is it warm in Paris?").answer)

Tools are plain functions: their JSON schema comes from their type hints (pydantic); they reach the
model, and its calls come back (`llmasos.outputs.ToolCall`), through llmasos.tools. Each call is
checked against the allowed tools, audited (name, arguments' sha256, duration, outcome) and its
result passes the injection guard before it re-enters the prompt. With the engine's
context_policy "pin" or "swap", the kernel keeps a turn's KV while its tools run.
"""

from llmasos.agents.functions import FunctionTool
from llmasos.agents.loop import Agent, AgentRun, TurnRecord

__all__ = ["Agent", "AgentRun", "FunctionTool", "TurnRecord"]
