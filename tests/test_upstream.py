"""Per-provider routes: URLs, credentials and the headers passed each way, by provider kind."""

from __future__ import annotations

from proxy import config
from proxy.upstream import SSE, Route, _forwarded, _route, redacted

ENV = {"OAI": "sk-openai", "ANT": "sk-ant-secret"}
CFG = config.parse({
    "providers": {"oai": {"base_url": "https://api.openai.com/v1/", "api_key_env": "OAI"},
                  "ant": {"base_url": "https://api.anthropic.com", "api_key_env": "ANT", "kind": "anthropic",
                          "anthropic_version": "2024-01-01"}},
    "models": {"m": {"provider": "oai", "input_per_million": 1, "output_per_million": 1}}}, "c.yaml", env=ENV)


def test_an_openai_provider_serves_the_openai_endpoints_below_its_base_url():
    r = _route(CFG.providers["oai"])
    assert dict(r.urls) == {"chat": "https://api.openai.com/v1/chat/completions",
                            "completion": "https://api.openai.com/v1/completions",
                            "embedding": "https://api.openai.com/v1/embeddings",
                            "responses": "https://api.openai.com/v1/responses"}
    assert r.root == "https://api.openai.com/v1" and r.headers["Authorization"] == "Bearer sk-openai"


def test_an_anthropic_provider_gets_its_key_as_x_api_key_and_its_version():
    r = _route(CFG.providers["ant"])
    assert dict(r.urls) == {"messages": "https://api.anthropic.com/v1/messages"}
    assert r.root == "https://api.anthropic.com/v1"
    assert (r.headers["x-api-key"], r.headers["anthropic-version"]) == ("sk-ant-secret", "2024-01-01")
    assert "Authorization" not in r.headers


def test_each_endpoint_has_its_request_head_built_at_start_up():
    r = _route(CFG.providers["ant"])
    head = r.heads["messages", SSE].decode()
    lines = head.split("\r\n")
    assert lines[0] == "POST /v1/messages HTTP/1.1" and lines[1] == "Host: api.anthropic.com"
    assert {"x-api-key: sk-ant-secret", "anthropic-version: 2024-01-01", "Accept: text/event-stream",
            "Accept-Encoding: identity", "Content-Type: application/json"} <= set(lines)
    assert head.endswith("\r\n") and not head.endswith("\r\n\r\n")   # Content-Length follows
    assert "Accept:" not in r.heads["messages", None].decode()
    assert "sk-ant-secret" not in repr(r)


def test_only_anthropic_beta_is_forwarded_from_the_client():
    client = {"anthropic-beta": "x", "x-api-key": "proxy-key", "Authorization": "Bearer proxy-key"}
    assert _forwarded(client) == b"anthropic-beta: x\r\n"
    assert _forwarded({"Authorization": "Bearer proxy-key"}) == b""


def test_a_forwarded_value_cannot_add_headers_of_its_own():
    assert _forwarded({"anthropic-beta": "x\r\nx-api-key: mine"}) == b""


def test_the_proxy_key_is_redacted_from_relayed_errors():
    r = Route({}, "", {}, key="sk-ant-secret")
    assert redacted(r, b'{"message": "bad key sk-ant-secret"}') == b'{"message": "bad key [redacted]"}'


def test_only_the_headers_a_client_relies_on_are_passed_on_whatever_their_case():
    from types import SimpleNamespace

    from multidict import CIMultiDict, CIMultiDictProxy

    from proxy.upstream import passed_headers
    got = CIMultiDictProxy(CIMultiDict([
        ("Content-Type", "application/json"), ("Content-Length", "12"), ("Connection", "keep-alive"),
        ("Set-Cookie", "a=1"), ("Server", "cloudflare"), ("x-request-id", "req_1"), ("X-Request-ID", "req_2"),
        ("openai-processing-ms", "10"), ("x-ratelimit-remaining-tokens", "99"), ("X-RateLimit-Reset", "1s"),
        ("anthropic-ratelimit-requests-limit", "5"), ("x-ratelimiter", "no"), ("retry-after", "3")]))
    for _ in range(2):                                   # the second time from the decisions made the first
        out = passed_headers(SimpleNamespace(headers=list(got.items())))
        assert list(out.items()) == [
            ("Content-Type", "application/json"), ("x-request-id", "req_1"), ("X-Request-ID", "req_2"),
            ("openai-processing-ms", "10"), ("x-ratelimit-remaining-tokens", "99"), ("X-RateLimit-Reset", "1s"),
            ("anthropic-ratelimit-requests-limit", "5"), ("retry-after", "3")]
