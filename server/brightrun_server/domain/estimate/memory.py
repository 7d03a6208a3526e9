"""Peak training memory of a LoRA / QLoRA step, as a breakdown a person can act on.

What is modelled: the trainer's step — a Hugging Face ``*ForCausalLM`` wrapped by
``peft.get_peft_model``, ``loss = model(input_ids, attention_mask, labels).loss``,
``loss.backward()``, ``AdamW(trainable).step()`` — at its peak, which is the start
of the backward pass (every saved activation alive, the loss gradients just
allocated) on the step after the optimizer state exists.

Every term below is ``count x bytes``; each cites where the count comes from.
The per-layer activation inventory was checked tensor class by tensor class against
measured peaks of tiny Llama models on CPU (tests/estimate/test_cpu_accuracy.py:
vocab, layer, dropout, target-module and checkpointing sweeps each move the measured
peak by what the term predicts, within ~2 %).

Notation: T = micro batch x sequence length (tokens in one forward), L layers, h
hidden, q = heads x head_dim, kv = KV heads x head_dim, i intermediate, V vocab,
``act`` = bytes of one activation element (bf16 on CUDA = 2, fp32 on CPU = 4).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from brightrun_server.domain.estimate.catalog import CatalogDefaults, Device, Linear, ModelArch
from brightrun_trainer.spec import QuantizationMode, TrainingParams

GIB = 2**30

#: Bytes of one weight element when not quantized: bf16 on CUDA (models load in
#: their 16-bit dtype), fp32 on CPU (the CPU path trains in fp32).
_WEIGHT_BYTES = {"cuda": 2, "cpu": 4}
#: Activation element bytes, as above.
_ACT_BYTES = {"cuda": 2, "cpu": 4}
#: LoRA A/B weights are fp32 on both: PEFT's ``get_peft_model(...,
#: autocast_adapter_dtype=True)`` (the default since peft 0.12) upcasts fp16/bf16
#: adapter weights to fp32 ("typically required for stable training", peft
#: ``tuners_utils.BaseTuner._cast_adapter_dtype``).
ADAPTER_BYTES = 4
#: Bytes of the dropout mask kept for backward. CUDA: the fused
#: ``at::native_dropout`` kernel returns a bool mask (1 byte). CPU: ATen's
#: ``_dropout_impl`` multiplies by a noise tensor of the input's dtype and autograd
#: keeps that tensor (4 bytes in fp32) — measured: turning LoRA dropout off on the
#: CPU tiny model frees 8 bytes per masked element, output + noise.
_MASK_BYTES = {"cuda": 1, "cpu": 4}

#: NF4 (QLoRA, Dettmers et al. 2023, sec. 3): 4-bit codes = 0.5 byte per weight,
#: one absmax per block of 64 weights. With double quantization (the QLoRA
#: default and the trainer's) the absmax values are 8-bit with one fp32 constant per
#: 256 of them: 8/64 + 32/(64*256) = 0.127 bits per weight (paper, sec. 3 "Double
#: Quantization"); bitsandbytes ``quantize_4bit(blocksize=64)`` +
#: ``Params4bit(compress_statistics=True)``.
NF4_BYTES_PER_WEIGHT = 0.5
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256
#: LLM.int8 (Dettmers et al. 2022; bitsandbytes ``Int8Params``): 1 byte per weight
#: plus one fp32 absmax scale per output row (``SCB``).
INT8_BYTES_PER_WEIGHT = 1
INT8_ROW_SCALE_BYTES = 4

#: AdamW keeps ``exp_avg`` and ``exp_avg_sq`` per trainable parameter, in the
#: parameter's dtype (fp32 adapters -> 8 bytes); torch.optim.AdamW, Loshchilov &
#: Hutter 2019. Gradients: one fp32 per trainable parameter.
ADAM_STATE_BYTES = 2 * ADAPTER_BYTES
GRAD_BYTES = ADAPTER_BYTES

#: Cross-entropy over the vocabulary: transformers' ``ForCausalLMLoss`` upcasts the
#: logits with ``logits.float()``; ``cross_entropy`` keeps the fp32 log-softmax
#: output for backward; backward allocates the NLL gradient (T x V fp32) and the
#: log-softmax input gradient (T x V fp32) while the saved output is alive: 3 fp32
#: T x V tensors = 12 bytes per logit at the peak. Forward peak is lower (bf16
#: logits 2 + fp32 copy 4 + log-softmax 4 = 10). Measured on CPU: doubling V adds
#: 12.0 bytes per token per vocab entry. This term dominates small models: for
#: Llama-3.2-1B at 4 x 2048 tokens it is 12 x 8192 x 128256 = 12.6 GB.
LOGIT_BYTES = 12


@dataclass(frozen=True, slots=True)
class MemoryItem:
    """One line of the breakdown."""

    name: str
    bytes: int
    formula: str
    #: "allocated": tensors the framework allocates (what
    #: ``torch.cuda.max_memory_allocated`` counts); "reserved": the allocator's
    #: unused cache; "context": CUDA context and libraries.
    kind: str = "allocated"


@dataclass(frozen=True, slots=True)
class MemoryBreakdown:
    items: tuple[MemoryItem, ...]
    trainable_parameters: int
    tokens_per_micro_batch: int
    seq_len: int

    @property
    def allocated_bytes(self) -> int:
        return sum(it.bytes for it in self.items if it.kind == "allocated")

    @property
    def reserved_bytes(self) -> int:
        """What ``torch.cuda.max_memory_reserved`` would show (allocated + cache)."""
        return sum(it.bytes for it in self.items if it.kind in ("allocated", "reserved"))

    @property
    def total_bytes(self) -> int:
        """Device memory in use as ``nvidia-smi`` shows it (everything)."""
        return sum(it.bytes for it in self.items)

    def item(self, name: str) -> MemoryItem:
        for it in self.items:
            if it.name == name:
                return it
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class TargetedLinear:
    linear: Linear
    rank: int

    @property
    def lora_params_per_layer(self) -> int:
        """r x (in + out) per copy: A is (r x in), B is (out x r) (LoRA paper, Hu et al.
        2021, sec. 4.1; peft ``LoraLayer.update_layer``)."""
        lin = self.linear
        return self.rank * (lin.in_features + lin.out_features) * lin.copies


def targeted_linears(arch: ModelArch, params: TrainingParams) -> tuple[TargetedLinear, ...]:
    """The linears a ``target_modules`` list selects; ``all-linear`` selects every one
    (peft's shorthand). Unknown names select nothing, as peft would raise for them."""
    names: Iterable[str] = params.target_modules
    if any(n == "all-linear" for n in names):
        names = [lin.name for lin in arch.linears() if lin.name != "gate"]
    seen: dict[str, TargetedLinear] = {}
    for name in names:
        lin = arch.linear(name)
        if lin is not None and lin.name not in seen:
            seen[lin.name] = TargetedLinear(lin, params.lora_rank)
    return tuple(seen.values())


def lora_parameter_count(arch: ModelArch, params: TrainingParams) -> int:
    """Trainable LoRA parameters: sum over targeted linears of r x (in + out) x L."""
    return arch.num_layers * sum(t.lora_params_per_layer for t in targeted_linears(arch, params))


def weight_bytes(arch: ModelArch, quantization: QuantizationMode, device: Device) -> tuple[int, str]:
    """Base weights at their stored precision, and the formula used."""
    w = _WEIGHT_BYTES[device]
    total = arch.parameter_count()
    if quantization == QuantizationMode.NONE:
        return total * w, f"{total:,} params x {w} B"
    quant = arch.quantizable_params()
    rest = total - quant
    if quantization == QuantizationMode.NF4:
        codes = quant * NF4_BYTES_PER_WEIGHT
        absmax8 = quant / NF4_BLOCK
        absmax32 = quant / (NF4_BLOCK * NF4_DQ_BLOCK) * 4
        value = int(codes + absmax8 + absmax32) + rest * w
        return value, (
            f"{quant:,} linear weights x (0.5 B NF4 + 1 B/64 absmax + 4 B/(64x256) "
            f"double-quant constants) + {rest:,} embedding/norm params x {w} B"
        )
    rows = arch.quantizable_out_features()
    value = quant * INT8_BYTES_PER_WEIGHT + rows * INT8_ROW_SCALE_BYTES + rest * w
    return value, (
        f"{quant:,} linear weights x 1 B int8 + {rows:,} rows x 4 B scales + {rest:,} embedding/norm params x {w} B"
    )


@dataclass(frozen=True, slots=True)
class _LayerActivations:
    """Bytes saved for backward per token in one decoder layer, by component."""

    norms: int
    attention: int
    mlp: int
    lora: int
    attention_scores_per_token: int  # eager attention only: grows with seq length

    def per_token(self) -> int:
        return self.norms + self.attention + self.mlp + self.lora + self.attention_scores_per_token


def _layer_activations(
    arch: ModelArch,
    params: TrainingParams,
    device: Device,
    seq_len: int,
    padded: bool,
) -> _LayerActivations:
    """Inventory of one decoder layer's saved tensors, per token.

    * RMSNorm (transformers ``LlamaRMSNorm.forward``): ``x.to(float32)``, then
      ``pow(2)`` keeps its fp32 input -> 4h bytes per norm, whatever ``act``; the
      frozen-weight multiply keeps nothing (autograd saves an operand only when the
      other one needs a gradient). ``norms_per_layer`` is 2, or 4 for Gemma 2.
    * Attention via SDPA (flash / memory-efficient kernels, also the CPU flash
      kernel): keeps query, key, value and output plus a fp32 logsumexp per head
      -> (2q + 2kv) x act + 4 x heads. With a padding mask, transformers repeats K/V
      to the query heads before SDPA (``sdpa_attention.use_gqa_in_sdpa`` is false
      when a mask is passed), so K and V are kept at q width. Rotary embedding
      keeps nothing (cos/sin need no gradient). Frozen base projections keep no
      input (their weight needs no gradient).
    * Eager attention (Gemma 2): also the softmax probabilities (fp32, kept by
      softmax) and their bf16 copy (kept by the value matmul) and the soft-capped
      scores (tanh output): heads x seq x (4 + 2 x act) per token.
    * MLP (SwiGLU / GeGLU): the gate output (kept by the activation), the activated
      gate and the up output (kept by their product) -> 3i x act; MoE: per routed
      expert, so x experts_per_tok.
    * LoRA per targeted linear (peft ``lora.Linear.forward``: ``lora_B(lora_A(
      dropout(x))) * scaling``): lora_A keeps its fp32 input — the dropout output
      (4 B) plus the dropout mask — and lora_B keeps A's output (r x 4 B). Each
      targeted module has its own dropout, so q/k/v each keep a copy. With dropout
      0 the input is shared: one fp32 copy per distinct input (CUDA casts bf16 to
      the fp32 adapter dtype; on CPU it is the already-fp32 input).
    """
    act = _ACT_BYTES[device]
    h, q, kv, i = arch.hidden_size, arch.q_dim, arch.kv_dim, arch.intermediate_size
    norms = arch.norms_per_layer * h * 4
    kv_kept = q if (padded and arch.kv_dim != arch.q_dim) else kv
    attention = (2 * q + 2 * kv_kept) * act + 4 * arch.num_attention_heads
    scores = 0
    if arch.attention == "eager":
        scores = arch.num_attention_heads * seq_len * (4 + 2 * act)
    mlp = 3 * i * act * arch.num_experts_per_tok
    lora = 0
    shared_inputs: dict[str, int] = {}
    for t in targeted_linears(arch, params):
        lin = t.linear
        routed = lin.active_copies
        lora += t.rank * ADAPTER_BYTES * routed
        if params.lora_dropout > 0:
            lora += lin.in_features * (ADAPTER_BYTES + _MASK_BYTES[device]) * routed
        else:
            shared_inputs[lin.input_key or lin.name] = lin.in_features * ADAPTER_BYTES * routed
    lora += sum(shared_inputs.values())
    return _LayerActivations(norms, attention, mlp, lora, scores)


def effective_seq_len(params: TrainingParams, longest_example: int | None) -> int:
    """Sequence length of the peak batch: the trainer pads each batch to its longest
    example, capped at ``max_seq_length``; without dataset facts, the cap."""
    if longest_example is None or longest_example <= 0:
        return params.max_seq_length
    return min(params.max_seq_length, longest_example)


def memory_breakdown(
    arch: ModelArch,
    params: TrainingParams,
    *,
    device: Device,
    defaults: CatalogDefaults,
    longest_example: int | None = None,
    padded: bool | None = None,
) -> MemoryBreakdown:
    """The breakdown of peak memory for one configuration (pure arithmetic).

    ``padded``: whether batches carry a padding mask (changes how K/V are kept under
    grouped-query attention). Default: on CUDA when the micro batch is above 1.
    """
    s = effective_seq_len(params, longest_example)
    b = params.batch_size
    tokens = b * s
    if padded is None:
        padded = device == "cuda" and b > 1
    act = _ACT_BYTES[device]
    w_bytes, w_formula = weight_bytes(arch, params.quantization, device)
    n_lora = lora_parameter_count(arch, params)

    layer = _layer_activations(arch, params, device, s, padded)
    per_layer = layer.per_token() * tokens
    final_norm = arch.hidden_size * 4 * tokens
    logits = LOGIT_BYTES * arch.vocab_size * tokens
    if params.gradient_checkpointing:
        # torch.utils.checkpoint (non-reentrant, transformers'
        # gradient_checkpointing_enable) keeps each layer's input hidden state
        # (h x act) and recomputes the layer in backward. The peak is either the
        # loss backward (checkpoints + logits) or one layer's recomputation plus its
        # backward working set (about two intermediate-width gradients); logits are
        # freed by then. Measured on CPU: the loss-backward branch is the peak for
        # Llama shapes.
        kept = arch.num_layers * arch.hidden_size * act * tokens
        recompute = per_layer + 2 * arch.intermediate_size * act * tokens
        activations = kept + max(logits + final_norm, recompute)
        act_formula = (
            f"checkpointing: L x h x {act} B x T ({kept / GIB:.2f} GiB kept) + max(logits "
            f"{LOGIT_BYTES} B x V x T, one layer recomputed {recompute / GIB:.2f} GiB)"
        )
        logits_item = 0
    else:
        activations = arch.num_layers * per_layer + final_norm
        act_formula = (
            f"L x T x {layer.per_token():,} B/token/layer (norms {layer.norms}, attention "
            f"{layer.attention + layer.attention_scores_per_token}, MLP {layer.mlp}, LoRA "
            f"inputs {layer.lora}) + final norm 4h x T; T = {b} x {s}"
        )
        logits_item = logits

    items = [
        MemoryItem(
            f"base model ({params.quantization.value})",
            w_bytes,
            w_formula,
        ),
        MemoryItem(
            f"LoRA adapters (r={params.lora_rank})",
            n_lora * ADAPTER_BYTES,
            f"{n_lora:,} params (r x (in + out) per targeted linear x L) x 4 B fp32",
        ),
        MemoryItem(
            "optimizer state",
            n_lora * ADAM_STATE_BYTES,
            f"AdamW: 2 fp32 moments x {n_lora:,} trainable params",
        ),
        MemoryItem(
            "gradients",
            n_lora * GRAD_BYTES,
            f"fp32 gradient x {n_lora:,} trainable params (base weights are frozen)",
        ),
        MemoryItem(f"activations (batch={b}, seq={s})", activations, act_formula),
    ]
    if logits_item:
        items.append(
            MemoryItem(
                "logits and loss",
                logits_item,
                f"{LOGIT_BYTES} B x V ({arch.vocab_size:,}) x T ({tokens:,}): fp32 "
                "log-softmax + its two backward gradients",
            )
        )
    if device == "cuda":
        frag = int(defaults.allocator_fragmentation * (activations + logits_item))
        items.append(
            MemoryItem(
                "allocator cache",
                frag,
                f"{defaults.allocator_fragmentation:.0%} of activations: PyTorch's caching "
                "allocator holds freed blocks of varying sizes (reserved - allocated)",
                kind="reserved",
            )
        )
        items.append(
            MemoryItem(
                "CUDA context",
                defaults.cuda_context_bytes,
                "CUDA context, cuBLAS/cuDNN workspaces and loaded kernels (not counted by "
                "torch.cuda.max_memory_allocated)",
                kind="context",
            )
        )
    return MemoryBreakdown(
        items=tuple(items),
        trainable_parameters=n_lora,
        tokens_per_micro_batch=tokens,
        seq_len=s,
    )
