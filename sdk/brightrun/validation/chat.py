"""Chat-template tokenization: one conversation to input ids and training labels.

Pure functions over a Hugging Face tokenizer object and plain Python lists — no
torch. The trainer and the validator use the same code, so what validation
measures is what training sees.

How targets are found, for any chat template: the conversation is rendered once
(``F``). For each assistant message ``i`` the template is rendered twice more:
the messages before it with the generation prompt (``P_i``) and the messages up
to and including it (``Q_i``). When both are prefixes of ``F`` (true for every
well-behaved template), the characters ``F[len(P_i):len(Q_i.rstrip())]`` are
that turn's target: the reply plus whatever the template closes the turn with
(an end-of-turn token), so the model learns to stop; trailing whitespace after
the turn is not trained. When a template is not prefix-stable for a turn (it
rewrites earlier turns, or cannot render the prefix, as for a conversation that
starts with the assistant), the target falls back to the reply text found in
``F`` after the previous target, plus the EOS token when it follows.

``F`` is tokenized once without adding special tokens (the template carries
them, like ``apply_chat_template(tokenize=True)``); a token is a target when it
overlaps a target character span. Every assistant turn is a target; system and
user turns are masked (label ``-100``). Truncation keeps the first
``max_seq_len`` tokens. ``n_target_tokens`` counts target tokens at positions 1
and later: a causal LM never predicts the token at position 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

#: Label of a token that is not trained on (PyTorch's cross-entropy ignore index).
IGNORE_INDEX = -100

#: Template used when a tokenizer has none (plain-text markers, EOS ends each turn);
#: the same as the trainer's.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' }}"
    "{{ message['content'] + (eos_token or '') + '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)

TRAINER_EXTRA = "pip install 'brightrun[trainer]'"


class TokenizerUnavailableError(RuntimeError):
    """transformers is not installed, so no tokenizer can be loaded."""


class TokenizerLoadError(ValueError):
    """The base model's tokenizer cannot be loaded (unknown name, offline, ...)."""


class ChatTemplateError(ValueError):
    """The chat template refused to render a conversation."""


class _HasChatTemplate(Protocol):
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


class EncodedChat(NamedTuple):
    """A tokenized conversation.

    ``input_ids`` and ``labels`` are truncated to ``max_seq_len``; ``labels`` is
    ``IGNORE_INDEX`` outside the assistant targets. ``n_tokens`` is the length
    before truncation, ``n_target_tokens`` the number of target tokens kept and
    ``n_target_tokens_full`` the number before truncation.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    n_target_tokens: int
    n_tokens: int
    n_target_tokens_full: int


class ChatMeasure(NamedTuple):
    """Token counts of a conversation without building id lists (validation)."""

    n_tokens: int
    n_target_tokens: int
    n_target_tokens_full: int
    truncated: bool
    #: Messages (by index) whose text does not appear in the rendered template.
    dropped: tuple[int, ...]


def load_tokenizer(base_model: str) -> Any:
    """Load a tokenizer by local path or hub name through ``AutoTokenizer``.

    Offline use: pass a local directory, or set ``HF_HUB_OFFLINE=1`` to resolve
    names from the local cache only. Raises :class:`TokenizerUnavailableError`
    without transformers and :class:`TokenizerLoadError` when loading fails.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise TokenizerUnavailableError(f"tokenizer-aware validation needs transformers: {TRAINER_EXTRA}") from e
    try:
        return AutoTokenizer.from_pretrained(base_model)
    except Exception as e:  # transformers raises OSError, ValueError, HTTP errors...
        raise TokenizerLoadError(f"cannot load the tokenizer of {base_model!r}: {e}") from e


def _as_dicts(messages: Sequence[Any]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for m in messages:
        if isinstance(m, Mapping):
            out.append({"role": str(m["role"]), "content": str(m["content"])})
        else:
            out.append({"role": m.role, "content": m.content})
    return out


@dataclass(slots=True)
class _Rendered:
    text: str
    spans: list[tuple[int, int]]
    dropped: tuple[int, ...]


class ChatEncoder:
    """Renders and tokenizes conversations with one tokenizer; reuse it.

    Uses the tokenizer's fast backend (``backend_tokenizer``) directly when it
    has one, and the tokenizer's ``__call__`` otherwise.
    """

    def __init__(self, tokenizer: Any, *, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template: str = chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        eos = getattr(tokenizer, "eos_token", None)
        self._eos: str | None = eos if isinstance(eos, str) and eos else None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend if backend is not None and hasattr(backend, "encode") else None

    # -- rendering ---------------------------------------------------------

    def render(self, messages: Sequence[Any], *, add_generation_prompt: bool = False) -> str:
        """The chat template applied to ``messages``, as text."""
        tok: _HasChatTemplate = self.tokenizer
        try:
            out = tok.apply_chat_template(
                _as_dicts(messages),
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=self.chat_template,
            )
        except Exception as e:  # jinja2.TemplateError, ValueError, TypeError...
            raise ChatTemplateError(str(e) or type(e).__name__) from e
        if not isinstance(out, str):
            raise ChatTemplateError(f"the chat template returned {type(out).__name__}, not text")
        return out

    def _render_with_spans(self, messages: Sequence[Any]) -> _Rendered:
        msgs = _as_dicts(messages)
        full = self.render(msgs)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            span = None
            if i > 0:
                try:
                    prompt = self.render(msgs[:i], add_generation_prompt=True)
                    upto = full if i == len(msgs) - 1 else self.render(msgs[: i + 1])
                except ChatTemplateError:
                    prompt = upto = ""
                a, b = len(prompt), len(upto.rstrip())
                if prompt and a < b and full.startswith(upto) and upto.startswith(prompt):
                    span = (a, b)
            if span is None:  # not prefix-stable: find the reply text itself
                needle = m["content"].strip() or m["content"]
                at = full.find(needle, cursor) if needle else -1
                if at >= 0:
                    end = at + len(needle)
                    if self._eos and full.startswith(self._eos, end):
                        end += len(self._eos)
                    span = (at, end)
            if span is not None and span[1] > span[0]:
                spans.append(span)
                cursor = span[1]
        dropped = tuple(i for i, m in enumerate(msgs) if (needle := m["content"].strip()) and needle not in full)
        return _Rendered(full, spans, dropped)

    # -- tokenizing ------------------------------------------------------------

    def _token_spans(self, text: str, spans: list[tuple[int, int]]) -> tuple[Any, list[tuple[int, int]], int]:
        """Tokenize ``text``; map char spans to token index ranges ``[t0, t1)``."""
        if self._backend is not None:
            enc = self._backend.encode(text, add_special_tokens=False)
            n = len(enc)
            found = [_char_span_to_tokens(enc.char_to_token, a, b) for a, b in spans]
            return enc, [r for r in found if r is not None], n
        out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(out["input_ids"])
        offsets = list(out["offset_mapping"])
        ranges: list[tuple[int, int]] = []
        for a, b in spans:
            hits = [k for k, (s, e) in enumerate(offsets) if s < b and e > a]
            if hits:
                ranges.append((hits[0], hits[-1] + 1))
        return ids, ranges, len(ids)

    def encode(self, messages: Sequence[Any], max_seq_len: int | None = None) -> EncodedChat:
        """Input ids and labels of one conversation (see the module doc)."""
        rendered = self._render_with_spans(messages)
        enc, ranges, n = self._token_spans(rendered.text, rendered.spans)
        ids: list[int] = list(enc.ids) if self._backend is not None else enc
        labels = [IGNORE_INDEX] * n
        for t0, t1 in ranges:
            labels[t0:t1] = ids[t0:t1]
        truncated = max_seq_len is not None and n > max_seq_len
        if truncated:
            assert max_seq_len is not None
            ids = ids[:max_seq_len]
            labels = labels[:max_seq_len]
        full_targets, kept = _count_targets(ranges, n, max_seq_len)
        return EncodedChat(ids, labels, truncated, kept, n, full_targets)

    def measure(self, messages: Sequence[Any], max_seq_len: int | None = None) -> ChatMeasure:
        """Token counts only; raises :class:`ChatTemplateError` if rendering fails."""
        rendered = self._render_with_spans(messages)
        _, ranges, n = self._token_spans(rendered.text, rendered.spans)
        full_targets, kept = _count_targets(ranges, n, max_seq_len)
        truncated = max_seq_len is not None and n > max_seq_len
        return ChatMeasure(n, kept, full_targets, truncated, rendered.dropped)


def _count_targets(ranges: list[tuple[int, int]], n: int, max_seq_len: int | None) -> tuple[int, int]:
    """Target tokens at positions >= 1, before and after truncation to ``max_seq_len``."""
    keep = n if max_seq_len is None else min(n, max_seq_len)
    full = sum(max(0, t1 - max(t0, 1)) for t0, t1 in ranges)
    kept = sum(max(0, min(t1, keep) - max(t0, 1)) for t0, t1 in ranges)
    return full, kept


def _char_span_to_tokens(char_to_token: Any, a: int, b: int) -> tuple[int, int] | None:
    """Token range overlapping characters ``[a, b)``, or None when no token does."""
    t0 = None
    for pos in range(a, b):
        t0 = char_to_token(pos)
        if t0 is not None:
            break
    if t0 is None:
        return None
    t1 = None
    for pos in range(b - 1, a - 1, -1):
        t1 = char_to_token(pos)
        if t1 is not None:
            break
    assert t1 is not None
    return t0, t1 + 1


def encode_chat(
    tokenizer: Any,
    messages: Sequence[Any],
    max_seq_len: int | None = None,
    *,
    chat_template: str | None = None,
) -> EncodedChat:
    """Tokenize one conversation with the tokenizer's chat template.

    ``messages`` holds ``{"role", "content"}`` mappings or :class:`Message`
    objects. Returns ``EncodedChat(input_ids, labels, truncated,
    n_target_tokens, n_tokens, n_target_tokens_full)``. For many conversations,
    build one :class:`ChatEncoder` and call :meth:`ChatEncoder.encode`.
    """
    return ChatEncoder(tokenizer, chat_template=chat_template).encode(messages, max_seq_len)
