"""The process-wide registry of shared engines: one AsyncLLM per model name.

ADK builds a new model object per event loop (and per agent copy), so the engine cannot
live on the model object: every instance, on every loop, gets the same AsyncLLM here.
"""
from __future__ import annotations

import threading
import weakref

from engine import AsyncLLM, EngineConfig

PREFIX = "engine/"
_CHAT_OPTIONS = ("tool_call_parser", "reasoning_parser")  # ours, not EngineConfig's
_engines: dict[str, AsyncLLM] = {}
_options: dict[str, dict] = {}
_chat: "weakref.WeakKeyDictionary[AsyncLLM, dict]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def model_name(name: str) -> str:
    """'engine/smollm2-135m-instruct' -> 'smollm2-135m-instruct'."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def configure_engine(name: str, **engine_options) -> None:
    """Sets EngineConfig options for `name` before its engine is first created. With
    `model=...`, `name` is an alias: `engine/<name>` then serves that model.
    `tool_call_parser` ("hermes", "llama3_json") and `reasoning_parser` ("qwen3", or None
    for none) override what the chat template implies, as vLLM's flags of those names."""
    from adk_backend.reasoning import reasoning_format
    from adk_backend.tool_formats import tool_call_format
    name = model_name(name)
    with _lock:
        if name in _engines and _options.get(name) != engine_options:
            raise RuntimeError(f"the engine for {name!r} is already running with other options")
        if engine_options.get("tool_call_parser"):
            tool_call_format(engine_options["tool_call_parser"])
        if "reasoning_parser" in engine_options:
            reasoning_format(engine_options["reasoning_parser"])
        config = {k: v for k, v in engine_options.items() if k not in _CHAT_OPTIONS}
        EngineConfig(**({"model": name} | config))  # validate now, not at first use
        _options[name] = dict(engine_options)


def engine_for(name: str) -> AsyncLLM:
    """The one shared engine of this model in this process (created on first use)."""
    name = model_name(name)
    with _lock:
        engine = _engines.get(name)
        if engine is None:
            options = _options.get(name, {})
            config = {k: v for k, v in options.items() if k not in _CHAT_OPTIONS}
            engine = AsyncLLM(EngineConfig(**({"model": name} | config)))
            _engines[name] = engine
            _chat[engine] = {k: v for k, v in options.items() if k in _CHAT_OPTIONS}
        return engine


def chat_overrides(engine: AsyncLLM) -> dict:
    """The tool_call_parser / reasoning_parser configured for this engine, if any."""
    return _chat.get(engine, {})


def running_engines() -> dict[str, AsyncLLM]:
    with _lock:
        return dict(_engines)


def shutdown_engine(name: str) -> None:
    """Stops `name`'s engine and forgets it (its memory goes with the last reference); the
    next engine_for(name) starts a new one with the configured options."""
    with _lock:
        engine = _engines.pop(model_name(name), None)
    if engine is not None:
        engine.shutdown()


def shutdown_all() -> None:
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for e in engines:
        e.shutdown()
