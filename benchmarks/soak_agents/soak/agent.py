"""The soak test's agent: a tiny random model, so that a thousand sessions take minutes."""
import adk_backend  # noqa: F401
from google.adk.agents import LlmAgent
from google.genai import types

root_agent = LlmAgent(name="soak", model="engine/dummy-tiny", instruction="Answer.",
                      generate_content_config=types.GenerateContentConfig(max_output_tokens=12))
