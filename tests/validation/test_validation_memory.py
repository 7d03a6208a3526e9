"""Streaming: validating a few hundred MB keeps memory flat (fresh process, peak RSS)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, sys
from brightrun.validation import validate_file
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0
base = kb("VmRSS:")
report = validate_file(sys.argv[1])
print(json.dumps({"growth_mb": (kb("VmHWM:") - base) / 1024, "pairs": report.stats.training_pairs,
                  "critical": report.critical_count}))
"""

SIZE = 300_000_000


def _chat(path: Path) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < SIZE:
            line = json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "You are helpful. " * 10},
                        {"role": "user", "content": f"Question {n}: " + "why is the sky blue? " * 20},
                        {"role": "assistant", "content": f"Answer {n}: " + "Rayleigh scattering, é. " * 30},
                    ]
                }
            )
            f.write(line + "\n")
            written += len(line) + 1
            n += 1
    return n


def _document(path: Path) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"dataset_metadata": {"quality_score": 3.5},\n "conversations": [\n')
        written = 0
        while written < SIZE:
            conv = {
                "conversation_id": f"c{n}",
                "training_pairs": [
                    {"user_query": f"Q{n}.{k} " + "how much? " * 15, "target_response": "Save 15% 😀 " * 40}
                    for k in range(3)
                ],
            }
            text = ("" if n == 0 else ",\n") + json.dumps(conv, indent=2, ensure_ascii=False)
            f.write(text)
            written += len(text.encode())
            n += 1
        f.write("\n]}\n")
    return 3 * n


def _probe(path: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True, timeout=600
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["chat_jsonl", "conversations_document"])
def test_memory_stays_flat_on_large_files(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "big"
    pairs = _chat(path) if kind == "chat_jsonl" else _document(path)
    probe = _probe(path)
    assert probe["critical"] == 0
    assert probe["pairs"] == pairs
    # The whole file is 300 MB; streaming keeps the peak far below it (1 GB: < 200 MB).
    assert probe["growth_mb"] < 120, probe
