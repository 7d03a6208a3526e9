"""The training loop: our own, so that a resumed run is bit-for-bit the same run.

One optimiser step = ``gradient_accumulation_steps`` micro-batches of the
epoch's seeded order; the loss is the (example-weighted) sum of token losses
divided by the number of target tokens in the whole step. After each step the
loop reports metrics and progress, evaluates when due, writes a checkpoint
when due or when asked to stop, and checks the stop flag. Everything the next
step depends on (adapter, AdamW and scheduler state, generator states, data
position, loss accumulator) is in the checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from brightrun_trainer.callbacks import (
    CheckpointInfo,
    Event,
    EventCode,
    EventType,
    StepMetrics,
    TrainerCallback,
)
from brightrun_trainer.checkpoints import CheckpointStore, SavedCheckpoint, VerifiedCheckpoint
from brightrun_trainer.config import TrainingPlan
from brightrun_trainer.data import (
    IGNORE_INDEX,
    Batch,
    PreparedData,
    TokenizedExample,
    collate,
    epoch_order,
    micro_batches,
)
from brightrun_trainer.model import LoadedModel
from brightrun_trainer.spec import LrSchedule, TrainingParams
from brightrun_trainer.state import LoopState, read_state, restore_rng, write_state

log = logging.getLogger(__name__)

#: Steps averaged for ``final_train_loss`` and ``steps_per_second``.
RECENT_STEPS = 10
_SCHEDULER_NAMES = {
    LrSchedule.COSINE: "cosine",
    LrSchedule.LINEAR: "linear",
    LrSchedule.CONSTANT: "constant_with_warmup",
}


class LossDivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True, slots=True)
class LoopOutcome:
    step: int
    stopped: bool
    final_train_loss: float | None
    last_eval_step: int
    last_eval_loss: float | None


def memory_bytes(device: torch.device) -> tuple[int | None, int | None]:
    """(in use, peak): the CUDA allocator on a GPU, else this process's RSS / VmHWM."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, None


#: Architectures whose logits are exactly ``lm_head(final hidden state)`` (no soft-capping
#: or scaling), so the loss may apply the head to target positions only.
HEAD_ONLY_ON_TARGETS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo", "olmo2", "starcoder2"})


class LossHead:
    """Computes per-token losses; applies the LM head only where there are targets.

    Materialising logits for every position costs ``batch x seq x vocab`` floats
    (gigabytes for 128k vocabularies) although only assistant tokens are
    trained. For known architectures the decoder's hidden states are gathered
    at target positions first; anything else goes through the model's own
    forward.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        model_type = getattr(getattr(base, "config", None), "model_type", None)
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        self.fast = model_type in HEAD_ONLY_ON_TARGETS and decoder is not None and head is not None
        self.decoder: Any = decoder
        self.head: Any = head

    def __call__(self, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses of the target tokens, their positions mask over ``labels[:, 1:]``)."""
        input_ids = batch.input_ids.to(device)
        attention_mask = batch.attention_mask.to(device)
        targets = batch.labels[:, 1:].to(device)
        mask = targets != IGNORE_INDEX
        if self.fast:
            hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            logits = self.head(hidden.last_hidden_state[:, :-1][mask]).float()
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            logits = out.logits[:, :-1][mask].float()
        return F.cross_entropy(logits, targets[mask], reduction="none"), mask


class TrainingLoop:
    """Owns the optimiser, scheduler and loop state of one attempt."""

    def __init__(
        self,
        *,
        loaded: LoadedModel,
        data: PreparedData,
        params: TrainingParams,
        plan: TrainingPlan,
        pad_id: int,
        callbacks: TrainerCallback,
        store: CheckpointStore,
        job_dir: Path,
        attempt_number: int,
        should_stop: Callable[[], bool],
        restart_schedule: bool = False,
    ) -> None:
        """``restart_schedule``: on :meth:`restore`, start a new learning-rate
        schedule (warmup included) over the remaining steps instead of continuing
        the checkpoint's (a continuation with ``lr_schedule_mode=restart_warmup``)."""
        self.model = loaded.model
        self.device = loaded.device
        self.data = data
        self.params = params
        self.plan = plan
        self.pad_id = pad_id
        self.cb = callbacks
        self.store = store
        self.job_dir = job_dir
        self.attempt_number = attempt_number
        self.should_stop = should_stop
        self.restart_schedule = restart_schedule
        self.loss_head = LossHead(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=params.learning_rate, weight_decay=params.weight_decay)
        self.scheduler = self._make_scheduler(0)
        self.state = LoopState()
        self.resumed_from: int | None = None
        self._order_epoch = -1
        self._batches: list[list[int]] = []
        self._step_ends: deque[float] = deque(maxlen=RECENT_STEPS + 1)

    # -- checkpoints -------------------------------------------------------------

    def _make_scheduler(self, origin: int) -> Any:
        """The learning-rate schedule that starts at step ``origin`` (0 unless restarted)."""
        from transformers import get_scheduler

        warmup, steps = self.plan.schedule(self.params.warmup_ratio, origin)
        return get_scheduler(
            _SCHEDULER_NAMES[self.params.lr_scheduler],
            self.optimizer,
            num_warmup_steps=warmup,
            num_training_steps=steps,
        )

    def restore(self, checkpoint: VerifiedCheckpoint) -> None:
        """Load a verified checkpoint.

        With the same batch layout and schedule the next step continues exactly
        where the checkpoint left off. Otherwise (a continuation with other
        parameters) the data position is carried over by examples consumed in
        the epoch, and the schedule is restarted if asked.
        """
        from peft import set_peft_model_state_dict

        restored = read_state(checkpoint.path)
        result = set_peft_model_state_dict(self.model, restored.adapter_state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"checkpoint adapter has unexpected keys: {unexpected[:5]}")
        state = restored.loop
        self.plan = self._carry_plan(restored.meta, state.step)
        if self.restart_schedule:
            state.schedule_origin = state.step
            self.optimizer.load_state_dict(restored.trainer_state["optimizer"])
            for group in self.optimizer.param_groups:
                group["initial_lr"] = group["lr"] = self.params.learning_rate
            self.scheduler = self._make_scheduler(state.step)
            warmup, steps = self.plan.schedule(self.params.warmup_ratio, state.step)
            self.cb.info(
                EventCode.SCHEDULE_RESTARTED,
                f"Learning-rate schedule restarted at step {state.step}: {warmup} warmup of {steps} steps",
                step=state.step,
                warmup_steps=warmup,
                steps=steps,
            )
        else:
            # Scheduler first: creating one sets the learning rate, the optimizer state restores it.
            self.scheduler = self._make_scheduler(state.schedule_origin)
            self.optimizer.load_state_dict(restored.trainer_state["optimizer"])
            self.scheduler.load_state_dict(restored.trainer_state["scheduler"])
            self.scheduler.base_lrs = [self.params.learning_rate] * len(self.optimizer.param_groups)
        self.state = state
        restore_rng(restored)
        self.resumed_from = state.step

    def _carry_plan(self, meta: dict[str, Any], step: int) -> TrainingPlan:
        """This attempt's plan, placed where the checkpoint's data position was."""
        saved = meta.get("plan") or {}
        layout = self.plan.layout()
        if {k: saved.get(k) for k in layout} == layout:
            return self.plan.rebased(
                saved.get("origin_step", 0), saved.get("origin_epoch", 0), saved.get("origin_in_epoch", 0)
            )
        position = meta.get("data_position") or {}
        epoch = int(position.get("epoch", 0))
        consumed = (
            int(position.get("step_in_epoch", 0)) * int(saved.get("batch_size", 1)) * int(saved.get("accumulation", 1))
        )
        in_epoch = math.ceil(consumed / (self.plan.batch_size * self.plan.accumulation))
        if in_epoch >= self.plan.steps_per_epoch:
            epoch, in_epoch = epoch + 1, 0
        plan = self.plan.rebased(step, epoch, in_epoch)
        self.cb.warning(
            EventCode.PLAN_CHANGED,
            f"The batch layout differs from the checkpoint's; continuing at epoch {epoch}, "
            f"step {in_epoch} of {plan.steps_per_epoch}, {plan.total_steps - step} steps to go",
            before={k: saved.get(k) for k in layout},
            after=layout,
            epoch=epoch,
            step_in_epoch=in_epoch,
            total_steps=plan.total_steps,
        )
        return plan

    def save_checkpoint(self) -> SavedCheckpoint:
        from peft import get_peft_model_state_dict

        step = self.state.step
        epoch, in_epoch = self.plan.position_after(step)
        meta = {
            "epoch": self.plan.epoch_at(step),
            "data_position": {"epoch": epoch, "step_in_epoch": in_epoch},
            "plan": self.plan.as_dict(),
            "attempt": self.attempt_number,
        }
        # The base model is frozen: only adapter weights, never (lm_head or embedding) base weights.
        adapter_state = get_peft_model_state_dict(self.model, save_embedding_layers=False)

        def write(directory: Path) -> None:
            write_state(
                directory,
                adapter_state=adapter_state,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                loop=self.state,
                meta=meta,
            )

        saved = self.store.save(step, write, meta)
        rel = os.path.relpath(saved.path, self.job_dir)
        info = CheckpointInfo(step, self.plan.epoch_at(step), rel, saved.size_bytes, saved.manifest_sha256)
        self.cb.on_event(
            Event(
                EventType.CHECKPOINT,
                EventCode.CHECKPOINT_SAVED,
                f"Checkpoint saved at step {step}",
                {"step": step, "path": rel, "size_bytes": saved.size_bytes},
            )
        )
        self.cb.on_checkpoint(info)
        log.info("checkpoint step %d saved (%d bytes)", step, saved.size_bytes)
        return saved

    # -- evaluation --------------------------------------------------------------

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            self.model.eval()
            try:
                yield
            finally:
                self.model.train()

    def evaluate(self, items: list[TokenizedExample] | None = None) -> float | None:
        """Mean token loss over the validation split (None when it is empty)."""
        items = self.data.validation if items is None else items
        if not items:
            return None
        total, count = 0.0, 0
        with self._eval_mode():
            for begin in range(0, len(items), self.params.batch_size):
                batch = collate(items[begin : begin + self.params.batch_size], self.pad_id)
                losses, _ = self.loss_head(batch, self.device)
                total += float(losses.sum())
                count += batch.targets
        loss = total / max(1, count)
        if not math.isfinite(loss):
            raise LossDivergenceError(f"evaluation loss became {loss} at step {self.state.step}")
        return loss

    # -- the loop ----------------------------------------------------------------

    def _micro_batches(self, epoch: int) -> list[list[int]]:
        if epoch != self._order_epoch:
            order = epoch_order(len(self.data.train), self.params.seed, epoch)
            self._batches = micro_batches(order, self.params.batch_size)
            self._order_epoch = epoch
        return self._batches

    def _train_step(self) -> tuple[float, float, float, int]:
        """One optimiser step; returns (loss, grad norm, learning rate, tokens)."""
        epoch, in_epoch = self.plan.position_after(self.state.step)
        acc = self.plan.accumulation
        group = [
            collate([self.data.train[i] for i in indices], self.pad_id)
            for indices in self._micro_batches(epoch)[in_epoch * acc : (in_epoch + 1) * acc]
        ]
        targets = max(1, sum(b.targets for b in group))
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = 0.0
        for batch in group:
            losses, mask = self.loss_head(batch, self.device)
            loss = (losses * batch.weights[:, 1:].to(self.device)[mask]).sum() / targets
            loss.backward()  # type: ignore[no-untyped-call]
            loss_value += float(loss.detach())
        if not math.isfinite(loss_value):
            raise LossDivergenceError(f"training loss became {loss_value} at step {self.state.step + 1}")
        max_norm = self.params.max_grad_norm if self.params.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
        self.optimizer.step()
        self.scheduler.step()
        return loss_value, grad_norm, lr, sum(b.tokens for b in group)

    def _steps_per_second(self, duration: float) -> float | None:
        """Over the recent steps' wall time (evaluations and checkpoints included)."""
        ends = self._step_ends
        if len(ends) >= 2 and ends[-1] > ends[0]:
            return (len(ends) - 1) / (ends[-1] - ends[0])
        return 1.0 / duration if duration > 0 else None

    def _eval_due(self, step: int) -> bool:
        p = self.params
        if p.eval_interval_steps > 0:
            return step % p.eval_interval_steps == 0
        return step % self.plan.steps_per_epoch == 0 or self._checkpoint_due(step)

    def _checkpoint_due(self, step: int) -> bool:
        interval = self.params.checkpoint_interval_steps
        return interval > 0 and step % interval == 0

    def run(self) -> LoopOutcome:
        """Train until the plan is done or a stop is requested."""
        plan = self.plan
        self.model.train()
        stopped = False
        while self.state.step < plan.total_steps:
            if self.should_stop():
                stopped = True  # nothing new to save: the state is the last checkpoint's
                break
            started = time.perf_counter()
            loss, grad_norm, lr, tokens = self._train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            ended = time.perf_counter()
            duration = ended - started
            self._step_ends.append(ended)
            self.state.step += 1
            step = self.state.step
            self.state.recent_losses = [*self.state.recent_losses, loss][-RECENT_STEPS:]
            last = step == plan.total_steps

            eval_loss = None
            if not last and self._eval_due(step):
                eval_loss = self.evaluate()
                self.state.last_eval_step, self.state.last_eval_loss = step, eval_loss
            used, peak = memory_bytes(self.device)
            epoch = plan.epoch_at(step)
            self.cb.on_metric(
                StepMetrics(
                    step=step,
                    epoch=epoch,
                    train_loss=loss,
                    learning_rate=lr,
                    grad_norm=grad_norm,
                    tokens_per_second=tokens / duration if duration > 0 else None,
                    steps_per_second=self._steps_per_second(duration),
                    memory_used_bytes=used,
                    memory_peak_bytes=peak,
                    eval_loss=eval_loss,
                    perplexity=perplexity(eval_loss),
                )
            )
            self.cb.on_progress(step, plan.total_steps, epoch, plan.epochs)
            if eval_loss is not None:
                self.cb.on_event(eval_event(step, eval_loss))
            stop_now = self.should_stop()
            if last or stop_now or self._checkpoint_due(step):
                self.save_checkpoint()
            if stop_now and not last:
                stopped = True
                break
        recent = self.state.recent_losses
        return LoopOutcome(
            step=self.state.step,
            stopped=stopped,
            final_train_loss=sum(recent) / len(recent) if recent else None,
            last_eval_step=self.state.last_eval_step,
            last_eval_loss=self.state.last_eval_loss,
        )


def perplexity(loss: float | None) -> float | None:
    """exp(loss), or None when there is no loss or it overflows."""
    if loss is None or not math.isfinite(loss) or loss > 700:
        return None
    return math.exp(loss)


def eval_event(step: int, loss: float) -> Event:
    return Event(
        EventType.METRICS,
        EventCode.EVALUATION,
        f"Evaluation at step {step}: loss {loss:.4f}",
        {"step": step, "eval_loss": loss, "perplexity": perplexity(loss)},
    )
