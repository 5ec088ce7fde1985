"""The engine as an ADK model: `LlmAgent(model="engine/smollm2-135m-instruct")`.

Every call from every session becomes one request in the shared AsyncLLM's continuous
batch. Requests are rendered to a chat prompt (system instruction, history, tool
declarations in Hermes format), replies are parsed back into text and function calls.
"""
from __future__ import annotations

from typing import AsyncGenerator

from google.adk.models import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.genai import types

from adk_backend.chat_format import ChatResult, chat_stream, tool_call_text, tool_response_text
from adk_backend.engines import PREFIX, engine_for
from engine import SamplingParams
from engine.async_llm import EngineDeadError, RequestFailedError

DEFAULT_MAX_TOKENS = 512

try:  # ADK >= 2.x declares model capabilities explicitly
    from google.adk.models._capabilities import LlmCapabilities
except ImportError:  # pragma: no cover
    LlmCapabilities = None


class EngineLlm(BaseLlm):
    """ADK model backed by the in-process engine; `model` is 'engine/<engine model name>'."""

    model: str = PREFIX + "smollm2-135m-instruct"

    @classmethod
    def supported_models(cls) -> list[str]:
        return [r"engine/.+"]

    @property
    def capabilities(self):
        return LlmCapabilities(output_schema_and_tools=False)

    async def generate_content_async(self, llm_request: LlmRequest,
                                     stream: bool = False) -> AsyncGenerator[LlmResponse, None]:
        try:
            engine = engine_for(self.model)
            messages = contents_to_messages(llm_request)
            tools = tool_declarations(llm_request.config)
            force = forced_tools(llm_request.config, tools)
            params = sampling_params(llm_request.config)
            async for item in chat_stream(engine, messages, tools, force, params):
                if isinstance(item, ChatResult):
                    yield final_response(item)
                elif stream:
                    yield LlmResponse(content=types.Content(role="model", parts=[types.Part(text=item)]),
                                      partial=True)
        except ValueError as exc:  # refused: prompt too long, bad sampling values, bad history
            yield _error("INVALID_ARGUMENT", str(exc))
        except EngineDeadError as exc:
            yield _error("UNAVAILABLE", str(exc))
        except RequestFailedError as exc:
            yield _error("INTERNAL", str(exc))


def final_response(result: ChatResult) -> LlmResponse:
    """The whole turn: text and function calls, usage, and a malformed call as an error."""
    reply = result.reply
    parts = [types.Part(text=reply.text)] if reply.text else []
    parts += [types.Part(function_call=types.FunctionCall(id=c.id, name=c.name, args=c.arguments))
              for c in reply.tool_calls]
    usage = types.GenerateContentResponseUsageMetadata(
        prompt_token_count=result.num_prompt_tokens, candidates_token_count=result.num_output_tokens,
        total_token_count=result.num_prompt_tokens + result.num_output_tokens,
        cached_content_token_count=result.num_cached_tokens)
    return LlmResponse(
        content=types.Content(role="model", parts=parts) if parts else None,
        partial=False,
        finish_reason=types.FinishReason.MAX_TOKENS if result.finish_reason == "length" else types.FinishReason.STOP,
        usage_metadata=usage,
        error_code="MALFORMED_FUNCTION_CALL" if reply.error else None,
        error_message=reply.error,
        custom_metadata={"engine_request_id": result.request_id, "num_cached_tokens": result.num_cached_tokens},
    )


def _error(code: str, message: str) -> LlmResponse:
    return LlmResponse(error_code=code, error_message=message, partial=False)


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
    for content in llm_request.contents or []:
        role = "assistant" if content.role == "model" else "user"
        texts, responses = [], []
        for part in content.parts or []:
            if part.thought:
                continue
            if part.text:
                texts.append(part.text)
            elif part.function_call:
                fc = part.function_call
                if fc.id:
                    pending_calls[fc.id] = fc.name
                texts.append(tool_call_text(fc.name, dict(fc.args or {})))
            elif part.function_response:
                fr = part.function_response
                if fr.id and pending_calls and pending_calls.get(fr.id, fr.name) != fr.name:
                    raise ValueError(f"function_response {fr.name!r} answers call id {fr.id!r}, "
                                     f"which was a call to {pending_calls[fr.id]!r}")
                responses.append(tool_response_text(fr.name, fr.response))
        if responses:
            messages.append({"role": "tool", "content": "\n".join(responses)})
        if texts:
            messages.append({"role": role, "content": "\n".join(texts)})
    if not messages or messages[-1]["role"] in ("system", "assistant"):
        messages.append({"role": "user", "content": "Continue."})
    return messages


def _schema_json(schema) -> dict:
    """genai Schema (OBJECT, STRING, ...) -> JSON schema (object, string, ...)."""
    if schema is None:
        return {"type": "object", "properties": {}}
    data = schema.model_dump(exclude_none=True, mode="json") if hasattr(schema, "model_dump") else dict(schema)

    def fix(node):
        if isinstance(node, dict):
            return {k: (v.lower() if k == "type" and isinstance(v, str) else fix(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node
    return fix(data)


def tool_declarations(config: types.GenerateContentConfig | None) -> list[dict]:
    """OpenAI-shaped function declarations of every tool in the request."""
    tools = []
    for tool in (config.tools if config and config.tools else []):
        for fd in getattr(tool, "function_declarations", None) or []:
            if not fd.name:
                raise ValueError("a function declaration has no name")
            params = fd.parameters_json_schema if fd.parameters_json_schema is not None else _schema_json(fd.parameters)
            tools.append({"type": "function", "function": {"name": fd.name, "description": fd.description or "",
                                                           "parameters": params}})
    return tools


def forced_tools(config: types.GenerateContentConfig | None, tools: list[dict]) -> list[str] | None:
    """With function calling mode ANY, the names the reply must call one of."""
    fcc = config.tool_config.function_calling_config if config and config.tool_config else None
    if not fcc or fcc.mode != types.FunctionCallingConfigMode.ANY or not tools:
        return None
    names = [t["function"]["name"] for t in tools]
    allowed = [n for n in (fcc.allowed_function_names or names) if n in names]
    if not allowed:
        raise ValueError(f"allowed_function_names {fcc.allowed_function_names} names no declared tool")
    return allowed


def sampling_params(config: types.GenerateContentConfig | None) -> SamplingParams:
    """GenerateContentConfig -> SamplingParams. Unset temperature means greedy decoding."""
    c = config or types.GenerateContentConfig()
    return SamplingParams(
        temperature=0.0 if c.temperature is None else c.temperature,
        top_p=1.0 if c.top_p is None else c.top_p,
        top_k=-1 if not c.top_k else int(c.top_k),
        max_tokens=c.max_output_tokens or DEFAULT_MAX_TOKENS,
        stop=list(c.stop_sequences or []),
        seed=c.seed,
        presence_penalty=c.presence_penalty or 0.0,
        frequency_penalty=c.frequency_penalty or 0.0,
    )
