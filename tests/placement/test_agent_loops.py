"""Agent-loop policing, pure: a session's steps against its tenant's policy (tierflow.placement.agent_loops).

The loops here send what an agent sends: the same system prompt, then a history that
grows every step, hashed into 512-token block ids as the router hashes them.
"""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import pytest

from tierflow.contracts import subjects
from tierflow.placement import TenantConfigError, TenantDirectory
from tierflow.placement.agent_loops import (
    BLOCK_TOKENS,
    WATCH,
    AgentLoopPolicy,
    AgentLoopTracker,
    RunawayPolicy,
    Verdict,
    _common_blocks,
    _sample,
)
from tierflow.rdu.kvcache import block_hashes
from tierflow.runtime.errors import PermissionDenied

REPO = Path(__file__).resolve().parents[2]
SESSION = "acme/agent-1"


class Loop:
    """An agent loop: a system prompt, then `growth` more tokens of history every step."""

    def __init__(self, *, system: int = 1000, growth: int = 1000, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.ids = [rng.randrange(50_000) for _ in range(system)]
        self.growth = growth
        self._rng = rng

    def step(self) -> tuple[int, list[int]]:
        """The next prompt's size and block ids (then its history grows)."""
        n = len(self.ids)
        hashes = block_hashes(self.ids, BLOCK_TOKENS)
        self.ids += [self._rng.randrange(50_000) for _ in range(self.growth)]
        return n, hashes


def run(tracker: AgentLoopTracker, policy: AgentLoopPolicy, loop: Loop, steps: int, *, completion: int = 0, session: str = SESSION,
        now: float = 0.0) -> list[tuple[int, Verdict | None]]:  # fmt: skip
    """`steps` steps of `loop`, each settled with `completion` tokens unless refused."""
    out = []
    for i in range(steps):
        n, hashes = loop.step()
        verdict = tracker.check(session, policy, n, hashes, now + i)
        if verdict is None or verdict.error is None:
            tracker.settle(session, completion)
        out.append((n, verdict))
    return out


def test_a_growing_loop_is_capped_at_exactly_max_steps_with_the_policy_named() -> None:
    tracker = AgentLoopTracker()
    policy = AgentLoopPolicy(max_steps=10, runaway=None)
    results = run(tracker, policy, Loop(growth=300), 13)
    assert [v for _, v in results[:10]] == [None] * 10
    refused = [v for _, v in results[10:]]
    assert all(v is not None and isinstance(v.error, PermissionDenied) for v in refused)
    first = refused[0]
    assert first is not None and first.error is not None
    assert (first.limit, first.action, first.event, first.steps) == ("max_steps", "reject", "capped", 11)
    assert first.error.http_status == 403 and first.error.code == "agent_loop_limit"
    assert "agent_loops.max_steps is 10 and this would be step 11" in first.error.message
    assert "'agent-1' of tenant 'acme'" in first.error.message
    assert [v.event for v in refused if v is not None] == ["capped", "", ""]  # said once
    assert tracker.snapshot(SESSION)["steps"] == 10  # type: ignore[index]  # a refused step is not counted


def test_a_growing_loop_is_capped_at_exactly_the_token_budget() -> None:
    budget, completion = 40_000, 150
    tracker = AgentLoopTracker()
    policy = AgentLoopPolicy(max_session_tokens=budget, runaway=None)
    results = run(tracker, policy, Loop(system=800, growth=700), 20, completion=completion)
    used, expected_refusal = 0, None
    for i, (n, _) in enumerate(results):  # the rule, written out: a prompt that would take the session past the budget
        if used + n > budget:
            expected_refusal = i
            break
        used += n + completion
    assert expected_refusal is not None
    assert all(v is None for _, v in results[:expected_refusal])
    verdict = results[expected_refusal][1]
    assert verdict is not None and verdict.error is not None and verdict.limit == "max_session_tokens"
    assert f"agent_loops.max_session_tokens is 40,000; the session has used {used:,}" in verdict.error.message
    assert tracker.snapshot(SESSION)["tokens"] == used <= budget + completion  # type: ignore[index]
    assert all(v is not None and v.error is not None for _, v in results[expected_refusal:])


def test_one_prompt_over_max_prompt_tokens_is_refused_but_shorter_ones_pass() -> None:
    tracker = AgentLoopTracker()
    policy = AgentLoopPolicy(max_prompt_tokens=2000, runaway=None)
    assert tracker.check(SESSION, policy, 2000, [], 0.0) is None
    verdict = tracker.check(SESSION, policy, 2001, [], 1.0)
    assert verdict is not None and verdict.error is not None and "agent_loops.max_prompt_tokens is 2,000 and this prompt has 2,001" in verdict.error.message
    assert tracker.check(SESSION, policy, 1500, [], 2.0) is None


def _reference_runaway_step(loop: Loop, steps: int, rule: RunawayPolicy) -> int:
    """The first step (0-based) the runaway rule flags, from full hash lists (no sampling)."""
    sizes, shares, prev = [], [], []
    for i in range(steps):
        n, hashes = loop.step()
        common = 0
        while common < min(len(prev), len(hashes)) and prev[common] == hashes[common]:
            common += 1
        share = min(1.0, common * BLOCK_TOKENS / n)
        k = rule.window
        if len(sizes) >= k and (n - sizes[-k]) / k > rule.min_growth and all(s >= rule.min_repeated for s in [*shares[-(k - 1):], share]):
            return i
        sizes.append(n)
        shares.append(share)
        prev = hashes
    raise AssertionError("never flagged")


def test_the_runaway_detector_flags_a_loop_re_sending_a_growing_history_and_warn_only_warns() -> None:
    rule = RunawayPolicy()
    expected = _reference_runaway_step(Loop(growth=900), 30, rule)
    tracker = AgentLoopTracker()
    results = run(tracker, WATCH, Loop(growth=900), 30, completion=100)
    flagged = [i for i, (_, v) in enumerate(results) if v is not None]
    assert flagged[0] == expected and 8 <= expected <= 20  # defaults: a loop must go on a while
    assert flagged == list(range(expected, 30))  # and stays flagged while it goes on
    assert all(v is not None and v.error is None and v.action == "warn" for _, v in results[expected:])  # warn never refuses
    first = results[expected][1]
    assert first is not None
    assert first.event == "flagged" and [v.event for _, v in results[expected + 1:] if v is not None] == [""] * (29 - expected)
    assert first.header.startswith(f"runaway; action=warn; steps={expected + 1}; tokens=")
    assert first.growth == pytest.approx(900) and first.repeated >= 0.8 and "growth=900; repeated=0.9" in first.header
    assert tracker.snapshot(SESSION)["steps"] == 30  # type: ignore[index]


def test_a_runaway_under_reject_is_refused_naming_the_detector() -> None:
    tracker = AgentLoopTracker()
    policy = AgentLoopPolicy(max_steps=100, runaway=RunawayPolicy(window=4, min_growth=500, min_repeated=0.7))
    results = run(tracker, policy, Loop(growth=1200), 20)
    refused = next(i for i, (_, v) in enumerate(results) if v is not None)
    verdict = results[refused][1]
    assert verdict is not None and verdict.error is not None and verdict.error.code == "agent_loop_limit"
    assert "agent_loops.runaway: the prompt grew 1,200 tokens a step over the last 4 steps (limit 500)" in verdict.error.message
    # A shorter prompt (the agent summarized and started over under the same id) is served again.
    assert tracker.check(SESSION, policy, 800, block_hashes(list(range(800)), BLOCK_TOKENS), 100.0) is None


def test_runaway_may_warn_while_the_limits_reject() -> None:
    tracker = AgentLoopTracker()
    policy = AgentLoopPolicy(max_steps=12, action="reject", runaway=RunawayPolicy(window=3, min_growth=500, min_repeated=0.6, action="warn"))
    results = run(tracker, policy, Loop(growth=1500), 14)
    kinds = [(v.limit, v.action, v.event) if v is not None else None for _, v in results]
    first_warn = kinds.index(("runaway", "warn", "flagged"))
    assert all(k == ("runaway", "warn", "") for k in kinds[first_warn + 1 : 12])
    assert kinds[12] == ("max_steps", "reject", "capped") and kinds[13] == ("max_steps", "reject", "")


def test_summarize_serves_a_short_prompt_and_refuses_a_long_one() -> None:
    tracker = AgentLoopTracker()
    policy = AgentLoopPolicy(max_steps=5, action="summarize", summarize_below=0.5, runaway=None)
    loop = Loop(system=1000, growth=1000)
    results = run(tracker, policy, loop, 6)
    assert [v for _, v in results[:5]] == [None] * 5
    peak = results[4][0]  # 5000 tokens
    verdict = results[5][1]
    assert verdict is not None and verdict.error is not None
    assert verdict.error.code == "summarization_required" and verdict.error.http_status == 403 and verdict.event == "capped"
    assert f"a prompt of at most {peak // 2:,} tokens (50% of the session's longest, {peak:,})" in verdict.error.message
    # Short, but not short enough: still refused (said once).
    again = tracker.check(SESSION, policy, peak // 2 + 1, [], 10.0)
    assert again is not None and again.error is not None and again.error.code == "summarization_required" and again.event == ""
    # The summarization step: served, and the session's budget starts afresh.
    summary = tracker.check(SESSION, policy, peak // 2, [], 11.0)
    assert summary is not None and summary.error is None and summary.limit == "summarized" and summary.header.startswith("summarized; ")
    assert tracker.snapshot(SESSION) == {"steps": 1, "tokens": peak // 2, "peak": peak // 2}
    for i in range(4):
        assert tracker.check(SESSION, policy, peak // 2 + 100 * i, [], 12.0 + i) is None
    over = tracker.check(SESSION, policy, peak, [], 20.0)
    assert over is not None and over.error is not None and over.event == "capped"  # a new budget: said again


def test_summarize_refuses_a_first_prompt_over_the_limit_saying_to_send_a_shorter_one() -> None:
    tracker = AgentLoopTracker()
    policy = AgentLoopPolicy(max_prompt_tokens=4000, action="summarize", runaway=None)
    verdict = tracker.check(SESSION, policy, 5000, [], 0.0)
    assert verdict is not None and verdict.error is not None and verdict.error.code == "summarization_required"
    assert "agent_loops.max_prompt_tokens is 4,000 and this prompt has 5,000): this prompt alone is over it" in verdict.error.message
    assert tracker.check(SESSION, policy, 3000, [], 1.0) is None


def test_memory_is_bounded_by_capacity_and_idle_time() -> None:
    tracker = AgentLoopTracker(capacity=100, idle_s=60.0)
    for i in range(1000):
        tracker.check(f"acme/s{i}", WATCH, 600, [i], i * 0.01)
    assert len(tracker) == 100
    assert "acme/s0" not in tracker and "acme/s899" not in tracker and "acme/s900" in tracker and "acme/s999" in tracker
    tracker.check("acme/s950", WATCH, 700, [], 20.0)  # active again
    tracker.check("acme/late", WATCH, 700, [], 75.0)  # > 60 s after s0..s999 started: they are forgotten ...
    assert len(tracker) == 2 and "acme/s950" in tracker  # ... but s950 spoke at 20 s
    tracker.check("acme/later", WATCH, 700, [], 200.0)
    assert len(tracker) == 1
    # A forgotten session starts from nothing.
    capped = AgentLoopTracker(idle_s=60.0)
    policy = AgentLoopPolicy(max_steps=1, runaway=None)
    assert capped.check(SESSION, policy, 10, [], 0.0) is None
    assert capped.check(SESSION, policy, 10, [], 1.0) is not None
    assert capped.check(SESSION, policy, 10, [], 100.0) is None


def test_a_long_prompt_keeps_a_bounded_sample_and_the_repeated_share_is_a_close_lower_bound() -> None:
    rng = random.Random(1)
    ids = [rng.randrange(50_000) for _ in range(200 * BLOCK_TOKENS)]
    prev = block_hashes(ids, BLOCK_TOKENS)
    cur = block_hashes(ids[: 150 * BLOCK_TOKENS] + [7] * (60 * BLOCK_TOKENS), BLOCK_TOKENS)
    sample, stride = _sample(prev)
    assert len(sample) <= 32 and stride == 7
    assert 150 - stride <= _common_blocks(sample, stride, cur) <= 150
    assert _common_blocks(prev, 1, cur) == 150  # short prompts: exact
    assert _common_blocks(prev, 1, prev[:10]) == 10 and _common_blocks(prev, 1, []) == 0


def _agentic_steps() -> list[tuple[str, float, int, list[int], int]]:
    """Every call of the held-in agentic spec's 15 minutes, in session order: (session,
    time, prompt tokens, block ids, completion), built as the load generator builds them
    (`plan_sessions`, the conversation of `SessionRun`, replies of max_tokens: ignore_eos)."""
    from tierflow.sim.client import SessionRun
    from tierflow.workload.sessions import CallPlan, plan_sessions
    from tierflow.workload.spec import load_spec

    calls = []
    for plan in plan_sessions(load_spec(REPO / "loadtest/specs/agentic.yaml")):
        run_, now = SessionRun(plan), plan.start
        while (step := run_.next_step()) is not None:
            if isinstance(step, CallPlan):
                ids = run_.conversation.prompt_token_ids(step.system_text)
                calls.append((f"{plan.tenant}/{plan.session_key}", now, len(ids), block_hashes(ids, BLOCK_TOKENS), step.max_tokens))
                run_.record_reply(step.max_tokens)
                now += 2.0
            else:
                run_.conversation.record(step, step.output_text)
                now += step.latency_s
    return calls


def test_the_held_in_agentic_spec_is_never_flagged_under_the_defaults() -> None:
    calls = _agentic_steps()
    sessions = {c[0] for c in calls}
    assert len(sessions) > 400 and len(calls) > 1000
    longest = max(sum(1 for c in calls if c[0] == s) for s in sessions)
    assert longest == 5  # the coding agent's five calls
    policies = {
        "watch": WATCH,
        "default": AgentLoopPolicy(),  # reject, the detector's defaults
        "window as long as its sessions": AgentLoopPolicy(runaway=RunawayPolicy(window=longest - 1)),
    }
    for name, policy in policies.items():
        tracker = AgentLoopTracker()
        flagged = []
        for session, now, n, hashes, completion in calls:
            verdict = tracker.check(session, policy, n, hashes, now)
            if verdict is not None:
                flagged.append((session, verdict))
            tracker.settle(session, completion)
        assert flagged == [], name


def test_policies_are_read_from_the_tenants_configuration_with_errors_naming_the_field() -> None:
    directory = TenantDirectory.from_config({"tenants": [{
        "name": "acme", "api_keys": ["sk-acme"],
        "agent_loops": {"max_steps": 50, "max_session_tokens": 2_000_000, "action": "summarize", "runaway": {"window": 6, "action": "warn"}},
    }, {"name": "off", "agent_loops": {"runaway": None, "action": "warn"}}]})  # fmt: skip
    policy = directory.tenants["acme"].policy.agent_loops
    assert policy is not None and policy.runaway == RunawayPolicy(window=6, action="warn") and policy.action == "summarize"
    off = directory.tenants["off"].policy.agent_loops
    assert off is not None and off.inert and not WATCH.inert
    with pytest.raises(TenantConfigError, match=r"tenants\[0\] \('acme'\).*agent_loops.runaway.window"):
        TenantDirectory.from_config({"tenants": [{"name": "acme", "agent_loops": {"runaway": {"window": 1}}}]})
    with pytest.raises(TenantConfigError, match="agent_loops.action"):
        TenantDirectory.from_config({"tenants": [{"name": "acme", "agent_loops": {"action": "cap"}}]})
    assert msgspec.convert({}, AgentLoopPolicy) == AgentLoopPolicy()


def test_each_tenant_has_its_own_event_subject() -> None:
    names = ["acme", "a.b", "a_b", "a_db", "a__b", "x" * 64, "_" * 64]
    tokens = [subjects.tenant_token(n) for n in names]
    assert len(set(tokens)) == len(names) and tokens[0] == "acme"
    assert subjects.agent_loop_events("a.b") == "tierflow.events.agent_loop.a_db"
    assert all("." not in subjects.agent_loop_events(n)[len("tierflow.events.agent_loop."):] for n in names)
