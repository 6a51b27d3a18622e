"""What a request cost: provider usage objects read into one `Usage`, priced by one function.

Pricing is a table. Every token kind is a ROW: a field of `Usage` (how many tokens of that kind)
and the field of the same name in `Rates` (what one token of it costs); `cost` is the sum of the
rows, rounded up once, at the end. A new kind of token is a new row in both tuples, not a branch.

Units: a price of N USD per million tokens is N micro-dollars per token. `Rates` holds it as an
integer number of PICO-dollars (10^-12 USD) per token, fixed once at start-up, so a request's
cost is integer arithmetic: exact, with no float drift (1000 tokens at $2.50/M is 2,500
micro-dollars, never 2,501), rounded up to whole micro-dollars once.

The rows:

- `input`: input tokens neither read from nor written to a prompt cache, at the input price;
- `cached_input`: input read from a prompt cache (`cached_input_per_million`);
- `cache_write`: input written to a cache with the short retention (Anthropic's 5 minutes,
  OpenAI's default 30 minutes; `cache_write_per_million`);
- `cache_write_1h`: input written with the long retention (Anthropic's 1 hour; OpenAI's
  12 hours; `cache_write_1h_per_million`);
- `output`: generated tokens, reasoning included (`reasoning` is part of it, recorded only).

Each provider's usage object says these things differently; the normalizers below read them so
that no token is counted twice or lost:

- OpenAI chat / completions / embeddings: `prompt_tokens` INCLUDES
  `prompt_tokens_details.cached_tokens` (and `cache_write_tokens`); `completion_tokens` includes
  `completion_tokens_details.reasoning_tokens`.
- OpenAI Responses: `input_tokens` INCLUDES `input_tokens_details.cached_tokens` and
  `cache_write_tokens` (split by retention in `cache_write_tokens_details.ttl_30m_tokens` /
  `ttl_12h_tokens`); `output_tokens` includes `output_tokens_details.reasoning_tokens`.
- Anthropic Messages: `input_tokens` EXCLUDES the cache fields; `cache_read_input_tokens` and
  `cache_creation_input_tokens` come on top, the latter split in `cache_creation` into
  `ephemeral_5m_input_tokens` and `ephemeral_1h_input_tokens`; `output_tokens` includes
  `output_tokens_details.thinking_tokens`.

A field that is missing, null, negative or not an integer counts as 0; parts larger than their
whole are clamped to it (an odd upstream can make the charge err high, never count a token twice).
"""

from __future__ import annotations

from operator import mul
from typing import Any, NamedTuple

PICO_PER_MICRO = 1_000_000

# Default rates for a model that does not set them, as multiples of its input price, per
# provider kind. OpenAI: a cached or written token the config prices at nothing in particular is
# charged as plain input (errs high; set `cached_input_per_million` to get the discount), and a
# long-retention write as a short one. Anthropic: its published multipliers (reads 0.1x, 5-minute
# writes 1.25x, 1-hour writes 2x).
DEFAULT_MULTIPLIERS: dict[str, dict[str, float | None]] = {
    "openai": {"cached_input": 1.0, "cache_write": 1.0, "cache_write_1h": None},   # None: as cache_write
    "anthropic": {"cached_input": 0.1, "cache_write": 1.25, "cache_write_1h": 2.0},
}


class Usage(NamedTuple):
    """Tokens of one request by kind. The first five fields are the priced rows (see `Rates`)."""
    input: int = 0              # input neither read from nor written to a cache
    cached_input: int = 0       # read from a prompt cache
    cache_write: int = 0        # written to a cache, short retention
    cache_write_1h: int = 0     # written to a cache, long retention
    output: int = 0             # generated, reasoning included
    reasoning: int = 0          # the part of `output` spent reasoning (recorded, priced as output)

    @property
    def prompt_tokens(self) -> int:
        """All input, cached and written included: what the ledger records as prompt tokens."""
        return self.input + self.cached_input + self.cache_write + self.cache_write_1h

    @property
    def cached_tokens(self) -> int:
        return self.cached_input

    @property
    def completion_tokens(self) -> int:
        return self.output

    @property
    def total_tokens(self) -> int:
        """The tokens charged to token budgets."""
        return self.prompt_tokens + self.output


ROWS = Usage._fields[:5]


class Rates(NamedTuple):
    """Pico-dollars per token for each row of `Usage` (USD per million tokens x 10^6)."""
    input: int
    cached_input: int
    cache_write: int
    cache_write_1h: int
    output: int


assert Rates._fields == ROWS, "every priced row of Usage has exactly one rate"


def cost(usage: Usage, rates: Rates) -> int:
    """Micro-dollars for `usage` at `rates`: the sum of the rows, rounded up once."""
    pico = sum(map(mul, usage, rates))      # zip stops at the last rate: `reasoning` is not a row
    return -(-pico // PICO_PER_MICRO)


def estimate_cost(prompt_tokens: int, completion_tokens: int, rates: Rates) -> int:
    """`cost(estimate(prompt_tokens, completion_tokens), rates)` without building the Usage:
    every plan prices each candidate (1.0 -> 0.3 µs)."""
    return -(-(prompt_tokens * rates.input + completion_tokens * rates.output) // PICO_PER_MICRO)


def pico(usd_per_million: float) -> int:
    """USD per million tokens as integer pico-dollars per token (exact to 6 decimal places)."""
    return round(usd_per_million * PICO_PER_MICRO)


def rates(kind: str, input: float, output: float, cached_input: float | None = None,
          cache_write: float | None = None, cache_write_1h: float | None = None) -> Rates:
    """A model's rates from its prices in USD per million tokens; a price left out (None) takes
    its provider kind's default (see DEFAULT_MULTIPLIERS). Called once per model at start-up."""
    defaults = DEFAULT_MULTIPLIERS[kind]
    base = pico(input)

    def rate(price: float | None, row: str, fallback: int) -> int:
        if price is not None:
            return pico(price)
        multiple = defaults[row]
        return fallback if multiple is None else round(base * multiple)

    read = rate(cached_input, "cached_input", base)
    short = rate(cache_write, "cache_write", base)
    return Rates(base, read, short, rate(cache_write_1h, "cache_write_1h", short), pico(output))


# --- reading usage objects -------------------------------------------------------------------


def _n(obj: Any, name: str) -> int:
    """A token count from a usage object: an int >= 0, else 0."""
    v = obj.get(name) if isinstance(obj, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def _is_count(obj: Any, name: str) -> bool:
    v = obj.get(name) if isinstance(obj, dict) else None
    return isinstance(v, int) and not isinstance(v, bool)


def _split_input(total: int, cached: int, writes: int, long_writes: int, reasoning: int,
                 output: int) -> Usage:
    """A Usage from input totals that INCLUDE the cache reads and writes (OpenAI's way)."""
    cached = min(cached, total)
    writes = min(writes, total - cached)
    long_writes = min(long_writes, writes)
    return Usage(total - cached - writes, cached, writes - long_writes, long_writes, output,
                 min(reasoning, output))


def from_openai(usage: Any) -> Usage | None:
    """An OpenAI chat / completions / embeddings `usage`, or None if `usage` is not one."""
    if not _is_count(usage, "prompt_tokens"):
        return None
    details = usage.get("prompt_tokens_details")
    output = _n(usage, "completion_tokens")
    return _split_input(_n(usage, "prompt_tokens"), _n(details, "cached_tokens"),
                        _n(details, "cache_write_tokens"), 0,
                        _n(usage.get("completion_tokens_details"), "reasoning_tokens"), output)


def from_responses(usage: Any) -> Usage | None:
    """An OpenAI Responses API `usage`, or None if `usage` is not one."""
    if not _is_count(usage, "input_tokens"):
        return None
    details = usage.get("input_tokens_details")
    retention = details.get("cache_write_tokens_details") if isinstance(details, dict) else None
    writes = max(_n(details, "cache_write_tokens"),
                 _n(retention, "ttl_30m_tokens") + _n(retention, "ttl_12h_tokens"))
    output = _n(usage, "output_tokens")
    return _split_input(_n(usage, "input_tokens"), _n(details, "cached_tokens"), writes,
                        _n(retention, "ttl_12h_tokens"),
                        _n(usage.get("output_tokens_details"), "reasoning_tokens"), output)


def from_anthropic(usage: Any) -> Usage | None:
    """An Anthropic Messages `usage` (input EXCLUDES the cache fields), or None if not one.

    Cache writes are `cache_creation_input_tokens`, or the sum of the `cache_creation` split if
    that is larger (an inconsistent upstream errs high); the 1-hour part is priced as such and
    the rest as 5-minute writes."""
    if not isinstance(usage, dict) or not (_is_count(usage, "input_tokens") or _is_count(usage, "output_tokens")):
        return None
    split = usage.get("cache_creation")
    long_writes = _n(split, "ephemeral_1h_input_tokens")
    writes = max(_n(usage, "cache_creation_input_tokens"), _n(split, "ephemeral_5m_input_tokens") + long_writes)
    output = _n(usage, "output_tokens")
    return Usage(_n(usage, "input_tokens"), _n(usage, "cache_read_input_tokens"), writes - long_writes,
                 long_writes, output, min(_n(usage.get("output_tokens_details"), "thinking_tokens"), output))


def estimate(prompt_tokens: int, completion_tokens: int) -> Usage:
    """An estimate (or usage we had to count ourselves): all input uncached, the worst case."""
    return Usage(input=prompt_tokens, output=completion_tokens)
