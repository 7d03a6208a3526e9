"""The tiny model builder: deterministic, fast, loadable like a hub model."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from tests.trainer.trainer_harness import trainer_env


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_loads_with_auto_classes_and_has_a_chat_template(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.bos_token == "<s>"
    assert tokenizer.eos_token == "</s>"
    assert tokenizer.pad_token == "<pad>"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is my order?"},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|system|>\nBe brief.</s>\n<|user|>\nWhere is my order?</s>\n<|assistant|>\n"
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    assert tokenizer.decode(ids["input_ids"][0]) == prompt  # byte-level BPE round-trips
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4


def test_same_arguments_give_identical_files(tmp_path: Path) -> None:
    from brightrun_trainer.tiny import build_tiny_model

    a = build_tiny_model(tmp_path / "a", num_layers=1, hidden_size=32, seed=3)
    b = build_tiny_model(tmp_path / "b", num_layers=1, hidden_size=32, seed=3)
    c = build_tiny_model(tmp_path / "c", num_layers=1, hidden_size=32, seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]


def test_cli_builds_a_model_with_extra_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("zyxwvut zyxwvut zyxwvut\n" * 50)
    out = tmp_path / "m"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "brightrun_trainer.tiny",
            str(out),
            "--layers",
            "1",
            "--hidden-size",
            "32",
            "--corpus",
            str(corpus),
        ],
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert '"parameters"' in proc.stdout.splitlines()[-1]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer.tokenize(" zyxwvut")) == 1  # the extra corpus shaped the merges
