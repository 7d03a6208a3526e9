"""Model and GPU catalogs: architecture facts and hardware, as data.

The facts live in ``models.json`` and ``gpus.json`` beside this module (each entry
cites its source). This module only parses them — plain JSON, no torch, no
transformers, no network — and derives shapes from them:

* :class:`ModelArch` — what the memory and FLOP formulas need: layers, hidden,
  intermediate, attention heads / KV heads / head_dim (grouped-query attention),
  vocab, tied embeddings, MoE experts. :meth:`ModelArch.linears` lists every
  ``nn.Linear`` of one decoder layer by the module name PEFT targets, with its
  ``(in_features, out_features)``, so LoRA sizes are exact, not rules of thumb.
* :func:`from_hf_config` / :func:`from_local_dir` — the same facts from a Hugging
  Face ``config.json`` (a local model folder such as the trainer's tiny models).
* :class:`GpuSpec` — memory, spot / on-demand price and a throughput class.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

Device = Literal["cuda", "cpu"]


class UnknownModel(LookupError):
    """The name is neither a catalog id, an alias nor a local model folder."""


class UnknownGpu(LookupError):
    """The name is not in the GPU catalog."""


@dataclass(frozen=True, slots=True)
class Linear:
    """One targetable linear module of a decoder layer."""

    name: str
    in_features: int
    out_features: int
    #: Copies per layer (the experts of an MoE block; 1 otherwise).
    copies: int = 1
    #: Copies a token passes through (experts per token for MoE experts).
    active_copies: int = 1
    #: Whether bitsandbytes quantizes it (every decoder-layer linear is; the MoE
    #: router is a linear too but tiny).
    quantized: bool = True
    #: Modules sharing an input tensor share this key (q/k/v read the same normed
    #: hidden state), which matters when LoRA dropout is off.
    input_key: str = ""


@dataclass(frozen=True, slots=True)
class ModelArch:
    """Architecture facts of a decoder-only causal LM (Llama-style)."""

    id: str
    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    head_dim: int = 0
    dtype: str = "bfloat16"
    architecture: str = "LlamaForCausalLM"
    num_local_experts: int = 1
    num_experts_per_tok: int = 1
    attention_bias: bool = False
    norms_per_layer: int = 2
    fused_qkv: bool = False
    fused_gate_up: bool = False
    #: "sdpa" (flash / memory-efficient kernels: no seq x seq tensor is kept) or
    #: "eager" (the softmax probabilities are kept: Gemma 2 trains with eager
    #: attention because SDPA has no logit soft-capping).
    attention: str = "sdpa"
    #: The parameter count the model card states (None for local folders).
    stated_parameters: int | None = None
    aliases: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    _linears: tuple[Linear, ...] = field(default=(), init=False, repr=False, compare=False)
    _params: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        # Derived once: estimates run on every CreateJob and call these often.
        object.__setattr__(self, "_linears", self._build_linears())
        object.__setattr__(self, "_params", self._count_parameters())

    @property
    def q_dim(self) -> int:
        """Width of the query projection: heads x head_dim (not always hidden)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key / value projections: KV heads x head_dim (GQA)."""
        return self.num_key_value_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 1

    def linears(self) -> tuple[Linear, ...]:
        """Every linear of one decoder layer (see :meth:`_build_linears`)."""
        return self._linears

    def _build_linears(self) -> tuple[Linear, ...]:
        """Every linear of one decoder layer, by the name PEFT's target_modules uses.

        Names follow the Hugging Face implementations: ``q_proj k_proj v_proj
        o_proj gate_proj up_proj down_proj`` (Llama, Mistral, Qwen2, Gemma 2);
        Phi-3 fuses ``qkv_proj`` and ``gate_up_proj``; Mixtral's experts are
        ``w1`` (gate), ``w3`` (up), ``w2`` (down), one copy per expert, and
        ``gate`` is the router (hidden -> experts).
        """
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        out: list[Linear] = []
        if self.fused_qkv:
            out.append(Linear("qkv_proj", h, q + 2 * kv, input_key="attn_in"))
        else:
            out += [
                Linear("q_proj", h, q, input_key="attn_in"),
                Linear("k_proj", h, kv, input_key="attn_in"),
                Linear("v_proj", h, kv, input_key="attn_in"),
            ]
        out.append(Linear("o_proj", q, h, input_key="attn_out"))
        if self.is_moe:
            e, k = self.num_local_experts, self.num_experts_per_tok
            out += [
                Linear("gate", h, e, quantized=False, input_key="mlp_in"),
                Linear("w1", h, i, copies=e, active_copies=k, input_key="mlp_in"),
                Linear("w3", h, i, copies=e, active_copies=k, input_key="mlp_in"),
                Linear("w2", i, h, copies=e, active_copies=k, input_key="mlp_mid"),
            ]
        elif self.fused_gate_up:
            out += [
                Linear("gate_up_proj", h, 2 * i, input_key="mlp_in"),
                Linear("down_proj", i, h, input_key="mlp_mid"),
            ]
        else:
            out += [
                Linear("gate_proj", h, i, input_key="mlp_in"),
                Linear("up_proj", h, i, input_key="mlp_in"),
                Linear("down_proj", i, h, input_key="mlp_mid"),
            ]
        return tuple(out)

    def linear(self, name: str) -> Linear | None:
        """The linear PEFT would match for a target name (MoE aliases included)."""
        aliases = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"} if self.is_moe else {}
        wanted = aliases.get(name, name)
        for lin in self.linears():
            if lin.name == wanted:
                return lin
        return None

    def linear_params_per_layer(self) -> int:
        return sum(lin.in_features * lin.out_features * lin.copies for lin in self.linears())

    def quantizable_params(self) -> int:
        """Weights bitsandbytes replaces: every decoder-layer linear but the router."""
        per_layer = sum(lin.in_features * lin.out_features * lin.copies for lin in self.linears() if lin.quantized)
        return per_layer * self.num_layers

    def quantizable_out_features(self) -> int:
        """Sum of output rows of the quantized linears (LLM.int8 keeps one fp32 scale per row)."""
        per_layer = sum(lin.out_features * lin.copies for lin in self.linears() if lin.quantized)
        return per_layer * self.num_layers

    def embedding_params(self) -> int:
        """Input embedding plus the output head when it is not tied to it."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def parameter_count(self) -> int:
        """Parameters computed from the shapes (see :meth:`_count_parameters`)."""
        return self._params

    def _count_parameters(self) -> int:
        """Parameters computed from the shapes (matches the model cards exactly).

        embeddings: V*h (x2 when untied); per layer: the linears above, the
        q/k/v biases (Qwen2), ``norms_per_layer`` RMSNorm weights of h; a final norm.
        """
        per_layer = self.linear_params_per_layer() + self.norms_per_layer * self.hidden_size
        if self.attention_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        return self.embedding_params() + self.num_layers * per_layer + self.hidden_size

    def active_parameter_count(self) -> int:
        """Parameters one token passes through (MoE: experts_per_tok of the experts)."""
        if not self.is_moe:
            return self.parameter_count()
        idle = self.num_local_experts - self.num_experts_per_tok
        expert = 3 * self.hidden_size * self.intermediate_size
        return self.parameter_count() - self.num_layers * idle * expert


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One accelerator type and its prices."""

    id: str
    name: str
    memory_bytes: int
    spot_usd_per_hour: float
    on_demand_usd_per_hour: float
    bf16_dense_tflops: float
    device: Device = "cuda"
    aliases: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CatalogDefaults:
    """Assumptions shared by every GPU (gpus.json ``defaults``)."""

    mfu: Mapping[str, tuple[float, float]]
    startup_minutes: tuple[float, float]
    storage_usd_per_gb_month: float
    buffer_fraction: Mapping[str, float]
    cuda_context_bytes: int
    allocator_fragmentation: float


@dataclass(frozen=True, slots=True)
class GpuCatalog:
    default_gpu: str
    defaults: CatalogDefaults
    gpus: tuple[GpuSpec, ...]
    _index: Mapping[str, GpuSpec] = field(default_factory=dict, repr=False)

    def get(self, name: str) -> GpuSpec:
        key = _norm(name)
        if key in self._index:
            return self._index[key]
        raise UnknownGpu(f"unknown GPU {name!r}; known: {', '.join(g.id for g in self.gpus)}")


@dataclass(frozen=True, slots=True)
class ModelCatalog:
    models: tuple[ModelArch, ...]
    _index: Mapping[str, ModelArch] = field(default_factory=dict, repr=False)

    def get(self, name: str) -> ModelArch | None:
        return self._index.get(_norm(name))


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _read_json(filename: str) -> Any:
    text = resources.files(__package__).joinpath(filename).read_text(encoding="utf-8")
    return json.loads(text)


_ARCH_FIELDS = {
    "num_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
    "max_position_embeddings",
    "head_dim",
    "dtype",
    "architecture",
    "num_local_experts",
    "num_experts_per_tok",
    "attention_bias",
    "norms_per_layer",
    "fused_qkv",
    "fused_gate_up",
    "family",
}


@cache
def model_catalog() -> ModelCatalog:
    """The bundled model catalog (parsed once)."""
    raw = _read_json("models.json")
    models: list[ModelArch] = []
    index: dict[str, ModelArch] = {}
    for entry in raw["models"]:
        kwargs = {k: v for k, v in entry.items() if k in _ARCH_FIELDS}
        arch = ModelArch(
            id=entry["id"],
            stated_parameters=entry.get("parameters"),
            attention="eager" if entry.get("family") == "gemma2" else "sdpa",
            aliases=tuple(entry.get("aliases", ())),
            sources=tuple(entry.get("sources", ())),
            **kwargs,
        )
        models.append(arch)
        for key in (arch.id, arch.id.split("/")[-1], *arch.aliases):
            index.setdefault(_norm(key), arch)
    return ModelCatalog(models=tuple(models), _index=index)


@cache
def gpu_catalog() -> GpuCatalog:
    """The bundled GPU catalog (parsed once)."""
    raw = _read_json("gpus.json")
    d = raw["defaults"]
    defaults = CatalogDefaults(
        mfu={k: (float(v[0]), float(v[1])) for k, v in d["mfu"].items()},
        startup_minutes=(float(d["startup_minutes"][0]), float(d["startup_minutes"][1])),
        storage_usd_per_gb_month=float(d["storage_usd_per_gb_month"]),
        buffer_fraction={k: float(v) for k, v in d["buffer_fraction"].items()},
        cuda_context_bytes=int(d["cuda_context_mib"]) * 2**20,
        allocator_fragmentation=float(d["allocator_fragmentation"]),
    )
    gpus: list[GpuSpec] = []
    index: dict[str, GpuSpec] = {}
    for g in raw["gpus"]:
        spec = GpuSpec(
            id=g["id"],
            name=g["name"],
            memory_bytes=int(g["memory_mib"]) * 2**20,
            spot_usd_per_hour=float(g["spot_usd_per_hour"]),
            on_demand_usd_per_hour=float(g["on_demand_usd_per_hour"]),
            bf16_dense_tflops=float(g["bf16_dense_tflops"]),
            device="cpu" if g.get("device") == "cpu" else "cuda",
            aliases=tuple(g.get("aliases", ())),
            sources=tuple(g.get("sources", ())),
        )
        gpus.append(spec)
        for key in (spec.id, spec.name, *spec.aliases):
            index.setdefault(_norm(key), spec)
    return GpuCatalog(default_gpu=raw["default_gpu"], defaults=defaults, gpus=tuple(gpus), _index=index)


def get_gpu(name: str | None = None) -> GpuSpec:
    cat = gpu_catalog()
    return cat.get(name or cat.default_gpu)


#: Families whose config.json omits ``tie_word_embeddings`` and whose code ties
#: by default (transformers' PretrainedConfig default is True; Llama/Mistral/Qwen2
#: configs set False explicitly or their config classes default to False).
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3"}
_BIASED_QKV = {"qwen2", "qwen2_moe"}


def from_hf_config(config: Mapping[str, Any], *, model_id: str = "local") -> ModelArch:
    """Architecture facts from a parsed Hugging Face ``config.json``."""
    model_type = str(config.get("model_type", "llama"))
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = config.get("head_dim") or hidden // heads
    tied = config.get("tie_word_embeddings")
    if tied is None:
        tied = model_type in _TIED_BY_DEFAULT
    archs = config.get("architectures") or ["LlamaForCausalLM"]
    experts = int(config.get("num_local_experts") or 1)
    return ModelArch(
        id=model_id,
        family=model_type,
        architecture=str(archs[0]),
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        vocab_size=int(config["vocab_size"]),
        tie_word_embeddings=bool(tied),
        max_position_embeddings=int(config.get("max_position_embeddings") or 2048),
        dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        num_local_experts=experts,
        num_experts_per_tok=int(config.get("num_experts_per_tok") or 1),
        attention_bias=bool(config.get("attention_bias", model_type in _BIASED_QKV)),
        norms_per_layer=4 if model_type in {"gemma2", "gemma3"} else 2,
        fused_qkv=model_type == "phi3",
        fused_gate_up=model_type == "phi3",
        attention="eager" if model_type == "gemma2" else "sdpa",
    )


def from_local_dir(path: str | Path) -> ModelArch:
    """Architecture facts of a local model folder (reads its config.json as JSON)."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UnknownModel(f"{folder} has no config.json")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    return from_hf_config(config, model_id=str(folder))


def resolve_model(model: ModelArch | str) -> ModelArch:
    """A ModelArch from itself, a catalog id / alias, or a local folder path."""
    if isinstance(model, ModelArch):
        return model
    found = model_catalog().get(model)
    if found is not None:
        return found
    if Path(model).is_dir():
        return from_local_dir(model)
    raise UnknownModel(f"unknown base model {model!r}: not in the catalog and not a local folder with a config.json")
