"""A trace's own statistics, beside what its replay sent and what the run measured.

Every report of a replay opens with three columns of the same figures, so a reader sees
at once that the replay matches its source:

- `source`: the trace's rows in the replayed window, in the trace's own seconds;
- `sent`: the requests the replay planned, in run seconds (after `speed` and `rate_scale`:
  rates are the source's times speed times rate_scale, token counts the same);
- `measured`: what the run's records say was sent and served.

Prefix reuse is counted in the unit the emulator measures, `cached prompt tokens /
prompt tokens`, for a cache that never evicts: a request's cached tokens are its leading
64-token blocks (`tierflow.rdu.DEFAULT_BLOCK_SIZE`) that an earlier request's prompt
already held, chained (a block counts only after its whole prefix does), at most
(prompt - 1) // 64 blocks (the last prompt token is always computed), and blocks are
shared only within one model and one prefix space (seed and replica). The prompt is the
one a replay sends (`trace_text`): the chat template's 6 head tokens open block 0 and
its 7 tail tokens end the prompt, so a row's text ends 7 tokens before its length. Two
rows agree on a 512-token trace block when their leading `hash_ids` agree up to it;
past its ids a row's text is its own. With one node per model and requests that never
overlap, a simulated replay's measured hit rate equals this figure exactly (a test
checks it); on a real fleet it is the ceiling a prefix-aware placement can reach.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import msgspec
import numpy as np
import numpy.typing as npt

from tierflow.workload.trace_text import TAIL_TOKENS, TRACE_BLOCK_TOKENS

__all__ = ["CACHE_BLOCK_TOKENS", "TokenStats", "TraceStats", "TraceSummary", "prefix_reuse", "trace_stats", "measured_stats"]

CACHE_BLOCK_TOKENS = 64  # the emulator's KV block (tierflow.rdu.DEFAULT_BLOCK_SIZE); not imported, so workload stays free of rdu
_SUBBLOCKS = TRACE_BLOCK_TOKENS // CACHE_BLOCK_TOKENS


class TokenStats(msgspec.Struct, frozen=True):
    """Tokens per request: percentiles (numpy linear), mean and max; None without requests."""

    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    mean: float | None = None
    max: int | None = None


class TraceStats(msgspec.Struct, frozen=True, kw_only=True):
    """One column of the trace table (see the module docstring).

    `span_s`: first arrival to last; `rate_mean`: requests / span_s (None for a span of
    0); `rate_peak`: the most requests in one second, seconds counted from the first
    arrival; `prefix_reuse`: cached / prompt tokens with an unbounded cache (measured:
    the run's own cached / prompt tokens over ok requests).
    """

    requests: int
    span_s: float
    rate_mean: float | None
    rate_peak: int
    input_tokens: TokenStats
    output_tokens: TokenStats
    prefix_reuse: float | None


class TraceSummary(msgspec.Struct, frozen=True, kw_only=True):
    """The trace a report replayed, and how (the `trace` section of a `Report`).

    `file_rows` / `file_span_s`: the whole file; `window_start_s` / `window_s`: the part
    replayed, in trace seconds (window_s None: to the end); `zero_output_rows`: rows of
    the window not sent because they asked for no output tokens (a failed request in the
    trace: no request can ask for 0); `padded_rows`: rows shorter than the chat template
    (13 tokens), sent with the template's length; `models`: requests sent per fleet model.
    """

    file: str
    format: str
    origin: str
    file_rows: int
    file_span_s: float
    window_start_s: float
    window_s: float | None
    speed: float
    rate_scale: float
    zero_output_rows: int
    padded_rows: int
    models: dict[str, int]
    source: TraceStats
    sent: TraceStats
    measured: TraceStats | None = None


def _tokens(values: npt.NDArray[np.int64]) -> TokenStats:
    if values.size == 0:
        return TokenStats()
    p50, p95, p99 = np.percentile(values, (50.0, 95.0, 99.0), method="linear")
    return TokenStats(p50=float(p50), p95=float(p95), p99=float(p99), mean=float(values.mean()), max=int(values.max()))


def _rates(times: npt.NDArray[np.float64]) -> tuple[float, float | None, int]:
    if times.size == 0:
        return 0.0, None, 0
    first = float(times.min())
    span = float(times.max()) - first
    peak = int(np.bincount(np.floor(times - first).astype(np.int64)).max())
    return span, (times.size / span if span > 0 else None), peak


def prefix_reuse(tokens: Sequence[int], hash_ids: Sequence[tuple[int, ...]], spaces: Sequence[Hashable] | None = None) -> tuple[int, int]:
    """(cached tokens, prompt tokens) of requests in arrival order with an unbounded cache.

    `spaces[i]` is request i's prefix space (its model and replica: requests of two
    spaces never share a block); None puts every request in one. The rule is the module
    docstring's; the walk goes per 512-token block, not per 64-token block, so a long
    trace takes a few dict lookups per request:

    - a full 64-token block wholly before the text's end ("pure") is named by the id
      chain of its 512-token block and its place there, so one entry per chain holds how
      many of its leading pure blocks some request has cached;
    - the full block holding the text's end and the template's first tail tokens (there
      is one when the text ends 57 or more tokens into a block) is named by its chain,
      its index and how much text it holds;
    - a block whose text has no id is the row's own: nobody else ever has it.
    """
    depth: dict[int, int] = {}  # id chain -> how many leading pure blocks of its 512-token block are cached
    ends: set[tuple[int, int, int]] = set()  # (chain, block, text tokens in it) of cached end blocks
    cached_total = prompt_total = 0
    for i, prompt in enumerate(tokens):
        prompt_total += prompt
        ids = hash_ids[i]
        text_end = prompt - TAIL_TOKENS  # the head and the words end here
        if text_end <= 0:
            continue
        pure = text_end // CACHE_BLOCK_TOKENS  # full blocks before the text's end
        covered = min(len(ids), -(-text_end // TRACE_BLOCK_TOKENS))  # leading 512-token blocks with text and an id
        chain = hash(spaces[i]) if spaces is not None else 0
        hits = 0
        walking = True  # every block so far was cached
        for k in range(covered):
            chain = hash((chain, ids[k]))
            here = min(_SUBBLOCKS, pure - k * _SUBBLOCKS)
            if here == 0:
                break
            before = depth.get(chain, 0)
            if walking:
                found = min(before, here)
                hits += found
                walking = found == here
            if here > before:
                depth[chain] = here
            if here < _SUBBLOCKS:
                break
        if text_end % CACHE_BLOCK_TOKENS >= CACHE_BLOCK_TOKENS - TAIL_TOKENS and pure // _SUBBLOCKS < covered:
            key = (chain, pure, text_end % CACHE_BLOCK_TOKENS)  # `chain` is the end block's own: the loop stopped there
            if walking and key in ends:
                hits += 1
            ends.add(key)
        cached_total += min(hits, (prompt - 1) // CACHE_BLOCK_TOKENS) * CACHE_BLOCK_TOKENS
    return cached_total, prompt_total


def trace_stats(
    times: npt.NDArray[np.float64],
    input_tokens: npt.NDArray[np.int64],
    output_tokens: npt.NDArray[np.int64],
    hash_ids: Sequence[tuple[int, ...]],
    spaces: Sequence[Hashable] | None = None,
) -> TraceStats:
    """The figures of requests in arrival order (see `prefix_reuse` for `spaces`)."""
    span, mean, peak = _rates(times)
    cached, prompt = prefix_reuse(input_tokens.tolist(), hash_ids, spaces)
    return TraceStats(
        requests=int(times.size), span_s=span, rate_mean=mean, rate_peak=peak,
        input_tokens=_tokens(input_tokens), output_tokens=_tokens(output_tokens),
        prefix_reuse=cached / prompt if prompt else None,
    )  # fmt: skip


def measured_stats(
    sent_at: npt.NDArray[np.float64],
    prompt_tokens: npt.NDArray[np.int64],
    completion_tokens: npt.NDArray[np.int64],
    cached_tokens: npt.NDArray[np.int64],
    ok: npt.NDArray[np.bool_],
) -> TraceStats:
    """The same figures from a run's record columns: every request sent, its prompt and
    the output it got, and the prefix cache's hits over ok requests."""
    span, mean, peak = _rates(sent_at)
    prompt_ok = int(prompt_tokens[ok].sum())
    return TraceStats(
        requests=int(sent_at.size), span_s=span, rate_mean=mean, rate_peak=peak,
        input_tokens=_tokens(prompt_tokens), output_tokens=_tokens(completion_tokens),
        prefix_reuse=int(cached_tokens[ok].sum()) / prompt_ok if prompt_ok else None,
    )  # fmt: skip
