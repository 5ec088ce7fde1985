"""What a chat reply may contain, as one grammar: the shape of tool calls and final answers.

Both providers and the OpenAI API reduce their knobs (OpenAI `tool_choice`,
`parallel_tool_calls`, `response_format`; ADK function-calling modes and `output_schema`)
to a `ReplySpec`, and `reply_grammar` turns it into the engine's `structured_outputs`. The
model decides what to say; the grammar guarantees the shape:

- auto: free text; once the model opens `<tool_call>`, the call is constrained: a declared
  tool's name, then arguments valid against that tool's schema, then `</tool_call>`.
- required: only calls (one, or several with parallel calls), each one constrained.
- none: the tools stay in the prompt (the history may show their calls and results), but
  the reply cannot open a call.
- with a response schema, the answer is JSON of that schema; in auto mode the reply is
  either calls or that JSON.

Calls use the Hermes format of chat_format: `<tool_call>\\n{"name": N, "arguments": A}\\n</tool_call>`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from adk_backend.chat_format import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from engine import StructuredOutputsParams

ToolMode = Literal["auto", "required", "none"]
_CALL_END = "}\n" + TOOL_CALL_CLOSE
_MAX_WHITESPACE = 2  # between JSON tokens inside a call: enough for a newline, no runaway


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


def reply_grammar(spec: ReplySpec) -> StructuredOutputsParams | None:
    """The structured_outputs that enforce `spec` (None: the reply is free text)."""
    callable_tools = [t["function"] for t in spec.tools if t["function"]["name"] in spec.callable_names]
    if not callable_tools:  # mode none, or no tools: the answer alone
        if spec.response_schema is not None:
            return StructuredOutputsParams(json=spec.response_schema)
        if not spec.tools:
            return None
        no_call = {"type": "any_text", "excludes": [TOOL_CALL_OPEN]}
        return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": no_call})
    tags = [_call_tag(fn) for fn in callable_tools]
    calls_only = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
                  "stop_after_first": not spec.parallel}
    if spec.mode == "required":
        fmt = calls_only
    elif spec.response_schema is not None:
        fmt = {"type": "or", "elements": [calls_only, _json(spec.response_schema)]}
    else:
        fmt = {"type": "triggered_tags", "triggers": [TOOL_CALL_OPEN], "tags": tags,
               "stop_after_first": not spec.parallel}
    return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": fmt})


def _call_tag(fn: dict) -> dict:
    begin = TOOL_CALL_OPEN + '\n{"name": ' + json.dumps(fn["name"]) + ', "arguments": '
    return {"type": "tag", "begin": begin, "content": _json(_arguments_schema(fn)), "end": _CALL_END}


def _json(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": _MAX_WHITESPACE}


def _arguments_schema(fn: dict) -> dict:
    schema = fn.get("parameters") or {"type": "object", "properties": {}}
    return schema if schema.get("type") is not None else {"type": "object", **schema}
