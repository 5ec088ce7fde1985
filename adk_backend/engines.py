"""The process-wide registry of shared engines: one AsyncLLM per model name.

ADK builds a new model object per event loop (and per agent copy), so the engine cannot
live on the model object: every instance, on every loop, gets the same AsyncLLM here.
"""
from __future__ import annotations

import threading

from engine import AsyncLLM, EngineConfig

PREFIX = "engine/"
_engines: dict[str, AsyncLLM] = {}
_options: dict[str, dict] = {}
_lock = threading.Lock()


def model_name(name: str) -> str:
    """'engine/smollm2-135m-instruct' -> 'smollm2-135m-instruct'."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def configure_engine(name: str, **engine_options) -> None:
    """Sets EngineConfig options for `name` before its engine is first created. With
    `model=...`, `name` is an alias: `engine/<name>` then serves that model."""
    name = model_name(name)
    with _lock:
        if name in _engines and _options.get(name) != engine_options:
            raise RuntimeError(f"the engine for {name!r} is already running with other options")
        EngineConfig(**({"model": name} | engine_options))  # validate now, not at first use
        _options[name] = dict(engine_options)


def engine_for(name: str) -> AsyncLLM:
    """The one shared engine of this model in this process (created on first use)."""
    name = model_name(name)
    with _lock:
        engine = _engines.get(name)
        if engine is None:
            engine = AsyncLLM(EngineConfig(**({"model": name} | _options.get(name, {}))))
            _engines[name] = engine
        return engine


def running_engines() -> dict[str, AsyncLLM]:
    with _lock:
        return dict(_engines)


def shutdown_all() -> None:
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for e in engines:
        e.shutdown()
