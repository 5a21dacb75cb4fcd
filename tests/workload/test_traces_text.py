"""A trace row's prompt: exact token counts, shared text where hash_ids are shared, and the reuse an unbounded cache sees."""

from __future__ import annotations

import random

import pytest

from tierflow.rdu import block_hashes
from tierflow.tokenizer import encode, render_chat
from tierflow.workload.conversation import Conversation
from tierflow.workload.sessions import CallPlan, SessionPlan
from tierflow.workload.trace_stats import prefix_reuse
from tierflow.workload.trace_text import HEAD_TOKENS, TAIL_TOKENS, TEMPLATE_TOKENS, TracePrompt, message_ids, prompt_text, prompt_token_ids


def _plan(prompt: TracePrompt) -> SessionPlan:
    return SessionPlan("r1", "t", "k", None, "trace", 0.0, "", (CallPlan(0, "m", "", "", 4),), 0.0, task_prompt=prompt)


def test_the_chat_template_costs_13_tokens() -> None:
    assert (HEAD_TOKENS, TAIL_TOKENS, TEMPLATE_TOKENS) == (6, 7, 13)
    assert len(encode(render_chat([("user", "")]))) == TEMPLATE_TOKENS


@pytest.mark.parametrize("tokens", [13, 14, 63, 64, 512, 518, 519, 520, 1030, 4096, 9001])
def test_a_prompt_has_exactly_the_rows_tokens_and_encodes_to_its_ids(tokens: int) -> None:
    prompt = TracePrompt(tokens, (3, 1, 4), row=7, space=11)
    ids = prompt_token_ids(prompt)
    assert len(ids) == tokens
    conversation = Conversation.for_plan(_plan(prompt))
    assert conversation.prompt_tokens("") == tokens and conversation.prompt_token_ids("") == ids
    messages = conversation.messages("")
    assert messages == [{"role": "user", "content": prompt_text(prompt)}]
    assert encode(render_chat([(m["role"], m["content"]) for m in messages])) == ids  # what the router will count
    assert ids[: len(message_ids(prompt))] == message_ids(prompt)


def test_a_task_prompt_conversation_grows_like_any_other() -> None:
    prompt = TracePrompt(700, (1,), row=1, space=0)
    conversation = Conversation.for_plan(_plan(prompt))
    conversation.record(CallPlan(0, "m", "", "", 3), " ba be bi")
    chat = [(m["role"], m["content"]) for m in conversation.messages("")]
    assert conversation.prompt_token_ids("") == encode(render_chat(chat))


def _blocks(prompt: TracePrompt) -> list[int]:
    return block_hashes(prompt_token_ids(prompt), 64)


def test_rows_share_text_exactly_over_their_shared_hash_ids() -> None:
    a = _blocks(TracePrompt(2000, (5, 6, 7, 8), row=1, space=0))
    b = _blocks(TracePrompt(2000, (5, 6, 9, 10), row=2, space=0))
    assert a[:16] == b[:16] and a[16] != b[16]  # 2 shared 512-token blocks = 16 of the cache's 64-token blocks
    longer = _blocks(TracePrompt(3000, (5, 6, 7, 8, 11, 12), row=3, space=0))
    assert longer[:31] == a[:31]  # a's text ends at 1993: its 31 full blocks of text are a prefix of the longer row's
    assert _blocks(TracePrompt(2000, (5, 6, 7, 8), row=1, space=1))[0] != a[0]  # another space (replica, seed) shares nothing
    assert _blocks(TracePrompt(2000, (), row=1, space=0))[0] != _blocks(TracePrompt(2000, (), row=2, space=0))[0]  # no ids: own text


def test_known_reuse_answers() -> None:
    # B shares its first two 512-token blocks with A: 1024 of B's tokens are cached.
    assert prefix_reuse([1100, 1100], [(1, 2, 3), (1, 2, 4)]) == (1024, 2200)
    # An identical prompt: all but the block holding the last token (599 // 64 = 9 blocks).
    assert prefix_reuse([600, 600], [(7, 8), (7, 8)]) == (576, 1200)
    # The same ids in another space (another model or replica) share nothing.
    assert prefix_reuse([600, 600], [(7, 8), (7, 8)], [("a", 0), ("b", 0)]) == (0, 1200)
    # Chained: a shared second block after a different first one is no hit.
    assert prefix_reuse([1100, 1100], [(1, 2, 3), (9, 2, 3)]) == (0, 2200)


def _brute_force(prompts: list[TracePrompt]) -> tuple[int, int]:
    """What the emulator's prefix cache does with these exact prompts, never evicting."""
    seen: set[int] = set()
    cached = total = 0
    for prompt in prompts:
        hashes = _blocks(prompt)
        hits = 0
        for h in hashes[: (prompt.tokens - 1) // 64]:
            if h not in seen:
                break
            hits += 1
        cached, total = cached + hits * 64, total + prompt.tokens
        seen.update(hashes)
    return cached, total


def test_reuse_from_hash_ids_equals_the_caches_count_on_the_synthesized_prompts() -> None:
    rng = random.Random(3)
    lengths = [13, 14, 63, 64, 70, 71, 127, 128, 512, 518, 519, 520, 575, 576, 1024, 1030, 1031, 1100]
    for _ in range(150):
        trunks = [[rng.randrange(5) for _ in range(6)] for _ in range(3)]
        prompts = []
        for row in range(rng.randrange(1, 20)):
            tokens = rng.choice(lengths) + rng.choice([0, 0, rng.randrange(600)])
            blocks = -(-tokens // 512)
            shared = rng.randrange(blocks + 1)
            ids = (rng.choice(trunks)[:shared] + [rng.randrange(100, 200) for _ in range(blocks)])[:shared]
            prompts.append(TracePrompt(tokens, tuple(ids), row=row, space=rng.randrange(2)))
        spaces = [p.space for p in prompts]
        assert prefix_reuse([p.tokens for p in prompts], [p.hash_ids for p in prompts], spaces) == _brute_force(prompts)
