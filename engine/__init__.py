"""In-process continuous-batching inference engine (knows nothing about ADK)."""
from engine.config import EngineConfig, ModelConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.request import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from engine.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "AsyncLLM", "EngineConfig", "ModelConfig", "LLMEngine", "SamplingParams", "StructuredOutputsParams",
           "RequestOutput", "CompletionOutput", "Logprob", "RequestMetrics"]


def __getattr__(name: str):
    if name == "AsyncLLM":  # imported lazily: it starts threads only when used
        from engine.async_llm import AsyncLLM
        return AsyncLLM
    raise AttributeError(name)
