"""Trace files in every format: read whole into columns, or refused naming the file, line and field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tierflow.workload.traces import MAX_PROBLEMS, TraceError, detect_format, load_trace, parse_trace

MOONCAKE = b"""\
{"timestamp": 0, "input_length": 655, "output_length": 52, "hash_ids": [46, 47]}
{"timestamp": 10535, "input_length": 672, "output_length": 26, "hash_ids": [46, 47]}

{"timestamp": 3052, "input_length": 2287, "output_length": 316, "hash_ids": [0, 42, 43, 44, 45]}
"""

AZURE = b"""\
TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,4808,10
2023-11-16 18:15:50.0000000,3180,8
2023-11-16 18:15:46.1805900,110,27
"""

AZURE_2024 = b"""\
TIMESTAMP,ContextTokens,GeneratedTokens
2024-05-10 00:00:00.009930+00:00,2162,5
2024-05-10 02:00:01.509930+02:00,1024,0
"""

BURSTGPT = b"""\
Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
45,ChatGPT,1087,0,1087,Conversation log
118.5,GPT-4,417,30,447,API log
"""

TIERFLOW = b"""\
{"timestamp": 0.0, "input_length": 1207, "output_length": 64, "hash_ids": [18446744073709551615], "model": "llama-3.1-8b", "session_id": "acme:s1", "tenant": "acme"}
{"timestamp": 250.5, "input_length": 40, "output_length": 8, "model": "gpt-oss-20b", "tenant": "acme"}
"""


def test_mooncake_rows_become_sorted_columns_in_seconds() -> None:
    trace = parse_trace(MOONCAKE, source="m.jsonl")
    assert trace.format == "mooncake" and trace.rows == 3 and trace.origin == "0 ms"
    assert trace.time_s.tolist() == [0.0, 3.052, 10.535]  # sorted by arrival; blank lines skipped
    assert trace.line.tolist() == [1, 4, 2]  # each row keeps its line in the file
    assert trace.input_tokens.tolist() == [655, 2287, 672] and trace.output_tokens.tolist() == [52, 316, 26]
    assert trace.hash_ids == [(46, 47), (0, 42, 43, 44, 45), (46, 47)]
    assert trace.model is None and trace.session is None and trace.tenant is None
    assert trace.span_s == 10.535


def test_azure_datetimes_with_seven_fractional_digits_and_zones() -> None:
    trace = parse_trace(AZURE, source="a.csv")
    assert trace.format == "azure" and trace.origin == "2023-11-16 18:15:46.1805900"  # the earliest row, as written
    assert trace.time_s == pytest.approx([0.0, 0.5, 3.81941])
    assert trace.line.tolist() == [4, 2, 3] and trace.input_tokens.tolist() == [110, 4808, 3180]
    assert trace.hash_ids == [(), (), ()] and trace.model is None
    zoned = parse_trace(AZURE_2024, source="b.csv")
    assert zoned.time_s == pytest.approx([0.0, 1.5])  # 02:00:01.5 at +02:00 is 00:00:01.5 UTC
    assert zoned.output_tokens.tolist() == [5, 0]  # kept: the replay decides what a 0-token row means


def test_burstgpt_keeps_its_model_column() -> None:
    trace = parse_trace(BURSTGPT, source="burst.csv")
    assert trace.format == "burstgpt" and trace.origin == "5"
    assert trace.time_s.tolist() == [0.0, 40.0, 113.5]
    assert trace.model == ["ChatGPT", "ChatGPT", "GPT-4"]
    assert trace.output_tokens.tolist() == [18, 0, 30]


def test_tierflow_rows_carry_model_session_tenant_and_64_bit_block_ids(tmp_path: Path) -> None:
    path = tmp_path / "own.jsonl"
    path.write_bytes(TIERFLOW)
    trace = load_trace(path)
    assert trace.format == "tierflow" and trace.source == str(path)
    assert trace.hash_ids == [(2**64 - 1,), ()]
    assert trace.model == ["llama-3.1-8b", "gpt-oss-20b"] and trace.session == ["acme:s1", ""] and trace.tenant == ["acme", "acme"]
    assert trace.time_s == pytest.approx([0.0, 0.2505])


def test_detection_reads_the_first_line_and_a_forced_format_wins() -> None:
    assert detect_format('{"timestamp": 0, "input_length": 5, "output_length": 1}', "x") == "mooncake"
    assert detect_format('{"timestamp": 0, "input_length": 5, "output_length": 1, "model": "m"}', "x") == "tierflow"
    assert detect_format("TIMESTAMP,ContextTokens,GeneratedTokens", "x") == "azure"
    assert detect_format("\ufeffTimestamp,Model,Request tokens,Response tokens,Total tokens,Log Type", "x") == "burstgpt"
    with pytest.raises(ValueError, match="cannot tell the trace format .* give the format"):
        detect_format("a,b,c", "x.csv")
    with pytest.raises(ValueError, match="without `input_length`"):
        detect_format('{"prompt": "hi"}', "x.jsonl")
    forced = parse_trace(TIERFLOW, source="t", format="mooncake")  # Mooncake's reader ignores tierflow's extra columns
    assert forced.format == "mooncake" and forced.model is None and forced.input_tokens.tolist() == [1207, 40]


def _problems(data: bytes, **kw: str) -> list[str]:
    with pytest.raises(TraceError) as info:
        parse_trace(data, source="t.file", **kw)  # type: ignore[arg-type]
    return info.value.problems


def test_malformed_json_rows_name_the_line_and_the_field() -> None:
    data = b"""\
{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}
{"timestamp": 5, "input_length": "long", "output_length": 5}
{"timestamp": -1, "input_length": 10, "output_length": 5}
{"timestamp": 9, "input_length": 100, "output_length": 5, "hash_ids": [1, 2]}
{"timestamp": 9, "input_length": 100, "output_length": 5, "hash_ids": [1, -2]}
{"timestamp": 9, "input_length": 100
{"timestamp": 9, "output_length": 5}
"""
    assert _problems(data) == [
        "t.file:2: field `input_length`: Expected `int`, got `str`",
        "t.file:3: field `timestamp`: Expected `float` >= 0.0",
        "t.file:4: field `hash_ids`: 2 block ids, but input_length 100 fills only 1 block of 512 tokens (is this trace's block size 512?)",
        "t.file:5: field `hash_ids[1]`: Expected `int` >= 0",
        "t.file:6: row: not a JSON object (Input data was truncated)",
        "t.file:7: row: Object missing required field `input_length`",
    ]


def test_malformed_csv_rows_name_the_line_and_the_column() -> None:
    data = AZURE + b"2023-11-16 18:15:51,12.5,3\nyesterday,5,5\n2023-11-16 18:15:52,7\n"
    assert _problems(data) == [
        "t.file:5: column 2 `ContextTokens`: expected a whole number of tokens >= 0, got '12.5'",
        "t.file:6: column 1 `TIMESTAMP`: expected a date and time like 2023-11-16 18:15:46.6805900, got 'yesterday'",
        "t.file:7: column 3 `GeneratedTokens`: expected a whole number of tokens >= 0, got nothing (the row is short)",
    ]
    assert _problems(b"Timestamp,Request tokens,Response tokens\n1,2,3\n", format="burstgpt") == [
        "t.file:1: header: no column 'Model' for the burstgpt format (columns: Timestamp, Request tokens, Response tokens)"
    ]


def test_a_file_with_many_bad_rows_lists_the_first_ones_and_counts_the_rest() -> None:
    data = b"Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n" + b"x,ChatGPT,1,1,2,API log\n" * (MAX_PROBLEMS + 7)
    with pytest.raises(TraceError) as info:
        parse_trace(data, source="b.csv")
    assert len(info.value.problems) == MAX_PROBLEMS and info.value.more == 7
    assert str(info.value).endswith("... and 7 more malformed rows")


def test_unusable_files(tmp_path: Path) -> None:
    assert _problems(b"") == ["t.file: cannot tell the trace format from its first line ''; expected JSON lines with input_length "
                              "(mooncake, tierflow) or a CSV header with TIMESTAMP, ContextTokens, GeneratedTokens (azure) or Timestamp, "
                              "Request tokens, Response tokens (burstgpt); or give the format (--format)"]  # fmt: skip
    assert _problems(b"TIMESTAMP,ContextTokens,GeneratedTokens\n") == ["t.file: no rows (a trace needs at least one request)"]
    assert _problems(MOONCAKE, format="parquet") == ["t.file: unknown format 'parquet'; choose one of mooncake, azure, burstgpt, tierflow"]
    with pytest.raises(TraceError, match="cannot read: No such file or directory"):
        load_trace(tmp_path / "missing.jsonl")


def test_columns_are_numpy_arrays_of_the_right_kind() -> None:
    trace = parse_trace(MOONCAKE, source="m")
    assert trace.time_s.dtype == np.float64 and trace.input_tokens.dtype == np.int64 and trace.line.dtype == np.int64
