"""Flight: one admitted request settled exactly once, over a real ledger (memory store), no HTTP."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from proxy.config import Model
from proxy.pricing import Usage
from proxy.endpoints import ENDPOINTS
from proxy.ledger import Amounts, Ledger, Scope
from proxy.policy import parse
from proxy.settlement import Flight
from proxy.stores.memory import MemoryStore
from proxy.tasks import Tasks

MODEL = Model("gpt-4o", "openai", "gpt-4o", 2.5, 10.0, (), cached_input_per_million=1.25)
CLAUDE = Model("claude-sonnet-4-5", "anthropic", "claude-sonnet-4-5", 3.0, 15.0, (), kind="anthropic")
SCOPES = (Scope("global", "*"), Scope("org", "acme"))
PROMPT = 100


@pytest.fixture
async def ledger():
    policy = parse({"version": 1, "defaults": {"org": {"day": {"tokens": 10_000}}},
                    "reservation": {"lease_seconds": 60}}, "test-policy")
    yield Ledger(MemoryStore(), policy)


async def admitted(ledger: Ledger, tasks: Tasks, reserve: int = 1000, endpoint: str = "chat") -> Flight:
    res = await ledger.reserve("r1", Amounts(reserve, MODEL.cost(reserve, 0)), SCOPES)
    return Flight(ledger, tasks, res, MODEL, ENDPOINTS[endpoint], PROMPT, lambda text: len(text.split()))


async def org_day(ledger: Ledger, tasks: Tasks, unit: str = "tokens") -> tuple[int, int]:
    await asyncio.wait(tasks.pending(), timeout=5) if len(tasks) else None
    b = next(b for b in await ledger.snapshot(SCOPES)
             if b.scope.type == "org" and b.window == "day" and b.unit == unit)
    return b.used, b.reserved


async def test_a_commit_prices_every_token_kind_at_its_rate(ledger):
    tasks = Tasks()
    f = await admitted(ledger, tasks)
    f.settle_body(b'{"choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 10, '
                  b'"prompt_tokens_details": {"cached_tokens": 600}}}')
    assert await org_day(ledger, tasks) == (1010, 0)
    assert await org_day(ledger, tasks, "usd") == (400 * 2.5 + 600 * 1.25 + 10 * 10, 0)   # 1850 micro-USD
    logged = (await ledger.settlements())[0]          # the log has the breakdown, reasoning apart
    assert (logged.prompt_tokens, logged.cached_tokens, logged.completion_tokens, logged.reasoning_tokens,
            logged.usd_micro) == (1000, 600, 10, 0, 1850)


async def test_a_cut_anthropic_stream_is_charged_its_exact_input_and_an_output_estimate(ledger):
    tasks = Tasks()
    res = await ledger.reserve("r1", Amounts(5000, 100_000), SCOPES)
    f = Flight(ledger, tasks, res, CLAUDE, ENDPOINTS["messages"], PROMPT, len)
    start = {"input_tokens": 30, "cache_read_input_tokens": 2000, "cache_creation_input_tokens": 0,
             "output_tokens": 1}
    f.settle_stream(SimpleNamespace(usage=None, partial=start, error=None, output_chunks=3, output_chars=40))
    assert await org_day(ledger, tasks) == (2030 + 10, 0)               # not the estimated prompt (100)
    logged = (await ledger.settlements())[0]
    assert (logged.prompt_tokens, logged.cached_tokens, logged.completion_tokens) == (2030, 2000, 10)
    assert await org_day(ledger, tasks, "usd") == (30 * 3 + 2000 * 0.3 + 10 * 15, 0)   # reads at 0.1x


async def test_a_responses_body_without_usage_is_charged_its_counted_output(ledger):
    tasks = Tasks()
    res = await ledger.reserve("r1", Amounts(1000, 10_000), SCOPES)
    f = Flight(ledger, tasks, res, MODEL, ENDPOINTS["responses"], PROMPT, lambda t: len(t.split()))
    f.settle_body(b'{"output": [{"type": "message", "content": [{"type": "output_text", "text": "one two"}]},'
                  b' {"type": "function_call", "name": "f", "arguments": "three"}], "usage": null}')
    assert await org_day(ledger, tasks) == (PROMPT + 3, 0)


async def test_a_flight_settles_once_whatever_is_asked_after(ledger):
    tasks = Tasks()
    f = await admitted(ledger, tasks)
    f.commit_soon(Usage(input=100, output=20))
    f.commit_soon(Usage(input=100, output=500))          # a second path: ignored
    f.release_soon()
    f.ensure_settled()
    assert await org_day(ledger, tasks) == (120, 0)


async def test_last_resort_charges_the_prompt_once_sent_and_releases_before(ledger):
    tasks = Tasks()
    f = await admitted(ledger, tasks)
    f.ensure_settled()                           # never sent: nothing to pay
    assert await org_day(ledger, tasks) == (0, 0)
    res = await ledger.reserve("r2", Amounts(1000, 1), SCOPES)
    g = Flight(ledger, tasks, res, MODEL, ENDPOINTS["chat"], PROMPT, len)
    g.mark_sent()
    g.ensure_settled()
    assert await org_day(ledger, tasks) == (PROMPT, 0)


async def test_a_stream_without_usage_is_charged_its_prompt_and_an_output_estimate(ledger):
    tasks = Tasks()
    f = await admitted(ledger, tasks)
    f.settle_stream(SimpleNamespace(usage=None, error=None, output_chunks=3, output_chars=40))
    assert await org_day(ledger, tasks) == (PROMPT + 10, 0)        # max(3 chunks, ceil(40 / 4))


async def test_an_upstream_error_before_any_output_releases(ledger):
    tasks = Tasks()
    f = await admitted(ledger, tasks)
    f.settle_stream(SimpleNamespace(usage=None, error={"message": "boom"}, output_chunks=0, output_chars=0))
    assert await org_day(ledger, tasks) == (0, 0)


async def test_a_body_is_charged_its_reported_usage_else_its_counted_output(ledger):
    tasks = Tasks()
    f = await admitted(ledger, tasks)
    f.settle_body(b'{"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}}')
    assert await org_day(ledger, tasks) == (12, 0)
    res = await ledger.reserve("r2", Amounts(1000, 1), SCOPES)
    g = Flight(ledger, tasks, res, MODEL, ENDPOINTS["chat"], PROMPT, lambda t: len(t.split()))
    g.settle_body(b'{"choices": [{"message": {"content": "four words right here"}}]}')
    assert await org_day(ledger, tasks) == (12 + PROMPT + 4, 0)


async def test_a_large_answer_is_settled_from_its_usage_without_parsing_the_rest(ledger, monkeypatch):
    # An embeddings answer of ~8 MB: its usage (last, as OpenAI writes it) is read alone.
    import proxy.settlement as settlement
    parsed = []
    real = settlement.json.loads
    monkeypatch.setattr(settlement.json, "loads", lambda text: parsed.append(len(text)) or real(text))
    tasks = Tasks()
    f = await admitted(ledger, tasks, endpoint="embedding")
    vectors = ",".join('{"object":"embedding","index":%d,"embedding":[%s]}' % (i, ",".join(["0.0123"] * 1536))
                       for i in range(700))
    data = f'{{"object":"list","data":[{vectors}],"model":"m","usage":{{"prompt_tokens":70,"total_tokens":70}}}}'
    f.settle_body(data.encode())
    assert await org_day(ledger, tasks) == (70, 0)
    assert len(data) > 5_000_000 and all(n < 100 for n in parsed)      # the whole never went to json.loads


@pytest.mark.parametrize("body, tokens", [
    # Not the top level's: a `usage` nested in the output, or inside a string, is never read.
    (b'{"choices": [{"message": {"content": "four words right here"}}], "x": {"usage": {"prompt_tokens": 9, '
     b'"completion_tokens": 9}}}', PROMPT + 4),
    (b'{"choices": [{"message": {"content": "a \\"usage\\": {\\"prompt_tokens\\": 9}"}}]}', PROMPT + 4),
    # The top-level one, wherever it sits: not last, or far from the end (the whole is parsed).
    (b'{"usage": {"prompt_tokens": 7, "completion_tokens": 5}, "choices": []}', 12),
    (b'{"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}, "pad": "' + b"p" * 40_000 + b'"}', 12),
    # A later duplicate wins, as a full parse would have it.
    (b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "usage": {"prompt_tokens": 7, '
     b'"completion_tokens": 5}}', 12),
    # A usage the endpoint cannot read: the output is counted instead, as before.
    (b'{"choices": [{"message": {"content": "two words"}}], "usage": {"prompt_tokens": "x"}}', PROMPT + 2),
])
async def test_only_the_top_level_usage_of_an_answer_is_charged(ledger, body, tokens):
    tasks = Tasks()
    res = await ledger.reserve("r1", Amounts(1000, 1), SCOPES)
    f = Flight(ledger, tasks, res, MODEL, ENDPOINTS["chat"], PROMPT, lambda t: len(t.split()))
    f.settle_body(body)
    assert await org_day(ledger, tasks) == (tokens, 0)


async def test_the_lease_is_extended_while_the_flight_is_open(ledger, monkeypatch):
    tasks = Tasks()
    monkeypatch.setattr(type(ledger.policy), "lease_seconds", property(lambda self: 0.3))
    f = await admitted(ledger, tasks)
    first = f.res.deadline_ms
    await asyncio.sleep(0.25)                    # a third of the lease: one extension at least
    assert f.res.deadline_ms > first
    f.release_soon()
    tasks.closing.set()
    assert await org_day(ledger, tasks) == (0, 0)


async def test_the_first_renewal_follows_the_lease_the_reservation_holds(ledger):
    # Reserved under a 3 s lease; a reload to 60 s lands before the flight is built. Renewing a
    # third of the new lease in (20 s) would let the 3 s lease lapse first: the sweeper would
    # settle a live request.
    tasks = Tasks()
    ledger.policy = parse({"version": 1, "defaults": {"org": {"day": {"tokens": 10_000}}},
                           "reservation": {"lease_seconds": 3}}, "test-policy")
    res = await ledger.reserve("r1", Amounts(100, 1), SCOPES)
    ledger.policy = parse({"version": 1, "defaults": {"org": {"day": {"tokens": 10_000}}},
                           "reservation": {"lease_seconds": 60}}, "test-policy")
    f = Flight(ledger, tasks, res, MODEL, ENDPOINTS["chat"], PROMPT, len)
    await asyncio.sleep(2.4)                  # a third of 3 s, a tick late at most, slack for a loaded machine
    assert f.res.deadline_ms > res.deadline_ms      # renewed before the 3 s lease ran out
    f.settle_body(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}')
    await asyncio.wait(tasks.pending(), timeout=5)


# --- a settlement's store call: the first attempt direct, the others retried -------------------

USAGE_BODY = b'{"usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}'


def flaky_ledger(policy, failures: int) -> Ledger:
    """A memory store whose first `failures` commits and releases find the store away."""
    from proxy.errors import StoreUnavailable

    class Flaky(MemoryStore):
        left = failures

        def _away(self) -> None:
            if self.left:
                self.left -= 1
                raise StoreUnavailable("down for a moment")

        async def commit(self, *args, **kwargs):
            self._away()
            return await super().commit(*args, **kwargs)

        async def release(self, *args, **kwargs):
            self._away()
            return await super().release(*args, **kwargs)
    return Ledger(Flaky(), policy)


@pytest.mark.parametrize("settle", ["commit", "release"])
async def test_a_settlement_is_tried_as_often_as_retry_says_whatever_fails_first(ledger, monkeypatch, settle):
    from proxy import retry
    monkeypatch.setattr(retry, "backoff", lambda attempt: 0)
    for failures, stored in ((retry.ATTEMPTS - 1, True), (retry.ATTEMPTS, False)):
        flaky = flaky_ledger(ledger.policy, failures)
        tasks = Tasks()
        f = await admitted(flaky, tasks)
        f.settle_body(USAGE_BODY) if settle == "commit" else f.release_soon()
        await org_day(flaky, tasks)
        assert flaky.store.left == 0
        assert (await flaky.open_reservations() == []) is stored, (failures, stored)
