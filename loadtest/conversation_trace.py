"""Write conversation-shaped traffic in Mooncake's trace format: four shapes of session, by `--shape`.

`loadtest/mooncake_like_trace.py` writes one shape (Mooncake's tool & agent hour). Placement
must also win on traffic it was not tuned to, so this writes others, each from a
structure rather than from target figures: the prompt sizes and the prefix reuse are what
the structure yields, printed by `tierflow.workload.trace_stats` so a reader sees them.

- `conversation`: chat conversations, many at once. Each turn's prompt is the previous
  prompt, the previous answer and a new user message, so each turn extends the previous
  turn's blocks. Openings are lognormal (a question, or a pasted document: median 3k
  tokens, a heavy tail), follow-ups short with an occasional attachment; turns are
  geometric (mean 3.3, a third single-turn); the gap between turns is lognormal (median
  30 s, p99 ~10 min: seconds to minutes); a conversation ends at its 128k context. Three
  in four open with one of 8 shared system prompts (one 512-token block).
- `tool-agent`: an agent works a task in hops seconds apart (tool latency, median 2 s):
  a shared system and tools prefix per agent template (24 templates, 2-10 blocks, Zipf
  popularity), a task, then per hop the agent's call and the tool's result appended.
- `coding`: code completion: one request per session, a shared IDE system prompt (one
  block, 3 of them) and the session's own code (median 1.8k tokens), tiny outputs
  (median 16 tokens). Little reuse beyond the system prompt.
- `chat`: single or few-turn chat (mean 1.7 turns, at most 4) under 4 shared system
  prompts (1-3 blocks).

Every session's rows go to one model (`model` column: llama-3.1-8b or gpt-oss-20b, one
each, drawn per session), so the model is sticky per conversation. `--no-model-column`
leaves it out (plain Mooncake rows): the spec's `mix` then picks the model per sticky
key (`loadtest/specs/conversation.yaml`: the first two blocks, as the held-out replays
did), and a conversation whose first turn is shorter than two blocks may change model
between turns. `--sessions` writes each row's session (`session_id`): the router then
sees the conversation (session affinity); without it every row is its own session, as
in a Mooncake trace.

Sessions arrive as a Poisson process from `lead` seconds before the trace's start (the
shape's typical session length), and only rows from 0 on are written: the trace opens
in steady state, mid-conversation, as a slice of production traffic does (a first row
of a conversation that began earlier reuses nothing in the trace). `--rate` is the
requests per second aimed at: sessions start at rate / (the shape's mean turns), so
the rate written is close to it but not exact (context limits end some sessions early).
The default rates (conversation 3.3, tool-agent 4, coding 10, chat 5 requests a second)
are a light load on `loadtest/fleets/conversation-16.yaml`: round-robin saturates it
at about 10, 20, 50 and 20 times them (`loadtest/placement_suite.py` finds where).

Hash ids are Mooncake's: consecutive integers per distinct 512-token block, the last
(partial) block included, so a turn shares the full blocks of the turn before it, and
sessions share their template's blocks.

    .venv/bin/python loadtest/conversation_trace.py --shape conversation -o loadtest/out/conversation.jsonl
        [--hours 1 | --minutes 10] [--rate 3.3] [--seed 7] [--no-model-column] [--sessions]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec
import numpy as np
from mooncake_like_trace import HashIds  # this directory is on sys.path when run or imported as a script
from tierflow.workload.trace_export import write_trace
from tierflow.workload.trace_stats import TraceStats, trace_stats
from tierflow.workload.traces import TraceRow

__all__ = ["BLOCK", "MAX_CONTEXT", "MODELS", "SHAPES", "Shape", "for_file", "generate", "main", "row_stats"]

BLOCK: Final = 512
MAX_CONTEXT: Final = 131_072  # the fleet's ss131072 configuration: prompt + output must fit
MODELS: Final = ("llama-3.1-8b", "gpt-oss-20b")


def _lognormal(rng: np.random.Generator, median: float, sigma: float, low: int = 1, high: int = MAX_CONTEXT) -> int:
    return int(min(max(rng.lognormal(math.log(median), sigma), low), high))


@dataclass
class _Session:
    """One session's prompt as it grows: its full blocks' ids and its length in tokens."""

    name: str
    model: str
    blocks: list[int]
    length: int
    rows: list[tuple[float, TraceRow]]

    def send(self, ids: HashIds, t: float, output: int) -> bool:
        """Add a request at `t` with the prompt as it stands; False (nothing sent) once it would pass the context."""
        if self.length + output > MAX_CONTEXT:
            return False
        full = self.length // BLOCK
        self.blocks += ids.fresh(full - len(self.blocks))  # the blocks this turn filled are new text
        partial = ids.fresh(1) if self.length % BLOCK else []  # the last, partial block is this request's own
        row = TraceRow(
            timestamp=round(t * 1000.0), input_length=self.length, output_length=output,
            hash_ids=self.blocks + partial, model=self.model, session_id=self.name,
        )  # fmt: skip
        self.rows.append((t, row))
        return True


def _templates(rng: np.random.Generator, ids: HashIds, count: int, low: int, high: int) -> tuple[list[list[int]], np.ndarray]:
    """`count` shared prefixes of `low`..`high` whole blocks, and their Zipf(1.1) popularity."""
    blocks = [ids.fresh(int(rng.integers(low, high + 1))) for _ in range(count)]
    popularity = 1.0 / np.arange(1, count + 1) ** 1.1
    return blocks, popularity / popularity.sum()


# A shape runs one session from its start: (rng, ids, session, start) -> None, appending rows.
_Run = Callable[[np.random.Generator, HashIds, _Session, float], None]


@dataclass(frozen=True)
class Shape:
    """A kind of traffic: how its sessions open and run, how many requests a session
    makes on average (`mean_turns`, to turn a request rate into a session rate), how long
    before the trace's start sessions begin (`lead_s`), and its default rate."""

    name: str
    opening: Callable[[np.random.Generator, HashIds], tuple[list[int], int]]  # shared blocks, own tokens
    run: _Run
    mean_turns: float
    lead_s: float
    rate: float  # requests per second by default


# --------------------------------------------------------------------------- conversation


def _conversation_opening(rng: np.random.Generator, ids: HashIds, systems: list[list[int]], popularity: np.ndarray) -> tuple[list[int], int]:
    system = systems[int(rng.choice(len(systems), p=popularity))] if rng.random() < 0.75 else []
    return list(system), _lognormal(rng, 3000.0, 1.5, high=MAX_CONTEXT // 2)


def _conversation_run(rng: np.random.Generator, ids: HashIds, session: _Session, start: float) -> None:
    t = start
    for _ in range(int(rng.geometric(0.3))):
        answer = _lognormal(rng, 400.0, 0.8, high=8192)
        if not session.send(ids, t, answer):
            return  # the context is full: the conversation ends
        message = _lognormal(rng, 120.0, 1.0, high=16_384)
        if rng.random() < 0.08:  # an attachment: a file or a pasted page
            message += _lognormal(rng, 6000.0, 1.0, high=65_536)
        session.length += answer + message
        t += float(rng.lognormal(math.log(30.0), 1.3))


# --------------------------------------------------------------------------- tool-agent


def _agent_run(rng: np.random.Generator, ids: HashIds, session: _Session, start: float) -> None:
    t = start
    for _ in range(min(int(rng.geometric(0.15)), 40)):
        call = _lognormal(rng, 90.0, 0.7, high=2048)
        if not session.send(ids, t, call):
            return
        session.length += call + _lognormal(rng, 700.0, 1.1, high=32_768)  # the agent's call, then the tool's result
        t += float(rng.lognormal(math.log(2.0), 0.8))


# --------------------------------------------------------------------------- coding, chat


def _coding_run(rng: np.random.Generator, ids: HashIds, session: _Session, start: float) -> None:
    session.send(ids, start, _lognormal(rng, 16.0, 0.8, high=256))


def _chat_run(rng: np.random.Generator, ids: HashIds, session: _Session, start: float) -> None:
    t = start
    for _ in range(min(int(rng.geometric(0.6)), 4)):
        answer = _lognormal(rng, 350.0, 0.7, high=4096)
        if not session.send(ids, t, answer):
            return
        session.length += answer + _lognormal(rng, 250.0, 1.0, high=8192)
        t += float(rng.lognormal(math.log(20.0), 0.9))


def _shapes() -> dict[str, Callable[[np.random.Generator, HashIds], Shape]]:
    """Each shape's factory: it draws the shape's shared prefixes (ids first, so a seed fixes them)."""

    def conversation(rng: np.random.Generator, ids: HashIds) -> Shape:
        systems, popularity = _templates(rng, ids, 8, 1, 1)
        return Shape("conversation", lambda r, i: _conversation_opening(r, i, systems, popularity), _conversation_run, 1 / 0.3, 1800.0, 3.3)

    def tool_agent(rng: np.random.Generator, ids: HashIds) -> Shape:
        templates, popularity = _templates(rng, ids, 24, 2, 10)

        def opening(r: np.random.Generator, i: HashIds) -> tuple[list[int], int]:
            return list(templates[int(r.choice(len(templates), p=popularity))]), _lognormal(r, 1500.0, 0.9, high=32_768)

        return Shape("tool-agent", opening, _agent_run, 1 / 0.15, 120.0, 4.0)

    def coding(rng: np.random.Generator, ids: HashIds) -> Shape:
        systems, popularity = _templates(rng, ids, 3, 1, 1)

        def opening(r: np.random.Generator, i: HashIds) -> tuple[list[int], int]:
            return list(systems[int(r.choice(len(systems), p=popularity))]), _lognormal(r, 1800.0, 0.6, high=16_384)

        return Shape("coding", opening, _coding_run, 1.0, 0.0, 10.0)

    def chat(rng: np.random.Generator, ids: HashIds) -> Shape:
        systems, popularity = _templates(rng, ids, 4, 1, 3)

        def opening(r: np.random.Generator, i: HashIds) -> tuple[list[int], int]:
            return list(systems[int(r.choice(len(systems), p=popularity))]), _lognormal(r, 250.0, 1.0, high=8192)

        return Shape("chat", opening, _chat_run, 1 / 0.6, 120.0, 5.0)

    return {"conversation": conversation, "tool-agent": tool_agent, "coding": coding, "chat": chat}


_FACTORIES: Final = _shapes()
SHAPES: Final = tuple(_FACTORIES)


def default_rate(shape: str) -> float:
    """The shape's default requests per second."""
    return _FACTORIES[shape](np.random.default_rng(0), HashIds()).rate


def _starts(rng: np.random.Generator, rate: float, lead_s: float, seconds: float) -> list[float]:
    """Poisson session starts at `rate` per second over [-lead_s, seconds)."""
    gaps = rng.exponential(1.0 / rate, size=int(rate * (lead_s + seconds) * 1.2) + 100)
    starts = np.cumsum(gaps) - lead_s
    while starts[-1] < seconds:  # rare: the draw fell short of the span
        starts = np.append(starts, starts[-1] + np.cumsum(rng.exponential(1.0 / rate, size=starts.size)))
    return starts[starts < seconds].tolist()


def generate(shape: str, seconds: float, seed: int = 7, rate: float | None = None) -> list[TraceRow]:
    """The rows of `seconds` of `shape` traffic at about `rate` requests per second (the
    shape's default when None), by arrival; every row names its model and session."""
    if shape not in _FACTORIES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    ids = HashIds()
    kind = _FACTORIES[shape](np.random.default_rng([seed, 1]), ids)
    session_rate = (kind.rate if rate is None else rate) / kind.mean_turns
    rows: list[tuple[float, int, TraceRow]] = []
    for n, start in enumerate(_starts(np.random.default_rng([seed, 0]), session_rate, kind.lead_s, seconds)):
        rng = np.random.default_rng([seed, 2, n])  # a session's own stream: the same session n at every rate
        shared, own = kind.opening(rng, ids)
        session = _Session(f"{shape}-{n}", MODELS[int(rng.integers(len(MODELS)))], shared, len(shared) * BLOCK + own, [])
        kind.run(rng, ids, session, start)
        rows += [(t, n, row) for t, row in session.rows if 0.0 <= t < seconds]
    rows.sort(key=lambda r: (r[0], r[1]))
    return [row for _, _, row in rows]


def for_file(rows: Sequence[TraceRow], *, model_column: bool = True, sessions: bool = False) -> list[TraceRow]:
    """The rows as written: without the model column (`model_column=False`: plain Mooncake,
    the spec's mix picks) and without sessions unless `sessions` (the router sees none)."""
    return [msgspec.structs.replace(row, model=row.model if model_column else "", session_id=row.session_id if sessions else "") for row in rows]


def row_stats(rows: Sequence[TraceRow], *, per_model: bool = True) -> TraceStats:
    """`trace_stats` of the rows; `per_model`: prefix reuse within each row's model only
    (what a fleet can reach when a model's cache holds only its own rows)."""
    return trace_stats(
        np.array([r.timestamp / 1000.0 for r in rows], dtype=np.float64),
        np.array([r.input_length for r in rows], dtype=np.int64),
        np.array([r.output_length for r in rows], dtype=np.int64),
        [tuple(r.hash_ids) for r in rows],
        [r.model for r in rows] if per_model else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="conversation")
    parser.add_argument("-o", "--out", type=Path, default=None, help="default: loadtest/out/<shape>.jsonl")
    span = parser.add_mutually_exclusive_group()
    span.add_argument("--hours", type=float, default=None)
    span.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--rate", type=float, default=None, help="requests per second aimed at (default: the shape's)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-model-column", dest="model_column", action="store_false", help="plain Mooncake rows: the spec's mix picks models")
    parser.add_argument("--sessions", action="store_true", help="write session_id, so the router sees each conversation")
    args = parser.parse_args()
    seconds = args.minutes * 60.0 if args.minutes is not None else (args.hours if args.hours is not None else 1.0) * 3600.0
    out = args.out or Path("loadtest/out") / f"{args.shape}.jsonl"
    rows = generate(args.shape, seconds, args.seed, args.rate)
    if not rows:
        parser.error("no request arrives in that span: give more --minutes or a higher --rate")
    write_trace(for_file(rows, model_column=args.model_column, sessions=args.sessions), out)
    stats, blind = row_stats(rows), row_stats(rows, per_model=False)
    tokens = stats.input_tokens
    print(
        f"wrote {out}: {args.shape}, {stats.requests:,} requests over {stats.span_s:,.0f} s ({stats.rate_mean or 0:.2f}/s, "
        f"peak {stats.rate_peak}/s), {len({r.session_id for r in rows}):,} sessions; prompt tokens mean {tokens.mean:,.0f} "
        f"p50 {tokens.p50:,.0f} p99 {tokens.p99:,.0f} max {tokens.max:,}; output mean {stats.output_tokens.mean:,.0f}; "
        f"reusable share {blind.prefix_reuse:.1%} (within each session's model: {stats.prefix_reuse:.1%})"
    )
    print(msgspec.json.encode(stats).decode())


if __name__ == "__main__":
    main()
