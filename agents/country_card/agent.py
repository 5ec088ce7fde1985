"""output_schema on the local model: the final answer is JSON of `CountryCard`, guaranteed.

The engine turns the schema into the reply's grammar, so the answer always parses and
validates; ADK stores it in session state under `card`. The agent calls its tool first
(adk_backend.tool_policy) and writes the card from the tool's result.
"""
from typing import Literal

from adk_backend.tool_policy import call_tools_then_answer
from google.adk.agents import LlmAgent
from pydantic import BaseModel, Field

CAPITALS = {"france": "Paris", "japan": "Tokyo", "italy": "Rome", "kenya": "Nairobi", "peru": "Lima",
            "canada": "Ottawa", "egypt": "Cairo", "norway": "Oslo"}


class CountryCard(BaseModel):
    country: str = Field(description="The country's name in English.")
    capital: str = Field(description="Its capital city.")
    continent: Literal["Africa", "Asia", "Europe", "North America", "South America", "Oceania"]


def get_capital(country: str) -> dict:
    """Returns the capital city of a country.

    Args:
        country: The country's name in English, e.g. "France".
    """
    capital = CAPITALS.get(country.strip().lower())
    if capital is None:
        return {"status": "error", "error": f"unknown country {country!r}"}
    return {"status": "success", "country": country, "capital": capital}


root_agent = LlmAgent(
    name="country_card",
    model="engine/smollm2-135m-instruct",
    description="Answers with a country card in JSON.",
    instruction="The user names a country. Use get_capital to find its capital, then describe the country.",
    tools=[get_capital],
    output_schema=CountryCard,
    output_key="card",
    before_model_callback=call_tools_then_answer,
)
