"""What a checkpoint holds, and how it is captured and restored exactly.

Files of a checkpoint folder (besides ``manifest.json``):

* ``adapter_model.safetensors`` - the LoRA weights (peft state-dict keys);
* ``trainer_state.pt`` - optimizer and scheduler state dicts and the torch
  CPU/CUDA generator states; loaded with ``torch.load(weights_only=True)``;
* ``state.json`` - step, data position, loss accumulator, plan, and the Python
  ``random`` / NumPy generator states.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from brightrun_trainer.checkpoints import write_bytes_durable

ADAPTER_FILE = "adapter_model.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"
META_FILE = "state.json"
STATE_FORMAT = 1


@dataclass(slots=True)
class LoopState:
    """Everything besides tensors that a resumed loop needs to continue exactly."""

    step: int = 0
    #: Train losses of the most recent steps (for ``final_train_loss``).
    recent_losses: list[float] = field(default_factory=list)
    last_eval_step: int = -1
    last_eval_loss: float | None = None
    #: Step at which the learning-rate schedule started (0 unless restarted).
    schedule_origin: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoopState:
        return cls(
            step=int(data["step"]),
            recent_losses=[float(x) for x in data.get("recent_losses", [])],
            last_eval_step=int(data.get("last_eval_step", -1)),
            last_eval_loss=data.get("last_eval_loss"),
            schedule_origin=int(data.get("schedule_origin", 0)),
        )


def _python_rng() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng() -> list[Any] | None:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        return None
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]


def _restore_numpy_rng(state: list[Any] | None) -> None:
    if state is None:
        return
    import numpy as np

    name, keys, pos, has_gauss, cached = state
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def write_state(
    directory: Path,
    *,
    adapter_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loop: LoopState,
    meta: dict[str, Any],
) -> None:
    """Write the payload files of a checkpoint into ``directory``."""
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in adapter_state.items()},
        str(directory / ADAPTER_FILE),
    )
    tensors: dict[str, Any] = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    # Serialized in memory, then written as plain bytes: torch.save streaming
    # into a file turns ENOSPC mid-record into a RuntimeError with no errno
    # ("unexpected pos"), while a plain write raises OSError(ENOSPC), which the
    # failure rules classify as disk_full. The state is LoRA-sized (adapter
    # moments), so the buffer is small.
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    write_bytes_durable(directory / TRAINER_STATE_FILE, buffer.getvalue())
    document = {
        "format": STATE_FORMAT,
        "loop": loop.to_json(),
        "python_rng": _python_rng(),
        "numpy_rng": _numpy_rng(),
        **meta,
    }
    write_bytes_durable(directory / META_FILE, json.dumps(document, sort_keys=True).encode())


@dataclass(slots=True)
class RestoredState:
    adapter_state: dict[str, torch.Tensor]
    loop: LoopState
    meta: dict[str, Any]
    trainer_state: dict[str, Any]
    python_rng: list[Any]
    numpy_rng: list[Any] | None


def read_state(directory: Path) -> RestoredState:
    """Read a (verified) checkpoint's payload; nothing is applied yet."""
    from safetensors.torch import load_file

    document = json.loads((directory / META_FILE).read_text())
    if document.get("format") != STATE_FORMAT:
        raise ValueError(f"unknown checkpoint state format {document.get('format')!r}")
    trainer_state = torch.load(directory / TRAINER_STATE_FILE, map_location="cpu", weights_only=True)
    return RestoredState(
        adapter_state=load_file(str(directory / ADAPTER_FILE)),
        loop=LoopState.from_json(document["loop"]),
        meta=document,
        trainer_state=trainer_state,
        python_rng=document["python_rng"],
        numpy_rng=document.get("numpy_rng"),
    )


def restore_rng(restored: RestoredState) -> None:
    """Put every generator back where it was when the checkpoint was taken."""
    torch.set_rng_state(restored.trainer_state["torch_rng"])
    cuda_states = restored.trainer_state.get("cuda_rng") or []
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = restored.python_rng
    random.setstate((version, tuple(internal), gauss))
    _restore_numpy_rng(restored.numpy_rng)
