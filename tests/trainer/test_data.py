"""Preprocessing: assistant-only labels for any template, truncation, split, order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from brightrun.validation import DatasetFormatError, Example, Message
from brightrun_trainer.data import (
    IGNORE_INDEX,
    DataStats,
    collate,
    epoch_order,
    prepare_dataset,
    split_examples,
    tokenize_examples,
)
from tests.trainer.trainer_harness import REPO

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: Marks the last message differently, so shorter renderings are not prefixes of longer ones.
NON_PREFIX = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
    "{% if loop.last %} <last>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _example(*turns: tuple[str, str], index: int = 0, weight: float = 1.0) -> Example:
    return Example(messages=tuple(Message(r, c) for r, c in turns), index=index, weight=weight)


CONVERSATION = _example(
    ("system", "You are a support agent."),
    ("user", "My order 12345 is late."),
    ("assistant", "Sorry! Order 12345 ships on Monday."),
    ("user", "Thanks."),
    ("assistant", "You're welcome."),
)


def _labelled_runs(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    """Decoded text of each contiguous run of labelled tokens."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return [tokenizer.decode(run) for run in runs]


def test_only_assistant_turns_and_their_eos_are_labelled(tokenizer: Any) -> None:
    stats = DataStats()
    [item] = tokenize_examples(tokenizer, [CONVERSATION], 512, stats)
    assert _labelled_runs(tokenizer, item.input_ids, item.labels) == [
        "Sorry! Order 12345 ships on Monday.</s>",
        "You're welcome.</s>",
    ]
    unlabelled = [t for t, lab in zip(item.input_ids, item.labels, strict=True) if lab == -100]
    text = tokenizer.decode(unlabelled)
    assert "You are a support agent." in text
    assert "My order 12345 is late." in text
    assert "<|assistant|>" in text  # template scaffolding is not trained
    assert not item.truncated


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (CHATML, ["Sorry! Order 12345 ships on Monday.<|im_end|>", "You're welcome.<|im_end|>"]),
        (NON_PREFIX, ["Sorry! Order 12345 ships on Monday.</s>", "You're welcome.</s>"]),
    ],
    ids=["chatml", "non-prefix-template"],
)
def test_labels_follow_any_template(tokenizer: Any, template: str, expected: list[str]) -> None:
    tokenizer.chat_template = template
    [item] = tokenize_examples(tokenizer, [CONVERSATION], 512, DataStats())
    assert _labelled_runs(tokenizer, item.input_ids, item.labels) == expected


def test_truncation_keeps_partial_targets_and_drops_examples_without_any(tokenizer: Any) -> None:
    long_prompt = _example(("user", "word " * 60), ("assistant", "Short answer."), index=1)
    short = _example(("user", "Hi"), ("assistant", "Hello there, how can I help? " * 10), index=2)
    no_assistant = _example(("system", "x"), ("user", "Only a question"), index=3)
    stats = DataStats()
    items = tokenize_examples(tokenizer, [long_prompt, short, no_assistant], 32, stats)
    assert [i.group for i in items] == [2]
    assert items[0].truncated
    assert len(items[0].input_ids) == 32
    assert stats.truncated == 1
    assert stats.dropped == {"truncated_away": 1, "no_assistant_turn": 1}


def test_dataset_without_trainable_example_is_a_format_error(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    row = {"messages": [{"role": "user", "content": "a long question " * 10}, {"role": "assistant", "content": "ok"}]}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DatasetFormatError, match=r"no trainable example in 1 examples \(1 truncated_away"):
        prepare_dataset(
            path,
            "chat_jsonl",
            tokenizer,
            max_seq_length=16,
            validation_split=0.2,
            seed=0,
            progress=lambda _m, _p: None,
        )


def test_prepare_splits_by_conversation_and_reports_progress(tokenizer: Any) -> None:
    messages: list[tuple[str, float]] = []
    data = prepare_dataset(
        REPO / "examples" / "data" / "support_conversations.json",
        "conversations",
        tokenizer,
        max_seq_length=256,
        validation_split=0.25,
        seed=5,
        progress=lambda m, p: messages.append((m, p)),
    )
    train_groups = {i.group for i in data.train}
    val_groups = {i.group for i in data.validation}
    assert train_groups.isdisjoint(val_groups)
    assert len(val_groups) == 3  # 25 % of 12 conversations
    assert data.stats.examples == len(data.train) + len(data.validation)
    assert any(m.startswith("Creating train/validation split (75/25)") for m, _ in messages)
    progress = [p for _, p in messages]
    assert progress == sorted(progress)
    again = split_examples(data.train + data.validation, 0.25, 5)
    assert {i.group for i in again[1]} == val_groups


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    state = torch.get_rng_state()
    a = epoch_order(50, 7, 0)
    assert torch.equal(state, torch.get_rng_state())  # the global generator is untouched
    assert a == epoch_order(50, 7, 0)
    assert sorted(a) == list(range(50))
    assert a != epoch_order(50, 7, 1)
    assert a != epoch_order(50, 8, 0)


def test_collate_pads_right_and_weights_targets(tokenizer: Any) -> None:
    items = tokenize_examples(
        tokenizer,
        [
            _example(("user", "Hi"), ("assistant", "Hello!"), index=0, weight=2.0),
            _example(("user", "A longer question here"), ("assistant", "Yes."), index=1),
        ],
        128,
        DataStats(),
    )
    batch = collate(items, tokenizer.pad_token_id)
    width = max(len(i.input_ids) for i in items)
    assert batch.input_ids.shape == (2, width)
    assert batch.tokens == sum(len(i.input_ids) for i in items)
    assert batch.targets == sum(i.n_targets for i in items)
    short = 0 if len(items[0].input_ids) < width else 1
    assert batch.input_ids[short, -1] == tokenizer.pad_token_id
    assert batch.labels[short, -1] == IGNORE_INDEX
    assert batch.weights[0].max() == 2.0
    assert bool((batch.weights[batch.labels == IGNORE_INDEX] == 0).all())


def test_a_leading_assistant_turn_is_labelled_without_the_bos(tokenizer: Any) -> None:
    example = _example(("assistant", "Welcome to Acme!"), ("user", "Hi"), ("assistant", "Hello."))
    [item] = tokenize_examples(tokenizer, [example], 512, DataStats())
    assert _labelled_runs(tokenizer, item.input_ids, item.labels) == ["Welcome to Acme!</s>", "Hello.</s>"]


def test_search_fallback_handles_templates_that_trim_content(tokenizer: Any) -> None:
    tokenizer.chat_template = NON_PREFIX.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
    example = _example(("user", "  Hi there  "), ("assistant", "  Hello, how can I help?  "))
    [item] = tokenize_examples(tokenizer, [example], 512, DataStats())
    # The template's space before the content merges into the first token (" Hello"), which is trained.
    assert _labelled_runs(tokenizer, item.input_ids, item.labels) == [" Hello, how can I help?</s>"]
