"""Tests for your function. The image build runs them (tox) unless the build arg
TEST_ENABLED=false is set, e.g. in stack.yml: build_args: {TEST_ENABLED: "false"}.

Importing the handler runs its start-up, so these tests load the real model.
"""

import json
import threading

from .handler import handle


class Event:
    def __init__(self, method="GET", path="/", body=b"", headers=None):
        self.method = method
        self.path = path
        self.body = body
        self.headers = headers or {}
        self.query = {}


class Context:
    hostname = "localhost"

    def __init__(self):
        self.cancelled = threading.Event()


def test_lists_the_model():
    res = handle(Event("GET", "/v1/models"), Context())
    assert res["statusCode"] == 200
    assert res["body"]["data"][0]["object"] == "model"


def test_malformed_json_is_an_openai_error():
    res = handle(Event("POST", "/v1/chat/completions", b"{not json"), Context())
    assert res["statusCode"] == 400
    assert res["body"]["error"]["type"] == "invalid_request_error"


def test_generates_one_token():
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    res = handle(Event("POST", "/v1/chat/completions", json.dumps(body).encode()), Context())
    assert res["statusCode"] == 200
    assert res["body"]["usage"]["completion_tokens"] <= 1
