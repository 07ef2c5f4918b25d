"""The protocol types shared by the server and the synthesis client (clara/openai_protocol.py)."""

import pytest
from pydantic import ValidationError

from clara.openai_protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    OpenAIError,
    error_body,
    sse_event,
)


def request(**fields):
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "q"}], **fields}
    )


def test_a_request_reads_stop_and_the_token_limit():
    assert request(stop="x").stop_strings() == ["x"]
    assert request(stop=["a", "b"]).stop_strings() == ["a", "b"]
    assert request().stop_strings() == []
    assert request(max_tokens=5).token_limit() == 5
    assert request(max_completion_tokens=7, max_tokens=5).token_limit() == 7


@pytest.mark.parametrize(
    "fields, param",
    [({"foo": 1}, "foo"), ({"messages": []}, "messages"), ({"temperature": -1}, "temperature"), ({"n": 2}, "n")],
)
def test_a_bad_request_becomes_a_400_naming_the_field(fields, param):
    with pytest.raises(ValidationError) as caught:
        request(**fields)
    error = OpenAIError.from_validation(caught.value)
    assert error.status == 400 and error.param == param and not error.retryable
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_responses_ignore_fields_they_do_not_know():
    body = {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "system_fingerprint": "x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    assert ChatCompletion.model_validate(body).choices[0].message.content == "a"
    chunk = ChatCompletionChunk(id="c1", created=1, model="m", choices=[{"delta": {"content": "b"}}])
    assert sse_event(chunk).startswith('data: {"id":"c1"') and sse_event(chunk).endswith("\n\n")


@pytest.mark.parametrize(
    "status, retryable", [(429, True), (500, True), (503, True), (400, False), (401, False), (403, False), (404, False)]
)
def test_errors_are_classified_by_status(status, retryable):
    error = OpenAIError.from_response(status, '{"error": {"message": "m", "type": "t"}}')
    assert (error.retryable, error.fatal) == (retryable, not retryable)
    assert error.message == "m" and error.type == "t"


def test_an_error_page_that_is_not_json_is_kept_as_text():
    error = OpenAIError.from_response(502, b"<html>Bad gateway</html>")
    assert error.retryable and "Bad gateway" in error.message and error.type == "server_error"
    assert error_body("m")["error"] == {"message": "m", "type": "invalid_request_error", "param": None, "code": None}
