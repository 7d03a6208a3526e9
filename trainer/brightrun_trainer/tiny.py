"""Tiny, deterministic Llama-style models for tests, demos and benchmarks.

:func:`build_tiny_model` writes a directory that ``AutoModelForCausalLM`` and
``AutoTokenizer`` load exactly like a hub model: a small ``LlamaConfig`` with
seeded random weights, and a byte-level BPE tokenizer trained locally (no
download) on a built-in English corpus plus any text you pass, with BOS / EOS /
PAD tokens and a chat template for ``system`` / ``user`` / ``assistant`` turns.

The same arguments always produce the same files, in a few seconds::

    python -m brightrun_trainer.tiny /tmp/tiny-llama --layers 2 --hidden-size 64
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

#: Chat template of tiny models. Every turn is ``<|role|>\ncontent</s>\n``; the
#: generation prompt is ``<|assistant|>\n``.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

#: The demo model: about 1M parameters; with :data:`DEMO_PARAMS` on
#: ``examples/data/support_chat.jsonl`` (and that file's text passed as
#: ``corpus``) a job takes 30-60 s on 2 CPU cores and the train loss falls from
#: about 6.8 to below 1.
DEMO_MODEL_ARGS: dict[str, int] = {
    "num_layers": 4,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_heads": 4,
    "num_kv_heads": 2,
}
#: TrainingParams overrides for the demo job. A randomly initialised model can
#: only sharpen its predictions through its output layer, so ``lm_head`` is a
#: LoRA target next to every linear layer.
DEMO_PARAMS: dict[str, object] = {
    "lora_rank": 16,
    "lora_alpha": 32,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
    "learning_rate": 5e-3,
    "batch_size": 8,
    "max_seq_length": 256,
    "epochs": 8,
    "warmup_ratio": 0.03,
    "checkpoint_interval_steps": 50,
}

_SUBJECTS = (
    "the customer",
    "our team",
    "the support agent",
    "a new user",
    "the billing system",
    "the engineer",
    "my account",
    "the order",
    "the package",
    "the manager",
    "your subscription",
    "the model",
)
_VERBS = (
    "needs",
    "updated",
    "cannot find",
    "received",
    "will review",
    "has cancelled",
    "is waiting for",
    "asked about",
    "confirmed",
    "reset",
    "shipped",
    "refunded",
)
_OBJECTS = (
    "the invoice",
    "a refund",
    "the password",
    "the delivery date",
    "an upgrade",
    "the tracking number",
    "the settings page",
    "a replacement",
    "the training data",
    "the error message",
    "two factor authentication",
    "the latest release",
)
_TAILS = (
    "today.",
    "as soon as possible.",
    "before Friday.",
    "after the update.",
    "without any problems.",
    "again, thank you.",
    "for the third time.",
    "within 24 hours.",
    "and it works now.",
    "because of a bug.",
)
_PARAGRAPH = (
    "Hello! How can I help you today? Thank you for reaching out. I'm sorry to hear "
    "about the trouble with your order. Could you share your order number, please? "
    "Your refund has been processed and should appear in 3 to 5 business days. "
    "Is there anything else I can help you with? Have a great day! "
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000. "
    "Questions, answers, problems, solutions: we write them all down, step by step."
)


def builtin_corpus(n_sentences: int = 2000, seed: int = 0) -> Iterator[str]:
    """Yield a deterministic English corpus for training the tiny tokenizer."""
    rng = random.Random(seed)
    yield _PARAGRAPH
    for _ in range(n_sentences):
        sentence = " ".join((rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_TAILS)))
        yield sentence[0].upper() + sentence[1:]


def _train_tokenizer(texts: Iterable[str], vocab_size: int) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 192,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 1024,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
) -> Path:
    """Write a tiny Llama-style model and its tokenizer to ``out_dir``; return the path.

    ``vocab_size`` is the BPE target; the model's embedding size is the trained
    tokenizer's actual size (never more than ``vocab_size`` plus the specials).
    Keep the linear layers' output sizes multiples of 32 (bitsandbytes' CPU
    4-bit kernels need it) if the model is to be loaded in NF4.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    texts: list[str] = list(builtin_corpus(seed=seed))
    if corpus is not None:
        texts.extend(corpus)
    raw_tokenizer = _train_tokenizer(texts, vocab_size)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=raw_tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=max_position_embeddings,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    actual_vocab = len(tokenizer)

    config = LlamaConfig(
        vocab_size=actual_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        dtype="float32",
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def count_parameters(model_dir: str | Path) -> int:
    """Number of parameters stored in a model directory (safetensors only)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                shape = f.get_slice(key).get_shape()
                n = 1
                for dim in shape:
                    n *= int(dim)
                total += n
    return total


def _read_corpus(path: Path) -> Iterator[str]:
    """Lines of a text file, or message contents when it is a BrightRun dataset."""
    if path.suffix in {".jsonl", ".json"}:
        from brightrun.validation import iter_examples

        for example in iter_examples(path):
            for message in example.messages:
                yield message.content
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.rstrip("\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m brightrun_trainer.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--intermediate-size", type=int, default=192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--max-positions", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--corpus",
        type=Path,
        action="append",
        default=[],
        help="extra tokenizer training text: a text file (one text a line) or a dataset file",
    )
    args = parser.parse_args(argv)
    extra: list[str] = []
    for path in args.corpus:
        extra.extend(_read_corpus(path))
    out = build_tiny_model(
        args.out_dir,
        num_layers=args.layers,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        vocab_size=args.vocab_size,
        max_position_embeddings=args.max_positions,
        seed=args.seed,
        corpus=extra or None,
    )
    print(json.dumps({"path": str(out), "parameters": count_parameters(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
