"""OpenAI-style API errors: one exception type carrying the HTTP status and the JSON error body."""

from __future__ import annotations

from typing import Any

# The `openai` SDK picks its exception class from the HTTP status alone (400 BadRequestError,
# 401 AuthenticationError, 404 NotFoundError, 413/503 APIStatusError, 500 InternalServerError),
# so the status is what clients rely on; `type` and `code` follow OpenAI's own service.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error that the route turns into an HTTP response (or an SSE error event) as-is."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"APIError(status={self.status}, type={self.type!r}, param={self.param!r}, message={self.message!r})"


def invalid_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, status=400, type=INVALID_REQUEST, param=param)


def model_not_found(model: str) -> APIError:
    # OpenAI answers an unknown model with 404, type invalid_request_error, code model_not_found.
    return APIError(
        f"The model `{model}` does not exist.",
        status=404,
        type=INVALID_REQUEST,
        param="model",
        code="model_not_found",
    )


def unauthorized() -> APIError:
    return APIError(
        "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
        status=401,
        type=AUTHENTICATION,
        code="invalid_api_key",
    )


def too_large(limit: int) -> APIError:
    return APIError(
        f"Request body too large: the limit is {limit} bytes.",
        status=413,
        type=INVALID_REQUEST,
        code="request_too_large",
    )


def overloaded(retry_after: int) -> APIError:
    return APIError(
        f"The server is overloaded: too many requests are waiting. Retry after {retry_after} seconds.",
        status=503,
        type=SERVER_ERROR,
        code="overloaded",
    )


def choice_error(message: str, status: int | None) -> APIError:
    """A choice that ended with an error: a 4xx is the client's mistake (invalid_request_error), only a
    5xx is the server's. Messages reaching here are public already (the engine client and run_choices
    log the details)."""
    status = status or 500
    return APIError(message, status=status, type=SERVER_ERROR if status >= 500 else INVALID_REQUEST)


ENGINE_LOST_MESSAGE = "The engine serving this request failed or became unreachable. Retry the request."
NO_ENGINE_MESSAGE = "No engine is available to serve this request right now. Retry later."


def engine_unavailable(message: str) -> APIError:
    return APIError(message, status=503, type=SERVER_ERROR, code="engine_unavailable")


def internal_error(request_id: str) -> APIError:
    # Never leak a traceback to the client; the request id lets an operator find it in the logs.
    return APIError(
        f"Internal server error while handling request {request_id}. The details are in the server log.",
        status=500,
        type=SERVER_ERROR,
        code="internal_error",
    )
