"""The offline validate command: exit codes end to end, and what it prints."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from brightrun.validation.cli import validate_command

from .conftest import CORPUS

VALID = CORPUS / "chat" / "valid.jsonl"
BROKEN = CORPUS / "conversations" / "missing_required_field.json"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "brightrun.validation", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_exit_codes_end_to_end(tmp_path: Path) -> None:
    ok = run_cli(str(VALID))
    assert ok.returncode == 0, ok.stderr
    assert "Training file validated" in ok.stdout

    bad = run_cli(str(BROKEN), "--max-errors", "1")
    assert bad.returncode == 1, bad.stderr
    assert "conversations[0].training_pairs[0].target_response" in bad.stdout

    missing = run_cli(str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2
    assert "no such file" in missing.stderr

    assert run_cli(str(VALID), "--format", "yaml").returncode == 2  # argparse
    assert run_cli(str(VALID), "--max-seq-len", "512").returncode == 2  # no base model
    assert run_cli().returncode == 2


def test_json_output_is_one_document(tmp_path: Path) -> None:
    result = run_cli(str(BROKEN), "--json", "--max-errors", "2")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["critical_count"] == 3
    assert report["passed"] is False
    assert report["format"] == "conversations"
    first = report["issues"][0]
    assert first["path"] == "conversations[0].training_pairs[0].target_response"
    assert first["line"] == 9
    assert '>>  9 |           "target_response": null,' in first["context"]
    assert "context" in report["issues"][1]
    assert "context" not in report["issues"][2]

    usage = run_cli(str(tmp_path / "missing.json"), "--json")
    assert usage.returncode == 2
    assert json.loads(usage.stdout)["exit_code"] == 2


def _render(*args: object, max_errors: int = 20) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = validate_command(
        *args,  # type: ignore[arg-type]
        as_json=False,
        max_errors=max_errors,
        console=Console(file=out, width=160, color_system=None),
        err_console=Console(file=err, width=160, color_system=None),
    )
    return code, out.getvalue(), err.getvalue()


def test_human_output_lists_errors_with_context_fix_and_score() -> None:
    code, out, _ = _render(BROKEN, None, None, None)
    assert code == 1
    assert "✗ Validation failed: 3 critical errors, 0 warnings" in out
    assert "Quality score: 70/100 (Minor issues)" in out
    assert "[critical] missing_required_field — Conversation #1 (ID: conv_abc123)" in out
    assert "line 9, column 30" in out
    assert "fix: Add 'target_response' with the reply to learn." in out
    assert '>>  9 |           "target_response": null,' in out
    assert "sufficient_volume: 0 training pairs" in out


def test_max_errors_zero_prints_only_the_summary() -> None:
    code, out, _ = _render(BROKEN, None, None, None, max_errors=0)
    assert code == 1
    assert "missing_required_field —" not in out
    assert "By type: missing_required_field 3 (3 critical)" in out


def test_data_is_printed_literally_not_as_markup(tmp_path: Path) -> None:
    path = tmp_path / "markup.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "[bold]user[/bold]", "content": "x"}]}) + "\n")
    code, out, _ = _render(path, None, None, "chat_jsonl")
    assert code == 1
    assert "'[bold]user[/bold]'" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((VALID, None, 0, None), "--max-seq-len must be a positive"),
        ((VALID, None, None, "csv"), "unknown format 'csv'"),
        ((CORPUS, None, None, None), "not a file"),
        ((VALID, "/definitely/not/a/model", None, None), "cannot load the tokenizer"),
    ],
)
def test_usage_errors_exit_2(args: tuple[object, ...], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if args[1] is not None:
        pytest.importorskip("transformers")
    code, out, err = _render(*args)
    assert code == 2
    assert message in err
    assert out == ""


def test_base_model_adds_token_lengths(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, _ = _render(VALID, str(tiny_model_dir), 4096, None)
    assert code == 0
    assert "Lengths (tokens):" in out
    assert "tokenization: 4 examples tokenized; 0 over max_seq_len 4096" in out
