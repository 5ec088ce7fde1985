"""The engine behind Google ADK: a native ADK model for `engine/<model>` names, a LiteLLM
provider `engine`, and (later) the serving app. Importing this package registers both."""
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network: LiteLLM's bundled cost map

from google.adk.models.registry import LLMRegistry  # noqa: E402

from adk_backend.adk_model import EngineLlm, ServiceTierPlugin  # noqa: E402
from adk_backend.engines import configure_engine, engine_for, running_engines, shutdown_all  # noqa: E402
from adk_backend.litellm_provider import register_litellm_provider  # noqa: E402

LLMRegistry.register(EngineLlm)
register_litellm_provider()

__all__ = ["EngineLlm", "ServiceTierPlugin", "engine_for", "configure_engine", "running_engines", "shutdown_all"]
