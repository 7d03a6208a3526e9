"""How fast and how lean is dataset validation? Compared with json.loads and Together.

Generates, deterministically into a temporary directory:

* a chat JSONL of ``--size-mb`` (100) MB: system prompt and 1-3 user/assistant
  turns a line, about 1.3 kB a line, some non-ASCII text and escapes;
* a seed-format file of ``--seed-mb`` (5) MB: ``{"dataset_metadata", "conversations"}``
  pretty-printed, 3-8 training pairs a conversation, 3 personas x 7 arcs x 20 topics;
* a chat JSONL with 12 known injected errors of 12 kinds (for the finding count).

Measures, in this run:

* baseline: parsing the chat file line by line with ``json.loads`` alone;
* structural validation of the chat file (``validate_file``), with the default JSON
  backend (orjson when installed) and with the standard library;
* peak RSS and RSS growth of validation, each in a fresh process (``VmHWM`` minus the
  RSS after imports), for the chat file and the seed file;
* the seed file's validation time (best of 5);
* tokenizer-aware validation (tiny local tokenizer from brightrun_trainer.tiny) on
  the first ``--tokenizer-mb`` MB of the chat file;
* Together's ``check_file`` (the ``together`` PyPI package, installed into a
  throwaway venv so it cannot touch this environment) on the same chat file and
  on the injected file, as a subprocess: its speed and what it finds.

MB/s figures are per CPU second (``time.process_time``: one core, robust to other
load on the machine); wall-clock figures are reported next to them.

Progress goes to stderr; one JSON object is the last line of stdout.
Usage: python bench/validate.py [--quick] [--large-gb N] [--no-together]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from brightrun.validation import _json, validate_file

TOGETHER_VENV = Path(tempfile.gettempdir()) / "brightrun-bench-together"
MB = 1_000_000

_WORD_TEXT = """
the of and to in is you that it he was for on are as with his they at be this have from or one
had by word but not what all were we when your can said there use an each which she do how their
if will up other about out many then them these so some her would make like him into time has look
two more write go see number no way could people my than first water been call who oil its now find
long down day did get come made may part refund order invoice password account upgrade delivery
schedule budget retirement savings
"""
WORDS = _WORD_TEXT.split()
ACCENTED = ["café", "naïve", "façade", "Zürich", "São Paulo", "crème brûlée", "日本", "€42", "😀"]
PERSONAS = ["anxious_planner", "overwhelmed_avoider", "pragmatic_optimist"]
ARCS = [
    "worry_to_confidence",
    "couple_conflict_to_alignment",
    "shame_to_acceptance",
    "confusion_to_clarity",
    "fear_to_action",
    "overwhelm_to_focus",
    "skepticism_to_trust",
]
TOPICS = [f"topic_{k:02d}" for k in range(20)]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _text(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    if rng.random() < 0.1:
        words[rng.randrange(n)] = rng.choice(ACCENTED)
    if rng.random() < 0.05:
        words.append('"quoted"\nnext line')
    return " ".join(words)


def chat_record(rng: random.Random, i: int) -> dict[str, Any]:
    messages = [{"role": "system", "content": f"Agent {i % 97}: " + _text(rng, 20)}]
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": _text(rng, rng.randint(10, 60))})
        messages.append({"role": "assistant", "content": _text(rng, rng.randint(20, 150))})
    return {"messages": messages}


def write_chat(path: Path, size: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    written = lines = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            line = json.dumps(chat_record(rng, lines), ensure_ascii=rng.random() < 0.5) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            lines += 1
    return lines


def conversation(rng: random.Random, i: int) -> dict[str, Any]:
    persona = PERSONAS[i % 3]
    pairs = []
    for k in range(rng.randint(3, 8)):
        pairs.append(
            {
                "prompt_context": "You are Elena Morales, CFP. " + _text(rng, 25) if k == 0 else _text(rng, 15),
                "user_query": _text(rng, rng.randint(8, 40)),
                "target_response": _text(rng, rng.randint(30, 120)),
                "scaffolding_metadata": {
                    "persona": persona,
                    "emotional_arc": ARCS[i % 7],
                    "topic": TOPICS[(i * 7 + k) % 20],
                },
            }
        )
    return {"conversation_id": f"conv_{i:06d}", "quality_score": 3.0 + (i % 3) / 2, "training_pairs": pairs}


def write_seed_document(path: Path, size: int, seed: int = 1) -> int:
    """A pretty-printed {"dataset_metadata", "conversations": [...]} of about ``size`` bytes."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        head = {"format_version": "brightrun-lora-v4", "quality_score": 3.4}
        f.write('{\n  "dataset_metadata": ' + json.dumps(head) + ',\n  "conversations": [\n')
        written = 0
        i = 0
        while written < size:
            text = json.dumps(conversation(rng, i), indent=2, ensure_ascii=False)
            piece = ("" if i == 0 else ",\n") + "    " + text.replace("\n", "\n    ")
            f.write(piece)
            written += len(piece.encode("utf-8"))
            i += 1
        f.write("\n  ]\n}\n")
    return i


#: (line to replace, kind, the raw line) — one of each kind, at known lines.
def injected_lines(rng: random.Random) -> list[tuple[str, bytes]]:
    ok = json.dumps(chat_record(rng, 10**6))

    def chat(user: bytes, reply: bytes) -> bytes:
        return b'{"messages": [{"role": "user", "content": "%s"}, {"role": "assistant", "content": "%s"}]}' % (
            user,
            reply,
        )

    ok = json.dumps(chat_record(rng, 10**6))
    return [
        ("malformed_json", ok[:-2].encode() + b",]}"),
        ("missing_required_field", b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}'),
        (
            "invalid_data_type",
            b'{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}',
        ),
        ("empty_content", chat(b"q?", b"")),
        ("unknown_role", b'{"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]}'),
        ("no_final_assistant", b'{"messages": [{"role": "user", "content": "anyone there?"}]}'),
        ("empty_array", b'{"messages": []}'),
        ("encoding_error", chat(b"caf\xe9", b"1")),
        ("encoding_error", chat(b"nul\x00", b"2")),
        ("missing_required_field", b'{"conversation": [{"role": "user", "content": "wrong key"}]}'),
        ("invalid_data_type", b'["not", "an", "object"]'),
        ("duplicate_content", b"DUPLICATE"),
    ]


def write_injected(path: Path, n_lines: int = 20_000, seed: int = 2) -> list[tuple[int, str]]:
    """A chat file with one error of each kind at known lines; returns (line, type)."""
    rng = random.Random(seed)
    records = [json.dumps(chat_record(rng, i)).encode() for i in range(n_lines)]
    expected = []
    errors = injected_lines(rng)
    for k, (kind, raw) in enumerate(errors):
        line = (k + 1) * (n_lines // (len(errors) + 1))
        records[line - 1] = records[0] if raw == b"DUPLICATE" else raw
        expected.append((line, kind))
    path.write_bytes(b"\n".join(records) + b"\n")
    return expected


# ---------------------------------------------------------------------------
# Measurements.


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """Best CPU seconds and best wall seconds over ``repeat`` runs, and the last result."""
    best_cpu = best_wall = float("inf")
    result = None
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        result = fn()
        best_cpu = min(best_cpu, time.process_time() - c0)
        best_wall = min(best_wall, time.perf_counter() - w0)
    return best_cpu, best_wall, result


def json_loads_baseline(path: Path) -> int:
    n = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            json.loads(line)
            n += 1
    return n


RSS_PROBE = """
import json, sys, time
from brightrun.validation import validate_file
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0
base = kb("VmRSS:")
t, c = time.perf_counter(), time.process_time()
r = validate_file(sys.argv[1])
elapsed, cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps({"baseline_kb": base, "peak_kb": kb("VmHWM:"), "seconds": elapsed, "cpu": cpu,
                  "critical": r.critical_count, "examples": r.stats.training_pairs}))
"""


def rss_probe(path: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path)], capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "peak_rss_mb": round(probe["peak_kb"] / 1024, 1),
        "rss_growth_mb": round((probe["peak_kb"] - probe["baseline_kb"]) / 1024, 1),
        "seconds": round(probe["seconds"], 3),
        "mb_s": round(path.stat().st_size / MB / probe["cpu"], 1),
        "mb_s_wall": round(path.stat().st_size / MB / probe["seconds"], 1),
        "critical": probe["critical"],
        "training_pairs": probe["examples"],
    }


def tokenizer_run(chat: Path, workdir: Path, sample_mb: float) -> dict[str, Any]:
    try:
        from transformers import AutoTokenizer

        from brightrun_trainer.tiny import build_tiny_model
    except ImportError as e:
        return {"mb_s": None, "reason": f"trainer extras unavailable: {e}"}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sample = workdir / "tokenizer_sample.jsonl"
    with open(chat, "rb") as src, open(sample, "wb") as dst:
        budget = int(sample_mb * MB)
        for line in src:
            if budget <= 0:
                break
            dst.write(line)
            budget -= len(line)
    _log("building the tiny tokenizer...")
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(workdir / "tiny"))
    size = sample.stat().st_size
    cpu, wall, report = timed(lambda: validate_file(sample, tokenizer=tokenizer, max_seq_len=2048), 1)
    tokens = report.stats.tokens
    return {
        "sample_mb": round(size / MB, 2),
        "mb_s": round(size / MB / cpu, 2),
        "mb_s_wall": round(size / MB / wall, 2),
        "examples": tokens.examples if tokens else 0,
        "tokens": tokens.total_tokens if tokens else 0,
        "tokenizer": "tiny byte-level BPE (brightrun_trainer.tiny), 1k vocab",
    }


TOGETHER_PROBE = """
import json, sys, time
try:  # together >= 2
    from together.lib.utils.files import check_file
except ImportError:  # together 1.x
    from together.utils import check_file
import importlib.metadata
path, repeat = sys.argv[1], int(sys.argv[2])
cpu = wall = float("inf")
for _ in range(repeat):
    c, w = time.process_time(), time.perf_counter()
    report = check_file(path)
    cpu, wall = min(cpu, time.process_time() - c), min(wall, time.perf_counter() - w)
print(json.dumps({"cpu": cpu, "wall": wall,
                  "passed": report.get("is_check_passed"), "message": report.get("message"),
                  "line_number": report.get("line_number"),
                  "version": importlib.metadata.version("together")}))
"""


def ensure_together(spec: str) -> tuple[Path | None, str]:
    python = TOGETHER_VENV / "bin" / "python"
    marker = TOGETHER_VENV / ".spec"
    if python.exists() and marker.exists() and marker.read_text() == spec:
        return python, ""
    _log(f"installing {spec!r} into {TOGETHER_VENV} (throwaway venv)...")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(TOGETHER_VENV)], check=True, capture_output=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", spec], check=True, capture_output=True, text=True, timeout=900
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return None, f"cannot install {spec}: {str(detail).strip().splitlines()[-1:]}"
    marker.write_text(spec)
    return python, ""


def together_probe(python: Path, path: Path, repeat: int = 1) -> dict[str, Any]:
    """Best of ``repeat`` runs of Together's check_file on ``path``, in its own venv."""
    out = subprocess.run(
        [str(python), "-c", TOGETHER_PROBE, str(path), str(repeat)],
        capture_output=True,
        text=True,
        timeout=3600,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast run")
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--seed-mb", type=float, default=5.0)
    parser.add_argument("--tokenizer-mb", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--large-gb", type=float, default=0.0, help="also measure a chat file and a document of this size"
    )
    parser.add_argument("--no-together", action="store_true")
    parser.add_argument("--together-spec", default="together", help="pip spec for the comparison")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    if args.quick:
        args.size_mb, args.tokenizer_mb, args.repeat = 10.0, 0.5, 2

    workdir = Path(tempfile.mkdtemp(prefix="brightrun-bench-validate-"))
    result: dict[str, Any] = {
        "bench": "validate",
        "quick": args.quick,
        "python": platform.python_version(),
        "json_backend": _json.backend(),
        "cpu_count": os.cpu_count(),
    }
    try:
        chat = workdir / "chat.jsonl"
        _log(f"generating {args.size_mb:g} MB of chat JSONL...")
        lines = write_chat(chat, int(args.size_mb * MB))
        size_mb = chat.stat().st_size / MB
        result["chat_jsonl"] = {"mb": round(size_mb, 2), "lines": lines}

        _log("baseline: json.loads line by line...")
        cpu, wall, _ = timed(lambda: json_loads_baseline(chat), args.repeat)
        baseline = size_mb / cpu
        result["baseline_json_loads_mb_s"] = round(baseline, 1)
        result["baseline_json_loads_wall_mb_s"] = round(size_mb / wall, 1)

        _log(f"structural validation ({_json.backend()})...")
        cpu, wall, report = timed(lambda: validate_file(chat), args.repeat)
        assert report.critical_count == 0, report.issues[:3]
        result["structural_mb_s"] = round(size_mb / cpu, 1)
        result["structural_wall_mb_s"] = round(size_mb / wall, 1)
        result["ratio_vs_json_loads"] = round(size_mb / cpu / baseline, 3)
        result["structural_warnings"] = report.warning_count
        if _json.orjson_available():
            previous = _json.set_backend("json")
            _log("structural validation (stdlib json)...")
            cpu, wall, _ = timed(lambda: validate_file(chat), args.repeat)
            _json.set_backend(previous)
            result["structural_stdlib_json_mb_s"] = round(size_mb / cpu, 1)
            result["ratio_stdlib_json_vs_json_loads"] = round(size_mb / cpu / baseline, 3)

        _log("peak RSS (fresh process)...")
        chat_rss = rss_probe(chat)
        result["peak_rss_mb"] = chat_rss["peak_rss_mb"]
        result["rss_growth_mb"] = chat_rss["rss_growth_mb"]

        seed = workdir / "seed.json"
        _log(f"generating a {args.seed_mb:g} MB seed-format document...")
        conversations = write_seed_document(seed, int(args.seed_mb * MB))
        cpu, wall, report = timed(lambda: validate_file(seed), 5)
        assert report.critical_count == 0, report.issues[:3]
        result["seed_file"] = {
            "mb": round(seed.stat().st_size / MB, 2),
            "conversations": conversations,
            "training_pairs": report.stats.training_pairs,
            "seconds": round(wall, 4),
            "cpu_seconds": round(cpu, 4),
            "mb_s": round(seed.stat().st_size / MB / cpu, 1),
            "rss_growth_mb": rss_probe(seed)["rss_growth_mb"],
            "quality_score": report.quality_score,
            "ready": report.ready,
        }

        _log("tokenizer-aware validation...")
        result["tokenizer"] = tokenizer_run(chat, workdir, args.tokenizer_mb)

        injected = workdir / "injected.jsonl"
        expected = write_injected(injected)
        report = validate_file(injected)
        found = {(i.line, i.type) for i in report.issues}
        ours = {"found": sum(1 for e in expected if e in found), "issues_reported": len(report.issues)}
        result["injected"] = {"errors": len(expected), "kinds": len({k for _, k in expected}), "ours": ours}

        if args.no_together:
            result["together"] = {"ratio_ours_vs_check_file": None, "reason": "--no-together"}
        else:
            python, why = ensure_together(args.together_spec)
            if python is not None:
                try:
                    together_probe(python, injected)
                except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError) as e:
                    python, why = None, f"check_file failed to run: {str(getattr(e, 'stderr', e)).strip()[-300:]}"
            if python is None:
                result["together"] = {"ratio_ours_vs_check_file": None, "reason": why}
            else:
                _log("Together check_file on the chat file, interleaved with ours...")
                # Alternate runs so both see the same load on a shared machine; best of each.
                ours_cpu = theirs_cpu = theirs_wall = float("inf")
                speed: dict[str, Any] = {}
                for _ in range(args.repeat):
                    cpu, _, _ = timed(lambda: validate_file(chat), 1)
                    ours_cpu = min(ours_cpu, cpu)
                    speed = together_probe(python, chat)
                    theirs_cpu = min(theirs_cpu, speed["cpu"])
                    theirs_wall = min(theirs_wall, speed["wall"])
                found_t = together_probe(python, injected)
                result["together"] = {
                    "version": speed["version"],
                    "check_file_mb_s": round(size_mb / theirs_cpu, 1),
                    "check_file_wall_mb_s": round(size_mb / theirs_wall, 1),
                    "ours_interleaved_mb_s": round(size_mb / ours_cpu, 1),
                    "ratio_ours_vs_check_file": round(theirs_cpu / ours_cpu, 2),
                    "passed_clean_file": speed["passed"],
                    "injected_found": 0 if found_t["passed"] else 1,
                    "injected_message": found_t["message"],
                    "checks": (
                        "UTF-8 decoding, then json.loads per line and 'is an object'; semantic "
                        "checks run on Together's server"
                        if not speed["version"].startswith(("0.", "1."))
                        else "UTF-8 decoding, then JSON and message-format checks per line"
                    )
                    + "; stops at the first problem",
                }
                result["injected"]["check_file_found"] = result["together"]["injected_found"]

        if args.large_gb:
            large: dict[str, Any] = {}
            big = workdir / "large.jsonl"
            _log(f"generating {args.large_gb:g} GB of chat JSONL...")
            write_chat(big, int(args.large_gb * 1000 * MB), seed=3)
            large["chat_jsonl"] = {"mb": round(big.stat().st_size / MB), **rss_probe(big)}
            big.unlink()
            doc = workdir / "large.json"
            _log(f"generating a {args.large_gb:g} GB conversations document...")
            write_seed_document(doc, int(args.large_gb * 1000 * MB), seed=4)
            large["conversations_document"] = {"mb": round(doc.stat().st_size / MB), **rss_probe(doc)}
            doc.unlink()
            result["large"] = large

        together = result.get("together", {})
        result["goals"] = {
            "structural_ge_50_mb_s": result["structural_mb_s"] >= 50,
            "seed_5mb_le_0_1_s": result["seed_file"]["seconds"] <= 0.1,
            "rss_growth_lt_200_mb": result["rss_growth_mb"] < 200
            and all(v["rss_growth_mb"] < 200 for v in result.get("large", {}).values()),
            "faster_than_check_file": None
            if together.get("ratio_ours_vs_check_file") is None
            else together["ratio_ours_vs_check_file"] > 1,
            "finds_more_than_check_file": None
            if "check_file_found" not in result["injected"]
            else ours["found"] > result["injected"]["check_file_found"],
        }
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            _log(f"kept {workdir}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
