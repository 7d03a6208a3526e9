"""The golden corpus: hand-written broken files and the exact records they produce.

Each ``tests/data/validation/<group>/<name>.<ext>`` has a ``<name>.expected.json``
listing the format, the exact critical / warning counts and every issue in file
order; each expected record is compared on the keys it names (always type,
severity, path and line). ``options.base_model == "tiny"`` runs the file with the
tiny test tokenizer. See tests/data/validation/README.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from brightrun.validation import DatasetFormatError, _engine, _json, iter_examples, validate_file
from brightrun.validation.report import ValidationReport

from .conftest import CORPUS, assert_positions_agree

GOLDENS = sorted(CORPUS.glob("*/*.expected.json"))


def _data_file(golden: Path) -> Path:
    stem = golden.name[: -len(".expected.json")]
    (data,) = [p for p in golden.parent.glob(stem + ".*") if not p.name.endswith(".expected.json")]
    return data


def _validate(golden: dict[str, Any], data: Path, request: pytest.FixtureRequest) -> ValidationReport:
    options = golden.get("options", {})
    fmt = options.get("format")
    if options.get("base_model") == "tiny":
        tokenizer = request.getfixturevalue("tiny_tokenizer")
        return validate_file(data, format=fmt, tokenizer=tokenizer, max_seq_len=options["max_seq_len"])
    return validate_file(data, format=fmt)


def _assert_matches(report: ValidationReport, golden: dict[str, Any]) -> None:
    assert report.format.value == golden["format"]
    assert report.path is not None
    assert_positions_agree(Path(report.path), report.issues)
    got = [i.to_dict() for i in report.issues]
    shown = [{k: g[k] for k in ("type", "severity", "path", "line", "column")} for g in got]
    assert len(got) == len(golden["issues"]), shown
    for g, e in zip(got, golden["issues"], strict=True):
        assert {k: g[k] for k in e} == e, shown
    assert report.critical_count == golden["critical_count"]
    assert report.warning_count == golden["warning_count"]


@pytest.fixture(params=[p.relative_to(CORPUS).as_posix() for p in GOLDENS])
def case(request: pytest.FixtureRequest) -> tuple[dict[str, Any], Path]:
    golden_path = CORPUS / request.param
    return json.loads(golden_path.read_text(encoding="utf-8")), _data_file(golden_path)


def test_corpus_covers_every_error_type_in_every_format() -> None:
    seen: dict[str, set[str]] = {}
    for path in GOLDENS:
        golden = json.loads(path.read_text(encoding="utf-8"))
        for issue in golden["issues"]:
            seen.setdefault(golden["format"], set()).add(issue["type"])
    structural = {
        "missing_required_field",
        "invalid_data_type",
        "malformed_json",
        "encoding_error",
        "empty_array",
        "empty_content",
        "duplicate_content",
    }
    for fmt in ("chat_jsonl", "conversations", "instruction_jsonl"):
        assert structural <= seen[fmt], (fmt, structural - seen[fmt])
    assert {"unknown_role", "no_final_assistant", "duplicate_id", "invalid_value"} <= seen["chat_jsonl"]
    assert {"duplicate_id", "missing_id", "invalid_value"} <= seen["conversations"]
    assert {"token_length_exceeded", "all_labels_masked"} <= seen["chat_jsonl"]
    assert "all_labels_masked" in seen["conversations"]


def test_golden(case: tuple[dict[str, Any], Path], request: pytest.FixtureRequest) -> None:
    golden, data = case
    _assert_matches(_validate(golden, data, request), golden)


@pytest.fixture(params=["json", "orjson"])
def json_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "orjson" and not _json.orjson_available():
        pytest.skip("orjson is not installed")
    previous = _json.set_backend(request.param)
    yield request.param
    _json.set_backend(previous)


def test_golden_same_with_either_json_parser(
    case: tuple[dict[str, Any], Path], json_backend: str, request: pytest.FixtureRequest
) -> None:
    golden, data = case
    _assert_matches(_validate(golden, data, request), golden)


def test_golden_same_with_a_tiny_read_window(
    case: tuple[dict[str, Any], Path], monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Documents read 7 bytes at a time (byte anchors every 3) and JSON Lines in 16-byte blocks: window
    sliding, characters split across reads, refills, lines longer than a block."""
    golden, data = case
    monkeypatch.setattr(_engine._DocReader, "CHUNK", 7)
    monkeypatch.setattr(_engine._DocReader, "LOOKAHEAD", 16)
    monkeypatch.setattr(_engine._DocReader, "PIECE", 3)
    monkeypatch.setattr(_engine.Engine, "BLOCK", 16)
    _assert_matches(_validate(golden, data, request), golden)


def test_iter_examples_agrees_with_the_golden(case: tuple[dict[str, Any], Path]) -> None:
    """The trainer's reader refuses exactly the files with critical structural errors."""
    golden, data = case
    fmt = golden.get("options", {}).get("format")
    structural_critical = [
        i
        for i in golden["issues"]
        if i["severity"] == "critical"
        and i["type"] not in {"token_length_exceeded", "all_labels_masked", "template_error"}
    ]
    if structural_critical:
        first = structural_critical[0]
        with pytest.raises(DatasetFormatError) as info:
            list(iter_examples(data, fmt))
        assert info.value.path == first["path"]
        assert info.value.line == first["line"]
    else:
        examples = list(iter_examples(data, fmt))
        assert len(examples) == validate_file(data, format=fmt).stats.training_pairs
