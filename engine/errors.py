"""The engine's typed errors: the API layers map each one the same way (HTTP 503 / 500,
ADK's UNAVAILABLE / INTERNAL). A bad request is a ValueError (400, INVALID_ARGUMENT)."""


class EngineDeadError(RuntimeError):
    """The step thread has died or was shut down; the engine accepts no more requests."""


class RequestFailedError(RuntimeError):
    """The step running this request raised; the engine itself keeps serving."""
