"""Fixtures of the validation tests: the golden corpus and a tiny local tokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CORPUS = Path(__file__).resolve().parents[1] / "data" / "validation"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny Llama model directory with a local BPE tokenizer and chat template."""
    tiny = pytest.importorskip("brightrun_trainer.tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield tiny.build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return transformers.AutoTokenizer.from_pretrained(tiny_model_dir)


def assert_positions_agree(path: Path, issues: Any) -> None:
    """Each issue's byte offset points at its line and column (1-based characters;
    invalid bytes count one character each, a leading BOM none)."""
    data = path.read_bytes()
    for issue in issues:
        if issue.byte_offset is None:
            continue
        before = data[: issue.byte_offset]
        assert before.count(b"\n") + 1 == issue.line, issue
        line_start = before.rfind(b"\n") + 1
        prefix = before[line_start:]
        if line_start == 0 and prefix.startswith(b"\xef\xbb\xbf"):
            prefix = prefix[3:]
        assert len(prefix.decode("utf-8", "surrogateescape")) + 1 == issue.column, issue
