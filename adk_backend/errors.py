"""The engine's errors, mapped once for every front end.

A refused request (`ValueError`) is 400, a dead engine (`EngineDeadError`) 503, a failed
step (`RequestFailedError`) 500. /v1 answers with that status in OpenAI's error shape,
LiteLLM raises its `CustomLLMError` with it, and the ADK model raises `EngineModelError`,
which carries it where ADK looks: `code` (as google-genai's `APIError`) and `status_code`
(as LiteLLM's and OpenAI's errors). So ADK's `FallbackModel` moves on for 500/503,
`on_model_error_callback` and `ReflectAndRetryModelPlugin` see every failure, and a 400 is
never retried on another model.
"""
from __future__ import annotations

from engine.errors import EngineDeadError, RequestFailedError

ENGINE_ERRORS = (ValueError, EngineDeadError, RequestFailedError)

# exception class -> (HTTP status, OpenAI error type, google.rpc status name)
_MAPPING = (
    (ValueError, 400, "invalid_request_error", "INVALID_ARGUMENT"),
    (EngineDeadError, 503, "service_unavailable", "UNAVAILABLE"),
    (RequestFailedError, 500, "server_error", "INTERNAL"),
)


def classify(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, OpenAI error type, google.rpc status) of one of ENGINE_ERRORS."""
    for cls, status, openai_type, rpc_status in _MAPPING:
        if isinstance(exc, cls):
            return status, openai_type, rpc_status
    raise TypeError(f"not an engine error: {exc!r}")


class EngineModelError(Exception):
    """What EngineLlm raises: the engine's error with its status."""

    def __init__(self, status_code: int, status: str, message: str) -> None:
        super().__init__(f"{status_code} {status}: {message}")
        self.code = self.status_code = status_code
        self.status, self.message = status, message

    @classmethod
    def of(cls, exc: BaseException) -> "EngineModelError":
        status_code, _, status = classify(exc)
        return cls(status_code, status, str(exc))
