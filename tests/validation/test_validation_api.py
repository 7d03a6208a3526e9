"""The report, the issue helpers the server reuses, excerpts, limits and statistics."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from brightrun.validation import (
    DatasetFormat,
    DatasetFormatError,
    Example,
    ValidationIssue,
    ValidationReport,
    _engine,
    context_excerpt,
    detect_format,
    filter_issues,
    issues_to_csv,
    iter_examples,
    page_issues,
    quality_band,
    sort_issues,
    validate_file,
)
from brightrun.validation._engine import HashIndex, LengthStats
from brightrun.validation.issues import CSV_COLUMNS


def chat_line(i: int, *, user: str | None = None, reply: str | None = None, **extra: Any) -> str:
    record = {
        "messages": [
            {"role": "user", "content": user if user is not None else f"question {i}"},
            {"role": "assistant", "content": reply if reply is not None else f"answer {i}"},
        ],
        **extra,
    }
    return json.dumps(record)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# Sorting, filtering, paging, CSV.


def _issue(index: int | None, itype: str, severity: str, line: int) -> ValidationIssue:
    return ValidationIssue(
        type=itype,
        severity=severity,
        message=f"{itype} at {index}",
        path=f"[{index}]",
        line=line,
        column=1,
        conversation_index=index,
    )


ISSUES = [
    _issue(3, "empty_content", "warning", 4),
    _issue(0, "malformed_json", "critical", 1),
    _issue(2, "duplicate_content", "warning", 3),
    _issue(1, "unknown_role", "critical", 2),
    _issue(None, "encoding_error", "warning", 1),
]


def test_sort_by_index_type_and_severity() -> None:
    assert [i.conversation_index for i in sort_issues(ISSUES, "index")] == [None, 0, 1, 2, 3]
    assert [i.type for i in sort_issues(ISSUES, "type")] == [
        "duplicate_content",
        "empty_content",
        "encoding_error",
        "malformed_json",
        "unknown_role",
    ]
    by_severity = sort_issues(ISSUES, "severity")
    assert [i.severity for i in by_severity] == ["critical"] * 2 + ["warning"] * 3
    assert [i.conversation_index for i in by_severity] == [0, 1, None, 2, 3]
    with pytest.raises(ValueError, match="unknown sort key"):
        sort_issues(ISSUES, "size")  # type: ignore[arg-type]


def test_filter_critical_only_and_by_type() -> None:
    assert {i.type for i in filter_issues(ISSUES, critical_only=True)} == {"malformed_json", "unknown_role"}
    assert [i.type for i in filter_issues(ISSUES, types=["empty_content"])] == ["empty_content"]


def test_pages_cover_everything_once_with_opaque_tokens() -> None:
    items = sort_issues(ISSUES * 13, "index")  # 65 issues
    seen: list[ValidationIssue] = []
    token = ""
    pages = 0
    while True:
        page = page_issues(items, page_size=25, page_token=token)
        assert page.total == 65
        seen.extend(page.issues)
        pages += 1
        token = page.next_page_token
        if not token:
            break
        assert not token.isdigit()  # opaque
    assert pages == 3
    assert seen == items
    assert len(page_issues(items, page_size=0).issues) == 25  # default
    with pytest.raises(ValueError, match="invalid page token"):
        page_issues(items, page_token="not-a-token")


def test_csv_export_streams_rows_that_round_trip() -> None:
    tricky = ValidationIssue(
        type="malformed_json",
        severity="critical",
        message='comma, "quote" and\nnewline',
        path="[7]",
        line=8,
        column=3,
        byte_offset=99,
        conversation_index=7,
        conversation_id="id,7",
        suggested_fix="Fix it.",
    )
    lines = list(issues_to_csv([*ISSUES, tricky]))
    assert len(lines) == 1 + len(ISSUES) + 1  # a generator of one row per issue
    rows = list(csv.reader(io.StringIO("".join(lines))))
    assert tuple(rows[0]) == CSV_COLUMNS
    last = dict(zip(CSV_COLUMNS, rows[-1], strict=True))
    assert last["message"] == 'comma, "quote" and\nnewline'
    assert last["conversation_number"] == "8"
    assert last["conversation_id"] == "id,7"
    assert last["byte_offset"] == "99"
    file_level = dict(zip(CSV_COLUMNS, rows[5], strict=True))
    assert file_level["conversation_number"] == ""
    assert list(issues_to_csv([], header=False)) == []


def test_report_paging_sorts_and_filters(tmp_path: Path) -> None:
    lines = [chat_line(i) for i in range(5)]
    lines[1] = chat_line(1, reply="")  # critical
    lines[3] = lines[0]  # duplicate: warning
    report = validate_file(write_lines(tmp_path / "d.jsonl", lines))
    page = report.page(sort="severity", critical_only=True)
    assert [(i.type, i.path) for i in page.issues] == [("empty_content", "[1].messages[1].content")]
    assert [i.type for i in report.page(sort="type").issues] == ["duplicate_content", "empty_content"]


# ---------------------------------------------------------------------------
# Context excerpts.


def test_excerpt_shows_ten_lines_each_side_and_marks_the_line(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {n}\n" for n in range(1, 41)), encoding="utf-8")
    offset = sum(len(f"line {n}\n") for n in range(1, 20))  # start of line 20
    excerpt = context_excerpt(path, byte_offset=offset + 5, line=20, column=6)
    assert [x.number for x in excerpt.lines] == list(range(10, 31))
    assert [x.number for x in excerpt.lines if x.marked] == [20]
    assert excerpt.lines[10].text == "line 20"
    assert excerpt.caret == 5
    rendered = excerpt.render().splitlines()
    assert rendered[10] == ">> 20 | line 20"
    assert rendered[11] == "      |      ^"


def test_excerpt_at_the_edges_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_bytes(b"first\nsecond\nthird")  # no final newline
    first = context_excerpt(path, byte_offset=0, line=1)
    assert [(x.number, x.text, x.marked) for x in first.lines] == [
        (1, "first", True),
        (2, "second", False),
        (3, "third", False),
    ]
    last = context_excerpt(path, byte_offset=13, line=3)
    assert [x.number for x in last.lines] == [1, 2, 3]
    assert last.lines[-1].marked


def test_excerpt_clips_long_lines_around_the_column(tmp_path: Path) -> None:
    long_line = "a" * 5000 + "X" + "b" * 5000
    path = tmp_path / "long.txt"
    path.write_text("short\n" + long_line + "\nafter\n", encoding="utf-8")
    excerpt = context_excerpt(path, byte_offset=6 + 5000, line=2, column=5001)
    marked = next(x for x in excerpt.lines if x.marked)
    assert marked.clipped
    assert len(marked.text) <= 202
    assert excerpt.caret is not None
    assert marked.text[excerpt.caret] == "X"


def test_excerpt_reads_a_bounded_window_of_a_huge_line(tmp_path: Path) -> None:
    path = tmp_path / "huge.txt"
    path.write_bytes(b"x" * 300_000 + b"!" + b"y" * 300_000)
    excerpt = context_excerpt(path, byte_offset=300_000, line=1, column=300_001)
    (marked,) = excerpt.lines
    assert marked.clipped
    assert "!" in marked.text
    assert len(marked.text) < 400


def test_report_context_follows_the_issue(tmp_path: Path) -> None:
    lines = [chat_line(i) for i in range(30)]
    lines[15] = '{"messages": [}'
    report = validate_file(write_lines(tmp_path / "c.jsonl", lines))
    (issue,) = report.issues
    excerpt = report.context(issue)
    assert excerpt is not None
    marked = [x for x in excerpt.lines if x.marked]
    assert [x.number for x in marked] == [16]
    assert marked[0].text == '{"messages": [}'
    assert excerpt.caret == issue.column - 1 if issue.column else False
    assert len(excerpt.lines) == 21


# ---------------------------------------------------------------------------
# Score, bands, bonuses, readiness.


@pytest.mark.parametrize(
    ("score", "band"),
    [(100, "good"), (90, "good"), (89, "minor_issues"), (70, "minor_issues"), (69, "fix_first"), (0, "fix_first")],
)
def test_bands(score: int, band: str) -> None:
    assert quality_band(score) == band


def test_score_deducts_ten_per_critical_and_two_per_warning(tmp_path: Path) -> None:
    lines = [chat_line(i) for i in range(10)]
    lines[2] = chat_line(2, reply="")  # critical
    lines[5] = lines[4]  # warning
    lines[7] = chat_line(7, user=" ")  # warning
    report = validate_file(write_lines(tmp_path / "s.jsonl", lines))
    assert (report.critical_count, report.warning_count) == (1, 2)
    assert report.quality_score == 100 - 10 - 4
    assert report.quality_band == "minor_issues"
    assert report.score_breakdown().bonuses == {}


def test_bonuses_only_without_critical_errors_and_capped(tmp_path: Path) -> None:
    lines = [chat_line(i) for i in range(1200)]
    lines[10] = lines[9]  # one warning: -2
    report = validate_file(write_lines(tmp_path / "big.jsonl", lines))
    assert report.score_breakdown().bonuses == {"volume": 3}
    assert report.quality_score == 100  # 100 - 2 + 3, clamped
    lines[11] = lines[9]
    lines[12] = lines[9]
    report = validate_file(write_lines(tmp_path / "big.jsonl", lines))
    assert report.quality_score == 100 - 6 + 3
    lines[20] = chat_line(20, reply="")  # a critical error cancels every bonus
    report = validate_file(write_lines(tmp_path / "big.jsonl", lines))
    assert report.score_breakdown().bonuses == {}
    assert report.quality_score == 100 - 10 - 6


def test_score_is_clamped_at_zero(tmp_path: Path) -> None:
    report = validate_file(write_lines(tmp_path / "bad.jsonl", ["{"] * 20))
    assert report.critical_count == 20
    assert report.quality_score == 0


def _conversations_doc(n_pairs: int, rating: float | None = None, per_conversation: float | None = None) -> str:
    conversations = []
    for i in range(n_pairs):
        conv: dict[str, Any] = {
            "conversation_id": f"c{i}",
            "training_pairs": [
                {
                    "user_query": f"q{i}",
                    "target_response": f"r{i}",
                    "scaffolding_metadata": {
                        "persona": ["anxious_planner", "pragmatic_optimist", "overwhelmed_avoider"][i % 3],
                        "emotional_arc": ["worry_to_confidence", "conflict_to_alignment"][i % 2],
                        "topic": "retirement",
                    },
                }
            ],
        }
        if per_conversation is not None:
            conv["quality_score"] = per_conversation
        conversations.append(conv)
    doc: dict[str, Any] = {"conversations": conversations}
    if rating is not None:
        doc["dataset_metadata"] = {"quality_score": rating, "format_version": "brightrun-lora-v4"}
    return json.dumps(doc, indent=2)


def test_readiness_checklist(tmp_path: Path) -> None:
    path = tmp_path / "ready.json"
    path.write_text(_conversations_doc(501, rating=3.0), encoding="utf-8")
    report = validate_file(path)
    checks = {c.name: c for c in report.readiness()}
    assert checks["format_compatible"].passed
    assert "brightrun-lora-v4" in checks["format_compatible"].detail
    assert checks["sufficient_volume"].passed
    assert checks["quality_score"].passed
    assert checks["quality_rating"].passed
    assert checks["tokenization"].passed is None
    assert report.ready
    assert report.stats.quality_rating_source == "dataset"
    assert report.score_breakdown().bonuses == {"scaffolding_coverage": 3}

    path.write_text(_conversations_doc(500, per_conversation=2.5), encoding="utf-8")
    report = validate_file(path)
    checks = {c.name: c for c in report.readiness()}
    assert checks["sufficient_volume"].passed is False
    assert checks["quality_rating"].passed is False
    assert report.stats.quality_rating == 2.5
    assert report.stats.quality_rating_source == "conversations"
    assert report.passed
    assert not report.ready


def test_scaffolding_distributions(tmp_path: Path) -> None:
    path = tmp_path / "dist.json"
    path.write_text(_conversations_doc(12), encoding="utf-8")
    stats = validate_file(path).stats
    assert stats.persona == {"anxious_planner": 4, "pragmatic_optimist": 4, "overwhelmed_avoider": 4}
    assert stats.emotional_arc == {"worry_to_confidence": 6, "conflict_to_alignment": 6}
    assert stats.topic == {"retirement": 12}
    assert sum(stats.persona_arc.values()) == 12
    assert stats.persona_arc["anxious_planner x worry_to_confidence"] == 2
    assert stats.pairs_with_scaffolding == 12


def test_length_stats_and_histogram(tmp_path: Path) -> None:
    lines = [chat_line(i, user="u" * (10 * i + 1), reply="a") for i in range(100)]
    stats = validate_file(write_lines(tmp_path / "len.jsonl", lines)).stats
    lengths = [10 * i + 2 for i in range(100)]
    assert stats.length_unit == "chars"
    assert stats.content_chars == sum(lengths)
    assert (stats.length_summary.min, stats.length_summary.max) == (2, 992)
    assert stats.length_summary.mean == round(sum(lengths) / 100, 1)
    assert sum(b.count for b in stats.length_histogram) == 100
    assert stats.length_histogram[0].count == sum(1 for n in lengths if n < 512)


@given(st.lists(st.integers(0, 10**7), min_size=1, max_size=300), st.sampled_from([0.5, 0.95]))
def test_bucketed_percentiles_are_within_an_eighth(values: list[int], q: float) -> None:
    stats = LengthStats()
    for v in values:
        stats.add(v)
    exact = sorted(values)[max(0, -(-int(q * len(values) * 1000) // 1000) - 1)]
    approx = stats.percentile(q)
    assert exact <= approx <= max(values)
    assert approx <= exact * 1.125 + 1


def test_hash_index_grows_and_keeps_first_values() -> None:
    index = HashIndex(4)
    for k in range(1, 5000):
        assert index.add(k * 0x9E3779B97F4A7C15 & 0xFFFF_FFFF_FFFF_FFFF or 1, k) == -1
    assert len(index) == 4999
    assert index.add(7 * 0x9E3779B97F4A7C15 & 0xFFFF_FFFF_FFFF_FFFF, 123) == 7
    assert index.nbytes >= 16 * 4999


# ---------------------------------------------------------------------------
# Limits and unreadable inputs.


def test_issue_records_are_capped_per_type_with_exact_counts(tmp_path: Path) -> None:
    lines = ["{broken"] * 50 + [chat_line(i, reply="") for i in range(5)]
    report = validate_file(write_lines(tmp_path / "many.jsonl", lines), max_issues_per_type=10)
    assert report.counts_by_type == {"malformed_json": 50, "empty_content": 5}
    assert report.omitted_by_type == {"malformed_json": 40}
    assert report.critical_count == 55
    assert sum(1 for i in report.issues if i.type == "malformed_json") == 10
    assert report.stats.conversations == 55
    assert report.stats.conversations_with_errors == 55


def test_oversized_lines_are_skipped_and_the_next_line_is_checked(tmp_path: Path) -> None:
    lines = [chat_line(0), chat_line(1, user="x" * 500), chat_line(2, reply="")]
    report = validate_file(write_lines(tmp_path / "big.jsonl", lines), max_record_bytes=300)
    assert [(i.type, i.path, i.line) for i in report.issues] == [
        ("record_too_large", "[1]", 2),
        ("empty_content", "[2].messages[1].content", 3),
    ]


def test_oversized_conversation_in_a_document(tmp_path: Path) -> None:
    conversations = [
        {"conversation_id": "a", "training_pairs": [{"user_query": "q", "target_response": "r" * 5000}]},
        {"conversation_id": "b", "training_pairs": [{"user_query": "q2", "target_response": 3}]},
    ]
    path = tmp_path / "doc.json"
    path.write_text(json.dumps({"conversations": conversations}, indent=2), encoding="utf-8")
    report = validate_file(path, max_record_bytes=1000)
    assert [(i.type, i.path) for i in report.issues] == [
        ("record_too_large", "conversations[0]"),
        ("invalid_data_type", "conversations[1].training_pairs[0].target_response"),
    ]


@pytest.mark.parametrize(
    ("data", "what"),
    [
        ('{"messages": []}\n'.encode("utf-16"), "UTF-16"),
        (gzip.compress(b'{"messages": []}\n'), "gzip-compressed"),
        ('{"messages": []}\n'.encode("utf-16-le"), "UTF-16 without BOM"),
    ],
    ids=["utf-16", "gzip", "utf-16-no-bom"],  # stable: gzip's header holds the time it was made
)
def test_files_that_are_not_utf8_text_stop_at_once(tmp_path: Path, data: bytes, what: str) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    report = validate_file(path)
    (issue,) = report.issues
    assert issue.type == "encoding_error"
    assert issue.severity == "critical"
    assert what in issue.message
    assert report.aborted


def test_binary_garbage_aborts_after_too_many_invalid_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_engine, "MAX_ENCODING_ERRORS", 5)
    path = tmp_path / "garbage.jsonl"
    path.write_bytes(b"\x7b\xff\xfe\n" * 20)  # two invalid bytes a line
    report = validate_file(path)
    assert report.aborted is not None
    assert "not UTF-8" in report.aborted
    # One issue per line (naming the first bad byte); the 6th bad byte stops it.
    assert report.counts_by_type["encoding_error"] == 3
    assert report.stats.conversations == 3


# ---------------------------------------------------------------------------
# Detection and the trainer's reader.


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        (chat_line(0), "chat_jsonl"),
        ('{"instruction": "a", "output": "b"}', "instruction_jsonl"),
        ('{\n  "conversations": [\n', "conversations"),
        ('[{"conversation_id": "x"}]', "conversations"),
        ('{"conversation_id": "x", "training_pairs": []}', "conversations"),
        ('{"dataset_metadata": {}, "conversations": []}', "conversations"),
        ("{broken\n" + chat_line(1), "chat_jsonl"),
        ("\ufeff" + chat_line(1), "chat_jsonl"),
        ("", "chat_jsonl"),
    ],
)
def test_detect_format(tmp_path: Path, text: str, fmt: str) -> None:
    path = tmp_path / "x"
    path.write_text(text + "\n", encoding="utf-8")
    assert detect_format(path) == DatasetFormat(fmt)


def test_iter_examples_names_the_first_critical_error_and_ignores_warnings(tmp_path: Path) -> None:
    lines = [chat_line(0), chat_line(0), chat_line(2), chat_line(3, reply="")]
    path = write_lines(tmp_path / "t.jsonl", lines)
    examples: list[Example] = []
    reader = iter_examples(path)
    with pytest.raises(DatasetFormatError) as info:
        examples.extend(reader)  # keeps what was read before the error
    assert len(examples) == 3  # the duplicate is a warning: it does not stop the reader
    assert info.value.path == "[3].messages[1].content"
    assert info.value.line == 4
    assert "line 4 [3].messages[1].content: 'content' is empty" in str(info.value)


def test_report_built_by_hand_counts_its_issues() -> None:
    report = ValidationReport(format=DatasetFormat.CHAT_JSONL, issues=ISSUES)
    assert (report.critical_count, report.warning_count) == (2, 3)
    assert report.counts_by_type["malformed_json"] == 1
    assert report.quality_score == 100 - 20 - 6
    assert not report.passed
    assert report.first_errors(2) == ["Conversation #1: malformed_json at 0", "Conversation #2: unknown_role at 1"]


ESCAPE_CASES = [
    ("pair \\ud83d\\ude00 ok", False),
    ("upper pair \\uD83D\\uDE00", False),
    ("lone high \\ud83d here", True),
    ("lone low \\ude00 here", True),
    ("reversed \\ude00\\ud83d", True),
    ("high high low \\ud83d\\ud83d\\ude00", True),
    ("escaped backslash \\\\ud83d is text", False),
    ("nul \\u0000 char", True),
]


@pytest.mark.parametrize(("escaped", "flagged"), ESCAPE_CASES)
def test_only_unpaired_surrogates_and_nul_escapes_are_flagged(tmp_path: Path, escaped: str, flagged: bool) -> None:
    # `escaped` is JSON source text: write it verbatim inside a string.
    line = '{"messages": [{"role": "user", "content": "' + escaped + '"}, {"role": "assistant", "content": "ok"}]}'
    chat = tmp_path / "c.jsonl"
    chat.write_text(line + "\n", encoding="utf-8")
    doc = tmp_path / "d.json"
    doc.write_text(
        '{"conversations": [{"conversation_id": "x", "training_pairs": '
        '[{"user_query": "' + escaped + '", "target_response": "ok"}]}]}',
        encoding="utf-8",
    )
    for path, where in ((chat, "[0].messages[0].content"), (doc, "conversations[0].training_pairs[0].user_query")):
        report = validate_file(path)
        assert [(i.type, i.path) for i in report.issues] == ([("encoding_error", where)] if flagged else [])
