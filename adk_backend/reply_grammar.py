"""What a chat reply may contain, as one grammar: the shape of tool calls and final answers.

Both providers and the OpenAI API reduce their knobs (OpenAI `tool_choice`,
`parallel_tool_calls`, `response_format`; ADK function-calling modes and `output_schema`)
to a `ReplySpec`, and `reply_grammar` turns it into the engine's `structured_outputs`. The
model decides what to say; the grammar guarantees the shape:

- auto: free text; once the model opens a call (`<tool_call>` in Hermes, `{"name":` in
  Llama 3's JSON format), the call is constrained: a declared tool's name, then arguments
  valid against that tool's schema, then the format's end.
- required: only calls (one, or several with parallel calls), each one constrained.
- none: the tools stay in the prompt (the history may show their calls and results), but
  the reply cannot open a call.
- with a response schema, the answer is JSON of that schema; in auto mode the reply is
  either calls or that JSON.

Calls take the model family's format (tool_formats). A reasoning model thinks first: its
`<think>...</think>` block is free text, and the shape above holds from its end on (so a
call named while thinking is neither constrained nor parsed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from adk_backend.reasoning import ReasoningFormat
from adk_backend.tool_formats import HERMES, ToolCallFormat
from engine import StructuredOutputsParams

ToolMode = Literal["auto", "required", "none"]


@dataclass
class ReplySpec:
    tools: list[dict]                          # OpenAI-shaped function tools offered
    mode: ToolMode = "auto"
    allowed: list[str] | None = None           # required: the names it may call (None: any)
    parallel: bool = True                      # several calls in one reply
    response_schema: dict | None = None        # JSON schema of the final answer

    def __post_init__(self) -> None:
        names = self.tool_names
        if self.mode == "required" and not self.tools:
            raise ValueError("a required tool call needs tools, and none were given")
        for name in self.allowed or []:
            if name not in names:
                raise ValueError(f"the tool choice names {name!r}, which is not among the tools {names}")
        if self.allowed is not None and not self.allowed:
            raise ValueError("the allowed tool names are empty")

    @property
    def tool_names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def callable_names(self) -> set[str]:
        if self.mode == "none":
            return set()
        return set(self.allowed or self.tool_names)


def reply_grammar(spec: ReplySpec, calls: ToolCallFormat = HERMES, reasoning: ReasoningFormat | None = None,
                  thinking_opened: bool = False) -> StructuredOutputsParams | None:
    """The structured_outputs that enforce `spec` (None: the reply is free text). With a
    `reasoning` format the reply may think first (`thinking_opened`: the prompt already
    opened the block)."""
    fmt = _reply_format(spec, calls)
    if fmt is None:
        return None
    if fmt.get("type") == "json_schema" and reasoning is None:  # the answer alone: plain JSON mode
        return StructuredOutputsParams(json=spec.response_schema)
    if reasoning is not None:
        think = {"type": "tag", "begin": "" if thinking_opened else reasoning.open, "content": {"type": "any_text"},
                 "end": reasoning.close}
        fmt = {"type": "sequence", "elements": [think, fmt]}
    return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": fmt})


def _reply_format(spec: ReplySpec, calls: ToolCallFormat) -> dict | None:
    callable_tools = [t["function"] for t in spec.tools if t["function"]["name"] in spec.callable_names]
    if not callable_tools:  # mode none, or no tools: the answer alone
        if spec.response_schema is not None:
            return _json(spec.response_schema)
        if not spec.tools:
            return None
        return {"type": "any_text", "excludes": [calls.trigger]}
    tags = [_call_tag(fn, calls) for fn in callable_tools]
    calls_only = {"type": "tags_with_separator", "tags": tags, "separator": calls.separator, "at_least_one": True,
                  "stop_after_first": not spec.parallel}
    if spec.mode == "required":
        return calls_only
    if spec.response_schema is not None:
        return {"type": "or", "elements": [calls_only, _json(spec.response_schema)]}
    return {"type": "triggered_tags", "triggers": [calls.trigger], "tags": tags,
            "stop_after_first": not spec.parallel}


def _call_tag(fn: dict, calls: ToolCallFormat) -> dict:
    return {"type": "tag", "begin": calls.call_prefix(fn["name"]), "content": _json(_arguments_schema(fn)),
            "end": calls.call_suffix}


def _json(schema: dict) -> dict:
    """JSON of `schema`, its separators fixed by the engine (json.dumps's: a call renders back
    into the next prompt as the same tokens)."""
    return {"type": "json_schema", "json_schema": schema}


def _arguments_schema(fn: dict) -> dict:
    schema = fn.get("parameters") or {"type": "object", "properties": {}}
    return schema if schema.get("type") is not None else {"type": "object", **schema}
