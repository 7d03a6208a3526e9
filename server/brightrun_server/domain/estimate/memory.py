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

The software facts the formulas depend on (adapter dtype, how the loss is
computed, what bitsandbytes keeps for backward, ...) are a :class:`Stack`; its
defaults are this trainer. The published GPU figures the estimator is checked
against (bench/estimate_accuracy.py) were measured with LitGPT and bitsandbytes
0.42.0; they are estimated with the same formulas and that stack's facts, each cited
in tests/data/estimate/published_memory.json. Nothing is fitted to them.

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
#: Hutter 2019. Gradients: one fp32 per trainable parameter. (The trainer's values;
#: :func:`optimizer_state_bytes` computes them from ``Stack.adapter_bytes``.)
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

#: bitsandbytes' paged optimizers allocate a state tensor in CUDA unified memory
#: (``cudaMallocManaged``, outside PyTorch's allocator, so
#: ``torch.cuda.max_memory_allocated`` does not count it) only when the parameter
#: has at least 1e5 elements; smaller ones get ``torch.zeros_like`` (bitsandbytes
#: 0.42.0 ``optim/optimizer.py`` ``Optimizer8bit.get_state_buffer``). States are
#: fp32 with the default ``optim_bits=32`` (``Optimizer2State.init_state``).
PAGED_MIN_NUMEL = 100_000


@dataclass(frozen=True, slots=True)
class Stack:
    """Facts of the training software that change what is kept on the device.

    The defaults are BrightRun's trainer (transformers + PEFT + bitsandbytes >= 0.46,
    see the module docstring). The published figures in tests/data/estimate/ were
    measured with other software (LitGPT's own model code, bitsandbytes 0.42.0); each
    record names the facts of its stack there, with the source of each, and is
    estimated with them: the formulas are the same, only their inputs differ.
    """

    #: Bytes of a LoRA weight, its gradient and its dropout output. PEFT upcasts
    #: adapters to fp32 (see ``ADAPTER_BYTES``); LitGPT under ``precision:
    #: bf16-true`` keeps the whole module, adapters included, in bf16 (Fabric
    #: ``HalfPrecision.convert_module``), so 2.
    adapter_bytes: int = ADAPTER_BYTES
    #: "adamw": ``torch.optim.AdamW`` keeps two moments in the parameter's dtype
    #: (``torch.zeros_like(p)`` in ``torch/optim/adamw.py`` ``_init_group``).
    #: "paged_adamw": ``bitsandbytes.optim.PagedAdamW`` (fp32 moments, paged when
    #: the parameter has >= ``PAGED_MIN_NUMEL`` elements, see above).
    optimizer: str = "adamw"
    #: One LoRA dropout for the fused q/k/v input (LitGPT ``lora.py``
    #: ``LoRAQKVLinear`` owns one ``lora_dropout`` and one ``lora_A`` of shape
    #: (r x enabled, in)); PEFT gives q, k and v a dropout each.
    fused_qkv_dropout: bool = False
    #: K and V are expanded to the query heads before SDPA even without a padding
    #: mask (LitGPT ``model.py`` ``CausalSelfAttention.forward``: ``k =
    #: k.expand(*q.shape)`` when ``n_query_groups != n_head``, then ``reshape``).
    kv_expanded: bool = False
    #: The output head is its own tensor even when the checkpoint ties it to the
    #: input embedding (LitGPT ``model.py`` ``GPT.__init__`` creates ``lm_head``
    #: and ``transformer.wte`` separately; ``scripts/convert_hf_checkpoint.py``
    #: copies ``wte`` into ``lm_head`` for tied checkpoints).
    untied_lm_head: bool = False
    #: The output head is quantized too. transformers keeps ``lm_head`` in 16-bit
    #: (``integrations/bitsandbytes.py`` ``get_keys_to_not_convert``); Lightning
    #: Fabric's ``BitsandbytesPrecision`` replaces every ``nn.Linear`` not in
    #: ``ignore_modules`` (``plugins/precision/bitsandbytes.py`` ``_convert_layers``),
    #: which LitGPT leaves empty.
    quantize_lm_head: bool = False
    #: NF4 with double quantization (``compress_statistics=True``: 8-bit absmax + a
    #: fp32 constant per 256) or without (fp32 absmax per 64 weights). LitGPT's
    #: ``quantize: bnb.nf4`` is Fabric's ``_NF4Linear`` (``compress_statistics=
    #: False``); ``bnb.nf4-dq`` would be ``_NF4DQLinear``.
    nf4_double_quant: bool = True
    #: bitsandbytes < 0.43.2 ``MatMul4Bit.forward`` keeps its input for backward
    #: (``ctx.tensors = (A, B)``) although backward only needs the weight;
    #: bitsandbytes PR #1270 ("fix QLoRA mem bug: delete useless buffered
    #: activation", commit 9e753741, released in 0.43.2) changed it to ``(None,
    #: B)``. So every 4-bit linear keeps its bf16 input: one tensor per distinct
    #: input (q/k/v share one, gate/up share one).
    bnb_keeps_matmul_input: bool = False
    #: The training loop keeps the previous step's autograd graph until the next
    #: loss replaces it. Tensors an ``autograd.Function`` stores as ``ctx``
    #: attributes (not ``save_for_backward``) are not released by backward, so
    #: with ``bnb_keeps_matmul_input`` the previous step's kept inputs are still
    #: alive during the next forward: LitGPT ``finetune/lora.py`` ``fit`` binds
    #: ``loss = chunked_cross_entropy(...)`` and keeps it to the next iteration.
    graph_outlives_step: bool = False
    #: Bytes per logit at the loss-backward peak (see ``LOGIT_BYTES``). LitGPT
    #: computes the head in chunks of 128 positions (``finetune/lora.py`` ``fit``:
    #: ``model(input_ids, lm_head_chunk_size=128)``) and Lightning Fabric casts the
    #: model's output to the default dtype, fp32 (``wrappers.py``
    #: ``_FabricModule.forward`` -> ``precision.convert_output`` ->
    #: ``_convert_fp_tensor(..., torch.get_default_dtype())``); ``utils.py``
    #: ``chunked_cross_entropy`` runs ``cross_entropy`` per chunk on those fp32
    #: logits. Kept: the fp32 logits (4 B, bound to the loop's ``logits`` variable)
    #: plus, per logit, the saved fp32 log-softmax output or, once backward passed
    #: its chunk, its fp32 gradient (4 B) = 8 B.
    logit_bytes: int = LOGIT_BYTES
    #: Positions per cross-entropy chunk (0: not chunked). While one chunk's
    #: backward runs, its NLL gradient and log-softmax gradient (fp32, one chunk
    #: each: ``nll_loss_backward`` and ``_log_softmax_backward_data`` allocate
    #: them) exist on top of the above: 8 B x micro batch x chunk x V.
    logit_chunk_positions: int = 0
    #: Bytes per logit still alive when the head's backward runs, after the loss
    #: backward: LitGPT's fp32 logits (4 B) and their gradients cast back to bf16
    #: by the ``ToCopyBackward`` of Fabric's output cast (2 B) = 6 B. Only matters
    #: with a quantized head (below).
    head_backward_logit_bytes: int = 0
    #: Transient bytes per weight when a 4-bit linear's backward dequantizes it:
    #: bitsandbytes 0.42.0 ``MatMul4Bit.backward``:
    #: ``F.dequantize_4bit(B, ctx.state).to(grad_output.dtype)``; Fabric quantized
    #: the weights from fp16 (``_Linear4bit.quantize``: ``weight.to(dtype=
    #: torch.half)``), so ``quant_state.dtype`` is fp16 (``functional.py``
    #: ``dequantize_4bit`` allocates ``quant_state.dtype``) and ``.to(bfloat16)``
    #: copies it: 2 + 2 = 4 B. With a quantized head (V x h weights, the largest
    #: linear by far) this transient, at the head's backward, is the peak when
    #: it exceeds the loss-backward term.
    dequant_bytes_per_weight: int = 0


#: BrightRun's trainer.
TRAINER_STACK = Stack()


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


def weight_bytes(
    arch: ModelArch,
    quantization: QuantizationMode,
    device: Device,
    stack: Stack = TRAINER_STACK,
) -> tuple[int, str]:
    """Base weights at their stored precision, and the formula used."""
    w = _WEIGHT_BYTES[device]
    head = arch.vocab_size * arch.hidden_size
    # A separate copy of a tied output head (Stack.untied_lm_head).
    extra_head = head if (stack.untied_lm_head and arch.tie_word_embeddings) else 0
    total = arch.parameter_count() + extra_head
    if quantization == QuantizationMode.NONE:
        return total * w, f"{total:,} params x {w} B"
    quant = arch.quantizable_params()
    head_has_own_tensor = extra_head > 0 or not arch.tie_word_embeddings
    if stack.quantize_lm_head and head_has_own_tensor:
        quant += head
    rest = total - quant
    if quantization == QuantizationMode.NF4:
        codes = quant * NF4_BYTES_PER_WEIGHT
        if stack.nf4_double_quant:
            absmax = quant / NF4_BLOCK + quant / (NF4_BLOCK * NF4_DQ_BLOCK) * 4
            constants = "1 B/64 absmax + 4 B/(64x256) double-quant constants"
        else:
            # bitsandbytes ``quantize_4bit(compress_statistics=False)``: one fp32
            # absmax per block of 64 (``QuantState.absmax``).
            absmax = quant / NF4_BLOCK * 4
            constants = "4 B/64 fp32 absmax, no double quantization"
        value = int(codes + absmax) + rest * w
        return value, (f"{quant:,} linear weights x (0.5 B NF4 + {constants}) + {rest:,} embedding/norm params x {w} B")
    rows = arch.quantizable_out_features()
    if stack.quantize_lm_head and head_has_own_tensor:
        rows += arch.vocab_size
    value = quant * INT8_BYTES_PER_WEIGHT + rows * INT8_ROW_SCALE_BYTES + rest * w
    return value, (
        f"{quant:,} linear weights x 1 B int8 + {rows:,} rows x 4 B scales + {rest:,} embedding/norm params x {w} B"
    )


def _lora_tensor_numels(arch: ModelArch, params: TrainingParams, stack: Stack) -> list[int]:
    """Element counts of the LoRA tensors of one layer (A and B of each targeted
    linear; with ``Stack.fused_qkv_dropout`` q/k/v share one A of (r x 3, in) and
    one B, as LitGPT's ``LoRAQKVLinear``). Only the paged optimizer needs them."""
    out: list[int] = []
    fused_a = fused_b = 0
    for t in targeted_linears(arch, params):
        lin = t.linear
        if stack.fused_qkv_dropout and lin.input_key == "attn_in":
            fused_a += t.rank * lin.in_features
            fused_b += t.rank * lin.out_features
            continue
        out += [t.rank * lin.in_features, t.rank * lin.out_features] * lin.copies
    return out + [n for n in (fused_a, fused_b) if n]


def optimizer_state_bytes(arch: ModelArch, params: TrainingParams, stack: Stack) -> tuple[int, str]:
    """AdamW's two moments per trainable parameter, as the device allocator sees them."""
    n_lora = lora_parameter_count(arch, params)
    if stack.optimizer == "paged_adamw":
        # bitsandbytes PagedAdamW: fp32 moments; tensors of >= PAGED_MIN_NUMEL
        # elements live in unified memory, outside max_memory_allocated.
        small = arch.num_layers * sum(n for n in _lora_tensor_numels(arch, params, stack) if n < PAGED_MIN_NUMEL)
        return small * 2 * 4, (
            f"PagedAdamW: 2 fp32 moments x {small:,} params in tensors under {PAGED_MIN_NUMEL:,} elements "
            "(larger ones are paged to unified memory, not counted by the PyTorch allocator)"
        )
    per = 2 * stack.adapter_bytes
    return n_lora * per, f"AdamW: 2 moments x {stack.adapter_bytes} B x {n_lora:,} trainable params"


def saved_matmul_inputs_per_token(arch: ModelArch, params: TrainingParams, device: Device, stack: Stack) -> int:
    """Bytes per token of the inputs old bitsandbytes 4-bit matmuls keep (see
    ``Stack.bnb_keeps_matmul_input``): one ``act``-byte tensor per distinct input of
    the quantized linears of a layer (q/k/v share the normed hidden state, gate/up
    share the second one, o and down read their own), for every layer. Inputs that
    LoRA already keeps as the same tensor (dropout off, adapters in the activation
    dtype: ``lora_A`` then saves that very tensor) are not counted twice. The layer
    total excludes the head; see :func:`memory_breakdown`.
    """
    if not stack.bnb_keeps_matmul_input or params.quantization != QuantizationMode.NF4:
        return 0
    act = _ACT_BYTES[device]
    shared_with_lora: set[str] = set()
    if params.lora_dropout == 0 and stack.adapter_bytes == act:
        shared_with_lora = {t.linear.input_key or t.linear.name for t in targeted_linears(arch, params)}
    inputs: dict[str, int] = {}
    for lin in arch.linears():
        key = lin.input_key or lin.name
        if not lin.quantized or key in shared_with_lora:
            continue
        inputs[key] = max(inputs.get(key, 0), lin.in_features * act * lin.active_copies)
    return sum(inputs.values())


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
    stack: Stack = TRAINER_STACK,
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
      the fp32 adapter dtype; on CPU it is the already-fp32 input). With
      ``Stack.adapter_bytes`` = 2 (LitGPT bf16-true: ``lora.py`` ``LoRALinear.
      forward``, ``lora_dropout(x) @ lora_A.T @ lora_B.T``) the dropout output and
      A's output are bf16; with ``Stack.fused_qkv_dropout`` q/k/v share one dropout
      (``LoRAQKVLinear.forward``: ``F.linear(self.lora_dropout(x), self.lora_A)``).
    """
    act = _ACT_BYTES[device]
    h, q, kv, i = arch.hidden_size, arch.q_dim, arch.kv_dim, arch.intermediate_size
    norms = arch.norms_per_layer * h * 4
    kv_kept = q if ((padded or stack.kv_expanded) and arch.kv_dim != arch.q_dim) else kv
    attention = (2 * q + 2 * kv_kept) * act + 4 * arch.num_attention_heads
    scores = 0
    if arch.attention == "eager":
        scores = arch.num_attention_heads * seq_len * (4 + 2 * act)
    mlp = 3 * i * act * arch.num_experts_per_tok
    lora = 0
    shared_inputs: dict[str, int] = {}
    adapter = ADAPTER_BYTES if device == "cpu" else stack.adapter_bytes
    fused_dropout: dict[str, int] = {}
    for t in targeted_linears(arch, params):
        lin = t.linear
        routed = lin.active_copies
        lora += t.rank * adapter * routed
        if params.lora_dropout > 0 and stack.fused_qkv_dropout and lin.input_key == "attn_in":
            fused_dropout[lin.input_key] = lin.in_features * (adapter + _MASK_BYTES[device]) * routed
        elif params.lora_dropout > 0:
            lora += lin.in_features * (adapter + _MASK_BYTES[device]) * routed
        else:
            shared_inputs[lin.input_key or lin.name] = lin.in_features * adapter * routed
    lora += sum(shared_inputs.values()) + sum(fused_dropout.values())
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
    stack: Stack = TRAINER_STACK,
) -> MemoryBreakdown:
    """The breakdown of peak memory for one configuration (pure arithmetic).

    ``padded``: whether batches carry a padding mask (changes how K/V are kept under
    grouped-query attention). Default: on CUDA when the micro batch is above 1.
    ``stack``: facts of the training software (default: BrightRun's trainer).
    """
    s = effective_seq_len(params, longest_example)
    b = params.batch_size
    tokens = b * s
    if padded is None:
        padded = device == "cuda" and b > 1
    act = _ACT_BYTES[device]
    w_bytes, w_formula = weight_bytes(arch, params.quantization, device, stack)
    n_lora = lora_parameter_count(arch, params)
    adapter = ADAPTER_BYTES if device == "cpu" else stack.adapter_bytes
    opt_bytes, opt_formula = optimizer_state_bytes(arch, params, stack)
    logit_bytes = LOGIT_BYTES if device == "cpu" else stack.logit_bytes

    layer = _layer_activations(arch, params, device, s, padded, stack)
    per_layer = layer.per_token() * tokens
    final_norm = arch.hidden_size * 4 * tokens
    logits = logit_bytes * arch.vocab_size * tokens
    logits_formula = f"{logit_bytes} B x V ({arch.vocab_size:,}) x T ({tokens:,}): " + (
        "fp32 log-softmax + its two backward gradients"
        if logit_bytes == LOGIT_BYTES
        else "fp32 logits + the fp32 log-softmax output or its gradient"
    )
    if device == "cuda" and stack.logit_chunk_positions:
        chunk = 8 * b * min(stack.logit_chunk_positions, s) * arch.vocab_size
        logits += chunk
        logits_formula += (
            f" + one {stack.logit_chunk_positions}-position chunk's two fp32 gradients (8 B x {b} x chunk x V)"
        )
    head_quantized = (
        device == "cuda"
        and params.quantization == QuantizationMode.NF4
        and stack.quantize_lm_head
        and stack.dequant_bytes_per_weight > 0
    )
    if head_quantized:
        # The other candidate for the peak: the quantized head's backward, with the
        # logits (and their gradients) still alive and the head's weight dequantized.
        head_bw = (
            stack.head_backward_logit_bytes * arch.vocab_size * tokens
            + stack.dequant_bytes_per_weight * arch.vocab_size * arch.hidden_size
        )
        if head_bw > logits:
            logits = head_bw
            logits_formula = (
                f"head backward: {stack.head_backward_logit_bytes} B x V ({arch.vocab_size:,}) x T ({tokens:,}) "
                f"logits and gradients + {stack.dequant_bytes_per_weight} B x V x h dequantized 4-bit head weight"
            )
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
            f"{logits / GIB:.2f} GiB, one layer recomputed {recompute / GIB:.2f} GiB)"
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

    # Inputs kept by bitsandbytes < 0.43.2 4-bit matmuls (Stack.bnb_keeps_matmul_input),
    # every layer plus the head's input when the head is quantized; twice when the
    # previous step's graph is still alive (Stack.graph_outlives_step). Not applied
    # with gradient checkpointing: no published figure checks that combination.
    kept_inputs = 0
    saved_per_token = saved_matmul_inputs_per_token(arch, params, device, stack)
    if saved_per_token and not params.gradient_checkpointing:
        per_step = arch.num_layers * saved_per_token * tokens
        if stack.quantize_lm_head:
            per_step += arch.hidden_size * act * tokens
        steps = 2 if stack.graph_outlives_step else 1
        kept_inputs = steps * per_step

    items = [
        MemoryItem(
            f"base model ({params.quantization.value})",
            w_bytes,
            w_formula,
        ),
        MemoryItem(
            f"LoRA adapters (r={params.lora_rank})",
            n_lora * adapter,
            f"{n_lora:,} params (r x (in + out) per targeted linear x L) x {adapter} B",
        ),
        MemoryItem("optimizer state", opt_bytes, opt_formula),
        MemoryItem(
            "gradients",
            n_lora * adapter,
            f"{adapter} B gradient x {n_lora:,} trainable params (base weights are frozen)",
        ),
        MemoryItem(f"activations (batch={b}, seq={s})", activations, act_formula),
    ]
    if kept_inputs:
        items.append(
            MemoryItem(
                "4-bit matmul inputs (bitsandbytes < 0.43.2)",
                kept_inputs,
                f"{'2 steps x ' if stack.graph_outlives_step else ''}L x T x {saved_per_token:,} "
                "B/token/layer: MatMul4Bit keeps each quantized linear's input (ctx.tensors = (A, B))",
            )
        )
    if logits_item:
        items.append(
            MemoryItem(
                "logits and loss",
                logits_item,
                logits_formula,
            )
        )
    if device == "cuda":
        frag = int(defaults.allocator_fragmentation * (activations + logits_item + kept_inputs))
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
