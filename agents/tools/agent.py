"""An agent with deterministic function tools, on the local model."""
import adk_backend  # noqa: F401  (registers the engine/ models)
from google.adk.agents import LlmAgent

CAPITALS = {"france": "Paris", "japan": "Tokyo", "italy": "Rome", "kenya": "Nairobi", "peru": "Lima",
            "canada": "Ottawa", "egypt": "Cairo", "norway": "Oslo"}


def get_capital(country: str) -> dict:
    """Returns the capital city of a country.

    Args:
        country: The country's name in English, e.g. "France".
    """
    capital = CAPITALS.get(country.strip().lower())
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
    model="engine/smollm2-135m-instruct",
    description="Answers with the help of tools.",
    instruction="You answer questions. Use get_capital for capital cities and add_numbers for sums, "
                "then answer in one sentence.",
    tools=[get_capital, add_numbers],
)
