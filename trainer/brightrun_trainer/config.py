"""Derived run configuration: the step plan and the mapping to peft's LoraConfig.

:class:`~brightrun_trainer.spec.TrainingParams` arrives validated by the server;
this module only derives values from it, in one place.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from brightrun_trainer.data import steps_per_epoch
from brightrun_trainer.spec import TrainingParams


@dataclass(frozen=True, slots=True)
class TrainingPlan:
    """How many optimiser steps the run takes, and how they map onto the data.

    Normally step ``s`` is step ``s % steps_per_epoch`` of epoch
    ``s // steps_per_epoch``. A resume whose batch layout differs from the
    checkpoint's (a continuation with another batch size, say) moves the origin:
    at ``origin_step`` steps the run was at step ``origin_in_epoch`` of epoch
    ``origin_epoch``, and the remaining steps count from there.
    """

    train_examples: int
    batch_size: int
    accumulation: int
    steps_per_epoch: int
    epochs: int
    max_steps: int
    total_steps: int
    origin_step: int = 0
    origin_epoch: int = 0
    origin_in_epoch: int = 0

    @classmethod
    def make(cls, params: TrainingParams, train_examples: int) -> TrainingPlan:
        per_epoch = steps_per_epoch(train_examples, params.batch_size, params.gradient_accumulation_steps)
        total = per_epoch * params.epochs
        if params.max_steps > 0:
            total = min(total, params.max_steps)
        return cls(
            train_examples=train_examples,
            batch_size=params.batch_size,
            accumulation=params.gradient_accumulation_steps,
            steps_per_epoch=per_epoch,
            epochs=params.epochs,
            max_steps=params.max_steps,
            total_steps=total,
        )

    def rebased(self, step: int, epoch: int, in_epoch: int) -> TrainingPlan:
        """This plan with ``step`` steps done at (epoch, step in epoch); the total follows."""
        total = step + (self.epochs - epoch) * self.steps_per_epoch - in_epoch
        if self.max_steps > 0:
            total = min(total, self.max_steps)
        return replace(
            self,
            total_steps=max(total, step),
            origin_step=step,
            origin_epoch=epoch,
            origin_in_epoch=in_epoch,
        )

    def layout(self) -> dict[str, int]:
        """What decides which examples a step takes; equal layouts resume exactly."""
        return {
            "train_examples": self.train_examples,
            "batch_size": self.batch_size,
            "accumulation": self.accumulation,
            "steps_per_epoch": self.steps_per_epoch,
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def position_after(self, step: int) -> tuple[int, int]:
        """Data position (epoch, step within the epoch) after ``step`` steps."""
        epoch, in_epoch = divmod(step - self.origin_step + self.origin_in_epoch, self.steps_per_epoch)
        return self.origin_epoch + epoch, in_epoch

    def epoch_at(self, step: int) -> float:
        """Fractional epochs done after ``step`` steps."""
        done = self.origin_epoch * self.steps_per_epoch + self.origin_in_epoch + step - self.origin_step
        return done / self.steps_per_epoch

    def schedule(self, warmup_ratio: float, from_step: int = 0) -> tuple[int, int]:
        """(warmup steps, training steps) of a learning-rate schedule starting at ``from_step``."""
        steps = max(1, self.total_steps - from_step)
        return math.ceil(warmup_ratio * steps), steps


def lora_kwargs(params: TrainingParams) -> dict[str, Any]:
    """Keyword arguments of ``peft.LoraConfig`` for these parameters."""
    return {
        "r": params.lora_rank,
        "lora_alpha": params.lora_alpha,
        "lora_dropout": params.lora_dropout,
        "target_modules": list(params.target_modules),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
