"""An agent that really calls its tools on the local 135M model.

It calls tools first and answers after (adk_backend.tool_policy): the turn's first model
call must be tool calls (mode ANY, several in one reply), each one constrained to a declared
tool and that tool's argument schema; once the tools have answered, the model writes the
answer from their results.
"""
from adk_backend.adk_model import EngineLlm
from adk_backend.tool_policy import call_tools_then_answer
from google.adk.agents import LlmAgent
from google.genai import types

CAPITALS = {"france": "Paris", "japan": "Tokyo", "italy": "Rome", "kenya": "Nairobi", "peru": "Lima",
            "canada": "Ottawa", "egypt": "Cairo", "norway": "Oslo"}


def get_capital(country: str) -> dict:
    """Returns the capital city of a country.

    Args:
        country: The country's name in English, e.g. "France".
    """
    name = country.strip().strip(".").lower()
    # A 135M model's arguments can stutter ("P Peru"): a known name among the words counts.
    capital = CAPITALS.get(name) or next((c for k, c in CAPITALS.items() if k in name.split()), None)
    if capital is None:
        return {"status": "error", "error": f"unknown country {country!r}"}
    return {"status": "success", "country": country, "capital": capital}


def add_numbers(a: float, b: float) -> dict:
    """Adds two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return {"status": "success", "sum": a + b}


root_agent = LlmAgent(
    name="tools",
    model=EngineLlm(model="engine/smollm2-135m-instruct", parallel_tool_calls=False),
    description="Answers with the help of tools.",
    instruction="You answer questions. Use get_capital for capital cities and add_numbers for sums. "
                "When a tool has answered, reply with one sentence that states its result, for example "
                "'The capital of France is Paris.' or 'The sum is 12.'",
    tools=[get_capital, add_numbers],
    before_model_callback=call_tools_then_answer,
    # a 135M model's one-sentence answer can run on into a lecture: 64 tokens hold the sentence
    generate_content_config=types.GenerateContentConfig(max_output_tokens=64),
)
