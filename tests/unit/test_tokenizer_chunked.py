"""`encode_async`: the same ids as `encode`, in windows with yields between, stopping at a limit.

Exactness is a property over arbitrary text and window sizes down to one character, where
every piece boundary, long run and lookahead lands on a window edge somewhere; the yield
and limit tests watch what the event loop and the tokenizer actually did, not the clock.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierflow import tokenizer
from tierflow.tokenizer import CHUNK_CHARS, TokenLimitExceeded, encode, encode_async

# Text made of what the splitter distinguishes: letters, digits, ASCII symbols, every kind
# of whitespace, non-ASCII letters and symbols, and runs of each.
_ATOMS = st.sampled_from(
    ["a", "Z", "word", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "0", "12", "12345",
     ".", ",", "'s", "é", "δ", "中", "😀", "!?", "\x0b", "\x1c"]
)
_TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(_ATOMS, max_size=80).map("".join),
    st.lists(st.tuples(_ATOMS, st.integers(1, 40)), max_size=8).map(lambda runs: "".join(a * k for a, k in runs)),
)


@settings(max_examples=400, deadline=None)
@given(text=_TEXT, window=st.integers(1, 24))
def test_windows_give_exactly_the_pieces_of_one_pass(text: str, window: int) -> None:
    steps = list(tokenizer._piece_steps(text, window))
    assert [p for step in steps for p in step] == tokenizer._PIECE.findall(text)


@settings(max_examples=100, deadline=None)
@given(text=_TEXT, window=st.integers(1, 24))
def test_encode_async_equals_encode(text: str, window: int) -> None:
    assert asyncio.run(encode_async(text, chunk_chars=window)) == encode(text)


def test_a_long_prompt_equals_encode_with_the_default_window() -> None:
    text = ("The quick brown fox, 12345 times: naïve δ-jumps!\n\n  " * 4000) + "a" * 50_000 + " " * 30_000 + "end"
    assert len(text) > 20 * CHUNK_CHARS
    assert asyncio.run(encode_async(text)) == encode(text)


async def test_the_loop_runs_between_windows() -> None:
    """Another task gets the loop many times while a long text is tokenized, in the
    middle of the work as well as after it."""
    text = "lorem ipsum dolor sit amet, 42 " * 20_000  # 620,000 characters
    turns = 0
    done = False
    turns_while_working = 0

    async def other() -> None:
        nonlocal turns, turns_while_working
        while not done:
            turns += 1
            await asyncio.sleep(0)
        turns_while_working = turns

    task = asyncio.create_task(other())
    await asyncio.sleep(0)
    ids = await encode_async(text)
    done = True
    await task
    assert ids == encode(text)
    windows = len(text) // CHUNK_CHARS
    assert turns_while_working >= windows // 2, (turns_while_working, windows)


async def test_one_huge_word_is_still_cut_into_steps() -> None:
    """A run of letters longer than many windows is one piece, but finding its end takes
    a yield per window, not one long regex call."""
    text = "x" + "a" * (40 * CHUNK_CHARS) + " b"
    steps = list(tokenizer._piece_steps(text, CHUNK_CHARS))
    assert len(steps) >= 40
    assert [p for step in steps for p in step] == tokenizer._PIECE.findall(text) == [text[:-2], " b"]


async def test_a_limit_stops_early_with_the_count_so_far() -> None:
    text = "one two three four " * 100_000  # 400,000 tokens
    with pytest.raises(TokenLimitExceeded) as raised:
        await encode_async(text, limit=1000)
    exc = raised.value
    assert exc.limit == 1000 and 1000 < exc.found < 2 * CHUNK_CHARS  # one window past the limit, not the whole text
    assert "more than 1000 tokens" in str(exc)
    assert isinstance(exc, ValueError)


@pytest.mark.parametrize("chunk_chars", [3, CHUNK_CHARS])  # windowed, and the one-block path for short text
async def test_the_limit_is_inclusive(chunk_chars: int) -> None:
    text = "alpha beta gamma delta"
    n = len(encode(text))
    assert await encode_async(text, limit=n, chunk_chars=chunk_chars) == encode(text)
    with pytest.raises(TokenLimitExceeded) as raised:
        await encode_async(text, limit=n - 1, chunk_chars=chunk_chars)
    assert raised.value.found > n - 1


async def test_a_bad_window_is_refused() -> None:
    with pytest.raises(ValueError, match="chunk_chars"):
        await encode_async("x", chunk_chars=0)


def test_huge_pieces_are_not_cached() -> None:
    word = "q" * 100_000
    assert encode(word) == encode(word)
    assert word not in tokenizer._piece_ids
