"""Preprocessing: examples -> chat template -> tokens with assistant-only labels.

Labels are found for any chat template by rendering prefixes: the text of the
conversation up to an assistant turn *with* the generation prompt marks where
the turn's content starts, the text up to and including the turn marks where
it ends (trailing whitespace excluded, so end-of-turn tokens are trained but
the newline after them is not). Tokens overlapping those character spans keep
their ids as labels; everything else (system, user, template scaffolding,
padding) is ``-100``. Templates whose prefixes are not prefixes of the full
text fall back to locating each assistant message's content in the text.

An example without an assistant turn, whose template fails, or that loses all
its target tokens to truncation is dropped and counted; a dataset with no
trainable example at all is a :class:`DatasetFormatError`.

The training split is shuffled per epoch from ``(seed, epoch)`` with its own
``torch.Generator``, so the data position is just ``(epoch, step in epoch)``.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from brightrun.validation import DatasetFormatError, Example, iter_examples

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: Template used when a tokenizer has none (plain-text markers, EOS ends each turn).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' }}"
    "{{ message['content'] + (eos_token or '') + '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)

#: Called with a sub-status message and progress in the stage (0..1); may raise to stop.
Progress = Callable[[str, float], None]


class ExampleRejected(Exception):
    """One example cannot be trained on; ``reason`` is a stable snake_case code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    weight: float
    #: Conversation index; examples of one conversation stay in one split.
    group: int
    truncated: bool

    @property
    def n_targets(self) -> int:
        """Label tokens the model predicts (the first token never is)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass(slots=True)
class DataStats:
    examples: int = 0
    conversations: int = 0
    trainable: int = 0
    truncated: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    target_tokens: int = 0
    max_tokens: int = 0
    train_examples: int = 0
    validation_examples: int = 0

    def payload(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "conversations": self.conversations,
            "trainable": self.trainable,
            "truncated": self.truncated,
            "dropped": dict(self.dropped),
            "tokens": self.tokens,
            "target_tokens": self.target_tokens,
            "max_tokens": self.max_tokens,
            "mean_tokens": round(self.tokens / self.trainable, 1) if self.trainable else 0.0,
            "train_examples": self.train_examples,
            "validation_examples": self.validation_examples,
        }


@dataclass(slots=True)
class PreparedData:
    train: list[TokenizedExample]
    validation: list[TokenizedExample]
    stats: DataStats


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise ExampleRejected("template_error")
    return text


def assistant_spans(tokenizer: Any, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of its assistant turns."""
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    if not any(m["role"] == "assistant" for m in messages):
        raise ExampleRejected("no_assistant_turn")
    try:
        full = _render(tokenizer, messages, False)
        spans: list[tuple[int, int]] = []
        prefix_ok = True
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            end_text = _render(tokenizer, messages[: i + 1], False)
            start_text = _render(tokenizer, messages[:i], True) if i else _leading_prompt(end_text, message["content"])
            if not (end_text.startswith(start_text) and full.startswith(end_text)):
                prefix_ok = False
                break
            end = len(end_text.rstrip())
            if end > len(start_text):
                spans.append((len(start_text), end))
    except ExampleRejected:
        raise
    except Exception as e:  # jinja raises many kinds; the message may quote the data
        log.debug("chat template failed on example: %s", type(e).__name__)
        raise ExampleRejected("template_error") from None
    if not prefix_ok:
        spans = _spans_by_search(full, messages, tokenizer.eos_token)
    if not spans:
        raise ExampleRejected("no_assistant_content")
    return full, spans


def _leading_prompt(end_text: str, content: str) -> str:
    """The text before a conversation's first message when that is the assistant's.

    Transformers refuses to render an empty conversation, so the prompt is what
    precedes the message's content in the one-message rendering.
    """
    stripped = content.strip()
    at = end_text.find(stripped) if stripped else -1
    return end_text[:at] if at >= 0 else ""


def _spans_by_search(full: str, messages: Sequence[dict[str, str]], eos: str | None) -> list[tuple[int, int]]:
    spans = []
    cursor = 0
    for message in messages:
        content = message["content"].strip()  # templates often trim
        if not content:
            continue
        at = full.find(content, cursor)
        if at < 0:
            continue
        end = at + len(content)
        if message["role"] == "assistant":
            if eos and full.startswith(eos, end):
                end += len(eos)
            spans.append((at, end))
        cursor = end
    return spans


def _labels_from_offsets(
    input_ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    labels = [IGNORE_INDEX] * len(input_ids)
    j = 0
    for t, (start, end) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j == len(spans):
            break
        s_start, s_end = spans[j]
        if end > s_start and start < s_end and end > start:
            labels[t] = input_ids[t]
    return labels


def tokenize_examples(
    tokenizer: Any,
    examples: Sequence[Example],
    max_seq_length: int,
    stats: DataStats,
    progress: Progress | None = None,
    chunk: int = 64,
) -> list[TokenizedExample]:
    """Template, tokenize, label and truncate; rejected examples are counted in ``stats``."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("a fast (Rust) tokenizer with offset mappings is required")
    out: list[TokenizedExample] = []
    total = len(examples)
    for begin in range(0, total, chunk):
        if progress is not None:
            progress(f"Tokenizing {begin} of {total} examples...", begin / max(1, total))
        part = examples[begin : begin + chunk]
        rendered: list[tuple[Example, str, list[tuple[int, int]]]] = []
        for example in part:
            try:
                text, spans = assistant_spans(tokenizer, example)
            except ExampleRejected as e:
                stats.dropped[e.reason] += 1
                continue
            rendered.append((example, text, spans))
        if not rendered:
            continue
        encoded = tokenizer(
            [text for _, text, _ in rendered],
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
        )
        for (example, _, spans), ids, offsets in zip(
            rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            labels = _labels_from_offsets(ids, offsets, spans)
            truncated = len(ids) > max_seq_length
            ids, labels = list(ids[:max_seq_length]), labels[:max_seq_length]
            item = TokenizedExample(ids, labels, example.weight, example.index, truncated)
            n_targets = item.n_targets
            if n_targets == 0:
                stats.dropped["truncated_away" if truncated else "no_target_tokens"] += 1
                continue
            stats.truncated += int(truncated)
            stats.tokens += len(ids)
            stats.target_tokens += n_targets
            stats.max_tokens = max(stats.max_tokens, len(ids))
            out.append(item)
    stats.trainable = len(out)
    if progress is not None:
        progress(f"Tokenized {total} examples", 1.0)
    return out


def split_examples(
    items: Sequence[TokenizedExample], validation_split: float, seed: int
) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """Seeded split by conversation; at least one example on each side when possible."""
    groups = sorted({item.group for item in items})
    n_val = 0
    if validation_split > 0 and len(groups) >= 2:
        n_val = min(max(1, round(len(groups) * validation_split)), len(groups) - 1)
    random.Random(seed).shuffle(groups)
    held_out = set(groups[:n_val])
    train = [item for item in items if item.group not in held_out]
    validation = [item for item in items if item.group in held_out]
    return train, validation


def prepare_dataset(
    path: Path,
    fmt: str,
    tokenizer: Any,
    *,
    max_seq_length: int,
    validation_split: float,
    seed: int,
    progress: Progress,
) -> PreparedData:
    """Load, tokenize and split a dataset; raise DatasetFormatError if nothing is trainable."""
    stats = DataStats()
    progress("Parsing dataset...", 0.0)
    examples: list[Example] = []
    for example in iter_examples(path, fmt):
        examples.append(example)
        if len(examples) % 5000 == 0:
            progress(f"Parsing dataset ({len(examples)} examples so far)...", 0.05)
    stats.examples = len(examples)
    stats.conversations = len({e.index for e in examples})
    progress(f"Parsed {stats.conversations} conversations ({stats.examples} examples)", 0.1)
    if not examples:
        raise DatasetFormatError("the dataset holds no examples")

    def sub(message: str, fraction: float) -> None:
        progress(message, 0.1 + 0.8 * fraction)

    items = tokenize_examples(tokenizer, examples, max_seq_length, stats, sub)
    del examples
    if not items:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(stats.dropped.items()))
        raise DatasetFormatError(
            f"no trainable example in {stats.examples} examples ({reasons}; max_seq_length={max_seq_length})"
        )
    pct = round(validation_split * 100)
    progress(f"Creating train/validation split ({100 - pct}/{pct})...", 0.95)
    train, validation = split_examples(items, validation_split, seed)
    stats.train_examples, stats.validation_examples = len(train), len(validation)
    progress(f"{len(train)} training and {len(validation)} validation examples", 1.0)
    return PreparedData(train, validation, stats)


# -- batching --------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of an epoch: a permutation seeded by ``(seed, epoch)`` only."""
    import torch

    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return [int(i) for i in torch.randperm(n, generator=generator)]


def micro_batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def steps_per_epoch(n_train: int, batch_size: int, accumulation: int) -> int:
    return math.ceil(math.ceil(n_train / batch_size) / accumulation)


@dataclass(frozen=True, slots=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    #: Per-token loss weights (the example's weight), 0 where the label is ignored.
    weights: torch.Tensor
    #: Non-padding tokens.
    tokens: int
    #: Predicted label tokens (labels after the causal shift).
    targets: int


def collate(items: Sequence[TokenizedExample], pad_id: int) -> Batch:
    """Right-pad a micro-batch to its longest example."""
    import torch

    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    weights = torch.zeros((len(items), width), dtype=torch.float32)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(item.labels, dtype=torch.long)
        attention[row, :n] = 1
        weights[row, :n] = item.weight
    weights = weights * (labels != IGNORE_INDEX)
    return Batch(
        input_ids,
        attention,
        labels,
        weights,
        tokens=int(attention.sum()),
        # Position 0 is never predicted: count the targets after the shift.
        targets=int((labels[:, 1:] != IGNORE_INDEX).sum()),
    )
