"""A before_model_callback for agents on small local models: call tools first, then answer.

Small models rarely choose to call a tool on their own (in AUTO mode SmolLM2-135M answers
from memory). This policy decides *when* to call and leaves *what* to call to the model:
the first model call of a turn runs in mode ANY (the reply must be calls to the agent's
tools, constrained by their schemas); once the tools have answered, mode NONE (the reply is
text, or JSON of the agent's output_schema, built from the tool results).

    LlmAgent(..., tools=[...], before_model_callback=call_tools_then_answer)
"""
from __future__ import annotations

from google.adk.models.llm_request import LlmRequest
from google.genai import types


def call_tools_then_answer(callback_context, llm_request: LlmRequest) -> None:
    last = llm_request.contents[-1] if llm_request.contents else None
    answered = last is not None and any(p.function_response for p in last.parts or [])
    mode = types.FunctionCallingConfigMode.NONE if answered else types.FunctionCallingConfigMode.ANY
    llm_request.config.tool_config = types.ToolConfig(function_calling_config=types.FunctionCallingConfig(mode=mode))
