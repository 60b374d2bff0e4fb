"""The error model: bodies in OpenAI's shape, statuses the `openai` SDK maps to the right exception."""

from __future__ import annotations

import httpx
import openai
import pytest

from frontend.errors import (
    APIError,
    engine_unavailable,
    internal_error,
    invalid_request,
    model_not_found,
    overloaded,
    too_large,
    unauthorized,
)


def test_body_has_exactly_openai_fields() -> None:
    err = APIError("bad", status=400, param="temperature", code="x")
    assert err.body() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "temperature", "code": "x"}
    }
    assert str(err) == "bad"


@pytest.mark.parametrize(
    ("err", "status", "type_", "param", "code"),
    [
        (invalid_request("nope", "n"), 400, "invalid_request_error", "n", None),
        (model_not_found("gpt-x"), 404, "invalid_request_error", "model", "model_not_found"),
        (unauthorized(), 401, "authentication_error", None, "invalid_api_key"),
        (too_large(1024), 413, "invalid_request_error", None, "request_too_large"),
        (overloaded(3), 503, "server_error", None, "overloaded"),
        (engine_unavailable("no engine is live"), 503, "server_error", None, "engine_unavailable"),
        (internal_error("req-42"), 500, "server_error", None, "internal_error"),
    ],
)
def test_constructors(err: APIError, status: int, type_: str, param: str | None, code: str | None) -> None:
    assert (err.status, err.type, err.param, err.code) == (status, type_, param, code)
    assert err.body()["error"]["message"] == err.message


def test_messages_say_what_matters() -> None:
    assert model_not_found("gpt-x").message == "The model `gpt-x` does not exist."
    assert "1024" in too_large(1024).message
    assert "3 seconds" in overloaded(3).message
    message = internal_error("req-42").message
    assert "req-42" in message and "Traceback" not in message


@pytest.mark.parametrize(
    ("err", "sdk_class"),
    [
        (invalid_request("nope"), openai.BadRequestError),
        (unauthorized(), openai.AuthenticationError),
        (model_not_found("m"), openai.NotFoundError),
        (too_large(10), openai.APIStatusError),
        (overloaded(1), openai.InternalServerError),
        (internal_error("r"), openai.InternalServerError),
    ],
)
def test_openai_sdk_maps_each_error(err: APIError, sdk_class: type[openai.APIStatusError]) -> None:
    """Serve the error through a mock transport and check which exception the real client raises."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(err.status, json=err.body())

    client = openai.OpenAI(
        api_key="k",
        base_url="http://test/v1",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )
    with pytest.raises(sdk_class) as caught:
        client.completions.create(model="m", prompt="hi")
    assert caught.value.status_code == err.status
    assert caught.value.message.endswith(err.message) or err.message in str(caught.value)
    if err.code is not None:
        assert caught.value.code == err.code
