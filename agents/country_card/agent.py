"""output_schema on the local model: the final answer is JSON of `CountryCard`, guaranteed.

The engine turns the schema into the reply's grammar, so the answer always parses and
validates; ADK stores it in session state under `card`. The agent calls its tool first
(adk_backend.tool_policy) and writes the card from the tool's result.
"""
from typing import Literal

from adk_backend.tool_policy import call_tools_then_answer
from google.adk.agents import LlmAgent
from pydantic import BaseModel, Field

COUNTRIES = {"france": ("Paris", "Europe", 68), "japan": ("Tokyo", "Asia", 124), "kenya": ("Nairobi", "Africa", 56),
             "peru": ("Lima", "South America", 34), "canada": ("Ottawa", "North America", 41),
             "egypt": ("Cairo", "Africa", 114), "norway": ("Oslo", "Europe", 6), "australia": ("Canberra", "Oceania", 27)}


class CountryCard(BaseModel):
    country: str = Field(description="The country's name in English.")
    capital: str = Field(description="Its capital city.")
    continent: Literal["Africa", "Asia", "Europe", "North America", "South America", "Oceania"]
    population_millions: int


def lookup_country(country: str) -> dict:
    """Looks up a country's capital, continent and population.

    Args:
        country: The country's name in English, e.g. "France".
    """
    facts = COUNTRIES.get(country.strip().lower())
    if facts is None:
        return {"status": "error", "error": f"unknown country {country!r}"}
    capital, continent, population = facts
    return {"status": "success", "country": country, "capital": capital, "continent": continent,
            "population_millions": population}


root_agent = LlmAgent(
    name="country_card",
    model="engine/smollm2-135m-instruct",
    description="Answers with a country card in JSON.",
    instruction="The user names a country. Use lookup_country, then describe the country from what it returns.",
    tools=[lookup_country],
    output_schema=CountryCard,
    output_key="card",
    before_model_callback=call_tools_then_answer,
)
