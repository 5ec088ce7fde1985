"""The engine behind Google ADK: a native ADK model for `engine/<model>` names, a LiteLLM
provider `engine`, and (later) the serving app. Importing this package registers both."""
from google.adk.models.registry import LLMRegistry

from adk_backend.adk_model import EngineLlm
from adk_backend.engines import configure_engine, engine_for, running_engines, shutdown_all
from adk_backend.litellm_provider import register_litellm_provider

LLMRegistry.register(EngineLlm)
register_litellm_provider()

__all__ = ["EngineLlm", "engine_for", "configure_engine", "running_engines", "shutdown_all"]
