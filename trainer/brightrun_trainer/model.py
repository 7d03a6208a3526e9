"""Model loading: tokenizer, base model (optionally 4/8-bit), LoRA adapters."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from brightrun_trainer.config import lora_kwargs
from brightrun_trainer.data import DEFAULT_CHAT_TEMPLATE, Progress
from brightrun_trainer.spec import QuantizationMode, TrainingParams

log = logging.getLogger(__name__)


def pick_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def load_tokenizer(base_model: str) -> tuple[Any, bool]:
    """The base model's tokenizer, and whether a default chat template was set on it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    defaulted = False
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        defaulted = True
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, defaulted


@dataclass(slots=True)
class LoadedModel:
    #: The ``peft.PeftModel`` wrapping the base model.
    model: Any
    device: torch.device
    trainable_params: int
    total_params: int
    dtype: torch.dtype


def _compute_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(
    base_model: str, params: TrainingParams, progress: Progress, device: torch.device | None = None
) -> LoadedModel:
    """Load the base model, quantize it if asked, and attach fresh LoRA adapters.

    The adapters are initialised from ``params.seed`` so a run is reproducible.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = device or pick_device()
    dtype = _compute_dtype(device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    quantized = params.quantization is not QuantizationMode.NONE
    progress(f"Loading model from {base_model}...", 0.0)
    if params.quantization is QuantizationMode.NF4:
        progress("Applying 4-bit quantization (QLoRA)...", 0.1)
        kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    elif params.quantization is QuantizationMode.INT8:
        progress("Applying 8-bit quantization...", 0.1)
        kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_8bit=True
        )
    if quantized:
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    model: Any = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    if not quantized:
        model.to(device)
    model.config.use_cache = False
    progress("Model loaded", 0.6)

    checkpointing_kwargs = {"use_reentrant": False}
    if quantized:
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model,
            use_gradient_checkpointing=params.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    elif params.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    if params.gradient_checkpointing:
        progress("Enabling gradient checkpointing...", 0.7)

    progress(f"Initializing LoRA adapters (rank={params.lora_rank})...", 0.8)
    torch.manual_seed(params.seed)
    model = get_peft_model(model, LoraConfig(**lora_kwargs(params)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    progress(f"LoRA adapters ready: {trainable:,} trainable of {total:,} parameters", 1.0)
    return LoadedModel(model, device, trainable, total, dtype)
