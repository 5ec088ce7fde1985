"""The engine as an ADK model: `LlmAgent(model="engine/smollm2-135m-instruct")`.

Every call from every session becomes one request in the shared AsyncLLM's continuous
batch. Requests are rendered to a chat prompt (system instruction, history, tool
declarations in Hermes format), replies are parsed back into text and function calls.
The function-calling mode (NONE, AUTO, ANY with allowed_function_names) and the agent's
output_schema become the reply's grammar (reply_grammar), so calls and structured answers
always have the declared shape.
"""
from __future__ import annotations

import json
from typing import AsyncGenerator

from google.adk.models import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.genai import types
from pydantic import TypeAdapter

from adk_backend.agent_runs import CURRENT_PROGRAM, ServiceTierPlugin  # noqa: F401 (their old home)
from adk_backend.agent_runs import program_of, record_agent_call
from adk_backend.chat import (CHAT_MAX_TOKENS, CHAT_TEMPERATURE, ChatResult, chat_stream, finite_logprob,
                              priority_of, top_candidates)
from adk_backend.chat_format import ToolCall, assistant_message, tool_message
from adk_backend.engines import PREFIX, engine_for
from adk_backend.errors import ENGINE_ERRORS, EngineModelError
from adk_backend.reply_grammar import ReplySpec
from engine import SamplingParams
from engine.config import DEFAULT_MODEL


try:  # ADK >= 2.x declares model capabilities explicitly
    from google.adk.models._capabilities import LlmCapabilities
except ImportError:  # pragma: no cover
    LlmCapabilities = None


class EngineLlm(BaseLlm):
    """ADK model backed by the in-process engine; `model` is 'engine/<engine model name>'."""

    model: str = PREFIX + DEFAULT_MODEL
    # One call per reply unless asked: small models tend to repeat a call when allowed several.
    parallel_tool_calls: bool = False

    @classmethod
    def supported_models(cls) -> list[str]:
        return [r"engine/.+"]

    @property
    def capabilities(self):
        # The reply grammar takes "calls or JSON of the schema", so ADK passes both natively.
        return LlmCapabilities(output_schema_and_tools=True)

    async def generate_content_async(self, llm_request: LlmRequest,
                                     stream: bool = False) -> AsyncGenerator[LlmResponse, None]:
        try:
            engine = engine_for(self.model)
            messages = contents_to_messages(llm_request)
            program = program_of(messages)
            spec = reply_spec(llm_request.config, self.parallel_tool_calls)
            if spec.response_schema is not None:
                messages = with_schema_instruction(messages, spec.response_schema)
            params = sampling_params(llm_request.config, engine.sampling_defaults)
            template_kwargs, show_thoughts = thinking_options(llm_request.config)
            priority = priority_of(getattr(llm_request, "service_tier", None))
            tokens: list[tuple[int, dict]] = []  # (token id, its logprobs) when asked for
            async for item in chat_stream(engine, messages, spec, params, template_kwargs, priority, program):
                if isinstance(item, ChatResult):
                    record_agent_call(item.prompt_token_ids, item.output_token_ids, item.num_cached_tokens,
                                      item.time_in_queue, item.num_computed_tokens)
                    response = final_response(item, show_thoughts)
                    if params.logprobs is not None:
                        response.logprobs_result, response.avg_logprobs = logprobs_result(tokens, params.logprobs)
                    yield response
                    continue
                if item.logprobs:
                    tokens += zip(item.token_ids, item.logprobs)
                if stream and (item.text or (item.reasoning and show_thoughts)):
                    parts = [types.Part(text=item.reasoning, thought=True)] if item.reasoning and show_thoughts else []
                    parts += [types.Part(text=item.text)] if item.text else []
                    yield LlmResponse(content=types.Content(role="model", parts=parts), partial=True)
        except ENGINE_ERRORS as exc:  # raised, with its status: what ADK's fallback and callbacks act on
            raise EngineModelError.of(exc) from exc


def final_response(result: ChatResult, show_thoughts: bool = True) -> LlmResponse:
    """The whole turn: thinking (a thought part), text and function calls, and usage."""
    reply = result.reply
    parts = [types.Part(text=reply.reasoning, thought=True)] if reply.reasoning and show_thoughts else []
    parts += [types.Part(text=reply.text)] if reply.text else []
    parts += [types.Part(function_call=types.FunctionCall(id=c.id, name=c.name, args=c.arguments))
              for c in reply.tool_calls]
    usage = types.GenerateContentResponseUsageMetadata(
        prompt_token_count=result.num_prompt_tokens, candidates_token_count=result.num_output_tokens,
        total_token_count=result.num_prompt_tokens + result.num_output_tokens,
        cached_content_token_count=result.num_cached_tokens,
        thoughts_token_count=result.num_reasoning_tokens or None)
    return LlmResponse(
        content=types.Content(role="model", parts=parts) if parts else None,
        partial=False,
        finish_reason=types.FinishReason.MAX_TOKENS if result.finish_reason == "length" else types.FinishReason.STOP,
        usage_metadata=usage,
        custom_metadata={"engine_request_id": result.request_id, "num_cached_tokens": result.num_cached_tokens},
    )


def logprobs_result(tokens: list[tuple[int, dict]], top_n: int) -> tuple[types.LogprobsResult, float | None]:
    """Gemini's logprobs of the generated tokens (thinking included): each chosen token, its
    `top_n` most likely candidates, and their mean log probability."""
    def candidate(token_id: int, lp) -> types.LogprobsResultCandidate:
        return types.LogprobsResultCandidate(token=lp.decoded_token, token_id=token_id,
                                             log_probability=finite_logprob(lp))
    chosen = [candidate(t, entry[t]) for t, entry in tokens]
    top = [types.LogprobsResultTopCandidates(candidates=[candidate(*c) for c in top_candidates(entry, top_n)])
           for _, entry in tokens] if top_n else None
    total = sum(c.log_probability for c in chosen)
    result = types.LogprobsResult(chosen_candidates=chosen, top_candidates=top, log_probability_sum=total)
    return result, total / len(chosen) if chosen else None


# -- request conversion -----------------------------------------------------------------
def _content_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, types.Part):
        return value.text or ""
    if isinstance(value, types.Content):
        return "".join(p.text or "" for p in value.parts or [] if not p.thought)
    if isinstance(value, list):
        return "\n".join(_content_text(v) for v in value)
    raise ValueError(f"unsupported system_instruction of type {type(value).__name__}")


def contents_to_messages(llm_request: LlmRequest) -> list[dict]:
    """System instruction + contents as neutral chat messages (see chat_format)."""
    messages = []
    system = _content_text(llm_request.config.system_instruction if llm_request.config else None)
    if system:
        messages.append({"role": "system", "content": system})
    pending_calls: dict[str, str] = {}  # function call id -> name, to check responses against
    for i, content in enumerate(llm_request.contents or []):
        role = "assistant" if content.role == "model" else "user"
        texts, calls, responses = [], [], []
        for j, part in enumerate(content.parts or []):
            if part.thought:  # a reasoning model's thinking never goes back to it
                continue
            _refuse_unreadable(part, f"contents[{i}].parts[{j}]")
            if part.text:
                texts.append(part.text)
            elif part.function_call:
                fc = part.function_call
                if fc.id:
                    pending_calls[fc.id] = fc.name
                calls.append(ToolCall(fc.name, dict(fc.args or {}), **({"id": fc.id} if fc.id else {})))
            elif part.function_response:
                fr = part.function_response
                if fr.id and pending_calls and pending_calls.get(fr.id, fr.name) != fr.name:
                    raise ValueError(f"function_response {fr.name!r} answers call id {fr.id!r}, "
                                     f"which was a call to {pending_calls[fr.id]!r}")
                responses.append(tool_message(fr.name, fr.id, fr.response))
        messages.extend(responses)
        if role == "assistant" and (texts or calls):
            messages.append(assistant_message("\n".join(texts), calls))
        elif texts:
            messages.append({"role": role, "content": "\n".join(texts)})
    if not messages or messages[-1]["role"] in ("system", "assistant"):
        messages.append({"role": "user", "content": "Continue."})
    return messages


# Part fields that carry no content of their own (metadata about the part)
_PART_METADATA = {"text", "thought", "thought_signature", "part_metadata", "media_resolution", "video_metadata",
                  "function_call", "function_response"}


def _refuse_unreadable(part: types.Part, where: str) -> None:
    """A part the model cannot read (an image, a file, code to execute...) is refused by name:
    answering as if it had never been sent would be wrong."""
    carried = [k for k in part.model_dump(exclude_none=True) if k not in _PART_METADATA]
    if carried:
        media = part.inline_data or part.file_data
        mime = f" ({media.mime_type})" if media is not None and media.mime_type else ""
        raise ValueError(f"{where} is {carried[0]}{mime}: this model reads text, function calls and "
                         "function responses only, and a part is never dropped silently")


def json_schema(schema) -> dict:
    """Any of ADK's schema forms as a JSON schema: a JSON-schema dict, a genai Schema
    (OBJECT, STRING, nullable, ...), a pydantic model or a type such as list[Model]."""
    if schema is None:
        return {"type": "object", "properties": {}}
    if isinstance(schema, dict):
        return schema
    if isinstance(schema, types.Schema):
        return schema.json_schema.model_dump(exclude_none=True, by_alias=True, mode="json")
    return TypeAdapter(schema).json_schema()


def tool_declarations(config: types.GenerateContentConfig | None) -> list[dict]:
    """OpenAI-shaped function declarations of every tool in the request."""
    tools = []
    for tool in (config.tools if config and config.tools else []):
        for fd in getattr(tool, "function_declarations", None) or []:
            if not fd.name:
                raise ValueError("a function declaration has no name")
            params = json_schema(fd.parameters_json_schema if fd.parameters_json_schema is not None
                                 else fd.parameters)
            tools.append({"type": "function", "function": {"name": fd.name, "description": fd.description or "",
                                                           "parameters": params}})
    return tools


_MODES = {types.FunctionCallingConfigMode.NONE: "none", types.FunctionCallingConfigMode.ANY: "required"}


def reply_spec(config: types.GenerateContentConfig | None, parallel: bool = False) -> ReplySpec:
    """Tools, function-calling mode (NONE / AUTO / ANY with allowed_function_names; VALIDATED
    is AUTO, whose calls are always validated) and the output schema of one request."""
    tools = tool_declarations(config)
    fcc = config.tool_config.function_calling_config if config and config.tool_config else None
    mode = _MODES.get(fcc.mode, "auto") if fcc and tools else "auto"
    allowed = list(fcc.allowed_function_names) if mode == "required" and fcc.allowed_function_names else None
    response_schema = None
    if config is not None:
        if config.response_json_schema is not None or config.response_schema is not None:
            response_schema = json_schema(config.response_json_schema if config.response_json_schema is not None
                                          else config.response_schema)
        elif config.response_mime_type == "application/json":
            response_schema = {"type": "object"}
    return ReplySpec(tools=tools, mode=mode, allowed=allowed, parallel=parallel, response_schema=response_schema)


def with_schema_instruction(messages: list[dict], schema: dict) -> list[dict]:
    """Tells the model the shape its answer will be held to, as Gemini is told through its
    API: a small model fills the fields far better when it can read their names."""
    note = f"When you give your final answer, reply with only a JSON object that matches this JSON schema: " \
           f"{json.dumps(schema)}"
    messages = [dict(m) for m in messages]
    if messages[0]["role"] == "system":
        messages[0]["content"] += "\n\n" + note
    else:
        messages.insert(0, {"role": "system", "content": note})
    return messages


def thinking_options(config: types.GenerateContentConfig | None) -> tuple[dict | None, bool]:
    """ADK's thinking_config -> (chat template kwargs, whether thoughts are returned): a
    thinking_budget of 0 switches a reasoning model's thinking off (Qwen3's enable_thinking),
    include_thoughts=False keeps its thinking out of the response. Unset: the template's
    default, thoughts returned."""
    thinking = config.thinking_config if config is not None else None
    if thinking is None:
        return None, True
    kwargs = {"enable_thinking": False} if thinking.thinking_budget == 0 else (
        {"enable_thinking": True} if thinking.thinking_budget else None)
    return kwargs, thinking.include_thoughts is not False


def sampling_params(config: types.GenerateContentConfig | None, defaults: dict | None = None) -> SamplingParams:
    """GenerateContentConfig -> SamplingParams. A field left unset takes the model's
    generation_config default (`defaults`), else the chat defaults (chat.py: greedy, 512 tokens)."""
    c = config or types.GenerateContentConfig()
    d = defaults or {}
    if c.logprobs is not None and not c.response_logprobs:
        raise ValueError("logprobs (the number of top candidates) needs response_logprobs=True")
    return SamplingParams(
        temperature=d.get("temperature", CHAT_TEMPERATURE) if c.temperature is None else c.temperature,
        top_p=d.get("top_p", 1.0) if c.top_p is None else c.top_p,
        top_k=int(c.top_k) if c.top_k else d.get("top_k", -1),
        min_p=d.get("min_p", 0.0),
        repetition_penalty=d.get("repetition_penalty", 1.0),
        max_tokens=c.max_output_tokens or d.get("max_tokens", CHAT_MAX_TOKENS),
        stop=list(c.stop_sequences or []),
        seed=c.seed,
        presence_penalty=c.presence_penalty or 0.0,
        frequency_penalty=c.frequency_penalty or 0.0,
        logprobs=(c.logprobs or 0) if c.response_logprobs else None,
    )
