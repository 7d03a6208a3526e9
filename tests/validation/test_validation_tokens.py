"""Chat-template tokenization and the tokenizer-aware checks, with the tiny local model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from brightrun.validation import (
    IGNORE_INDEX,
    ChatEncoder,
    Message,
    TokenizerLoadError,
    TokenizerUnavailableError,
    encode_chat,
    load_tokenizer,
    validate_file,
)
from brightrun.validation.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplateError

CONVERSATION = [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Refund order 123"},
    {"role": "assistant", "content": "Done, the refund is on its way."},
]


def _targets(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    assert len(ids) == len(labels)
    kept = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels, strict=True))
    return str(tokenizer.decode(kept))


def test_labels_are_the_assistant_turns_with_their_end_token(tiny_tokenizer: Any) -> None:
    encoded = encode_chat(tiny_tokenizer, CONVERSATION)
    text = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert encoded.input_ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.eos_token
    assert _targets(tiny_tokenizer, encoded.input_ids, encoded.labels) == (
        f"Hi! How can I help?{eos}Done, the refund is on its way.{eos}"
    )
    assert not encoded.truncated
    assert encoded.n_tokens == len(encoded.input_ids)
    n_labels = sum(1 for label in encoded.labels[1:] if label != IGNORE_INDEX)
    assert encoded.n_target_tokens == encoded.n_target_tokens_full == n_labels


def test_message_objects_and_mappings_encode_the_same(tiny_tokenizer: Any) -> None:
    as_objects = [Message(m["role"], m["content"]) for m in CONVERSATION]
    assert encode_chat(tiny_tokenizer, as_objects) == encode_chat(tiny_tokenizer, CONVERSATION)


def test_truncation_counts_the_targets_that_survive(tiny_tokenizer: Any) -> None:
    full = encode_chat(tiny_tokenizer, CONVERSATION)
    first_target = next(k for k, label in enumerate(full.labels) if label != IGNORE_INDEX)
    cut = encode_chat(tiny_tokenizer, CONVERSATION, first_target + 3)
    assert cut.truncated
    assert cut.input_ids == full.input_ids[: first_target + 3]
    assert cut.labels == full.labels[: first_target + 3]
    assert cut.n_target_tokens == 3
    assert cut.n_target_tokens_full == full.n_target_tokens
    masked = encode_chat(tiny_tokenizer, CONVERSATION, first_target)
    assert masked.n_target_tokens == 0
    assert set(masked.labels) == {IGNORE_INDEX}


class _NoBackend:
    """A tokenizer seen through its Python API only (like slow tokenizers)."""

    def __init__(self, tokenizer: Any, chat_template: str | None) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.eos_token = tokenizer.eos_token

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        return self._tok.apply_chat_template(conversation, **kwargs)

    def __call__(self, text: str, **kwargs: Any) -> Any:
        return self._tok(text, **kwargs)


def test_the_python_api_path_matches_the_fast_backend(tiny_tokenizer: Any) -> None:
    slow = _NoBackend(tiny_tokenizer, tiny_tokenizer.chat_template)
    assert encode_chat(slow, CONVERSATION, 40) == encode_chat(tiny_tokenizer, CONVERSATION, 40)


def test_a_tokenizer_without_template_uses_the_default(tiny_tokenizer: Any) -> None:
    bare = _NoBackend(tiny_tokenizer, None)
    encoder = ChatEncoder(bare)
    assert encoder.chat_template == DEFAULT_CHAT_TEMPLATE
    assert "### Assistant:\nHi! How can I help?" in encoder.render(CONVERSATION)


# A template that marks the last message differently: prefixes are not prefixes.
LAST_MARKED = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
    "{% if loop.last %}{{ ' [end]' }}{% endif %}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def test_targets_fall_back_to_the_reply_text_for_unstable_templates(tiny_tokenizer: Any) -> None:
    encoded = encode_chat(tiny_tokenizer, CONVERSATION, chat_template=LAST_MARKED)
    targets = _targets(tiny_tokenizer, encoded.input_ids, encoded.labels)
    assert "Hi! How can I help?" in targets
    assert "Done, the refund is on its way." in targets
    assert "Hello there" not in targets


NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
STRICT_ALTERNATION = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
)


def _chat_file(tmp_path: Path, records: list[list[dict[str, str]]]) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in records), encoding="utf-8")
    return path


def test_template_errors_and_dropped_messages_are_reported(tiny_tokenizer: Any, tmp_path: Path) -> None:
    path = _chat_file(tmp_path, [CONVERSATION, CONVERSATION[1:3]])
    report = validate_file(path, tokenizer=tiny_tokenizer, chat_template=STRICT_ALTERNATION)
    assert [(i.type, i.severity, i.path, i.line) for i in report.issues] == [
        ("template_error", "critical", "[0]", 1),
    ]
    assert "System role not supported" in report.issues[0].message
    assert report.stats.tokens is not None
    assert report.stats.tokens.template_errors == 1

    report = validate_file(path, tokenizer=tiny_tokenizer, chat_template=NO_SYSTEM)
    assert [(i.type, i.severity, i.path) for i in report.issues] == [
        ("template_drops_content", "warning", "[0]"),
    ]
    with pytest.raises(ChatTemplateError):
        ChatEncoder(tiny_tokenizer, chat_template=STRICT_ALTERNATION).render(CONVERSATION)


def test_token_statistics(tiny_tokenizer: Any, tmp_path: Path) -> None:
    path = _chat_file(tmp_path, [CONVERSATION, CONVERSATION[1:3], CONVERSATION[:3]])
    report = validate_file(path, tokenizer=tiny_tokenizer)
    tokens = report.stats.tokens
    assert tokens is not None
    assert report.max_seq_len == 2048  # the default
    lengths = [encode_chat(tiny_tokenizer, c).n_tokens for c in (CONVERSATION, CONVERSATION[1:3], CONVERSATION[:3])]
    assert tokens.examples == 3
    assert tokens.total_tokens == sum(lengths)
    assert (tokens.lengths.min, tokens.lengths.max) == (min(lengths), max(lengths))
    assert report.stats.length_unit == "tokens"
    assert tokens.over_max_seq_len == 0
    assert report.score_breakdown().bonuses == {"fits_max_seq_len": 2}
    checks = {c.name: c.passed for c in report.readiness()}
    assert checks["tokenization"] is True

    short = validate_file(path, tokenizer=tiny_tokenizer, max_seq_len=min(lengths) - 1)
    assert short.stats.tokens is not None
    assert short.stats.tokens.over_max_seq_len == 3
    assert short.stats.tokens.max_overflow == max(lengths) - min(lengths) + 1


def test_base_model_by_local_path(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _chat_file(tmp_path, [CONVERSATION])
    report = validate_file(path, base_model=str(tiny_model_dir), max_seq_len=8)
    assert report.base_model == str(tiny_model_dir)
    assert [i.type for i in report.issues] == ["all_labels_masked"]


def test_unknown_base_model_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerLoadError, match="cannot load the tokenizer"):
        load_tokenizer(str(tmp_path / "no-such-model"))


def test_without_transformers_the_error_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(TokenizerUnavailableError, match=r"pip install 'brightrun\[trainer\]'"):
        validate_file(_chat_file(tmp_path, [CONVERSATION]), base_model="any/model")
