"""The engine behind Google ADK: a native ADK model for `engine/<model>` names, a LiteLLM
provider `engine`, and the serving app. Importing this package registers both: the ADK
model at once, the LiteLLM provider as soon as LiteLLM is imported (by the user or by ADK's
LiteLlm), so a process that never uses LiteLLM never pays its 3 s import."""
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network: LiteLLM's bundled cost map

import wrapt  # noqa: E402
from google.adk.models.registry import LLMRegistry  # noqa: E402

from adk_backend.adk_model import EngineLlm  # noqa: E402
from adk_backend.agent_runs import ServiceTierPlugin  # noqa: E402
from adk_backend.engines import configure_engine, engine_for, running_engines, shutdown_all  # noqa: E402


@wrapt.when_imported("litellm")
def _register_litellm_provider(_litellm) -> None:
    from adk_backend.litellm_provider import register_litellm_provider
    register_litellm_provider()


LLMRegistry.register(EngineLlm)

__all__ = ["EngineLlm", "ServiceTierPlugin", "engine_for", "configure_engine", "running_engines", "shutdown_all"]
