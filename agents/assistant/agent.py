"""Plain chat on the local model, served in-process by the engine."""
import adk_backend  # noqa: F401  (registers the engine/ models)
from google.adk.agents import LlmAgent

root_agent = LlmAgent(
    name="assistant",
    model="engine/smollm2-135m-instruct",
    description="A helpful assistant running on a local model.",
    instruction="You are a helpful, concise assistant. Answer in a few sentences.",
)
