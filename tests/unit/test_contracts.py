"""Wire contracts: loud on missing fields, tolerant of unknown ones, subjects in one place."""

from __future__ import annotations

import pathlib
import re

import msgspec
import pytest

from tierflow.contracts import messages, subjects

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_missing_required_field_names_it() -> None:
    with pytest.raises(msgspec.ValidationError, match="prompt_token_ids"):
        messages.generate_decoder.decode(b'{"request_id": "r", "model": "m", "max_tokens": 3}')


def test_unknown_fields_are_tolerated_for_rolling_upgrades() -> None:
    hb = messages.heartbeat_decoder.decode(b'{"node_id": "n1", "from_the_future": 42}')
    assert hb.node_id == "n1" and hb.role == "decode"


def test_stream_events_round_trip_through_the_tagged_union() -> None:
    events = [
        messages.Accepted(request_id="r", node_id="n"),
        messages.Tokens(request_id="r", index=0, token_ids=[1, 2], text=" a b"),
        messages.Finished(request_id="r", finish_reason="length", prompt_tokens=3, completion_tokens=2),
        messages.Failed(request_id="r", code="x", message="y", retryable=True),
    ]
    for event in events:
        assert messages.stream_decoder.decode(messages.encoder.encode(event)) == event


def test_limits_are_checked_on_decode() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$.max_tokens"):
        messages.generate_decoder.decode(b'{"request_id": "r", "model": "m", "prompt_token_ids": [], "max_tokens": -1}')


def test_subject_tokens_are_validated() -> None:
    assert subjects.check_token("decode-0", "node id") == "decode-0"
    with pytest.raises(ValueError, match="node id"):
        subjects.check_token("bad.id", "node id")


def test_no_subject_is_spelled_outside_contracts() -> None:
    """A subject is `tierflow.<area>.<verb>...` (three or more tokens) or `$SRV.*`."""
    subject_literal = re.compile(r"""["'](tierflow\.(?!services\.|v1\.)[a-z_]+\.[a-z_*>]+|\$SRV\.)""")
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("services", "libs")
        for path in (REPO / folder).rglob("*.py")
        if "contracts" not in path.parts and subject_literal.search(path.read_text())
    ]
    assert not offenders, f"subjects spelled outside libs/contracts: {offenders}"
