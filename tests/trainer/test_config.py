"""The step plan: totals, data positions, origins after a layout change, schedules."""

from __future__ import annotations

import pytest

from brightrun_trainer.config import TrainingPlan, lora_kwargs
from brightrun_trainer.spec import TrainingParams


def test_plan_counts_partial_batches_and_accumulation_groups() -> None:
    plan = TrainingPlan.make(TrainingParams(batch_size=4, gradient_accumulation_steps=3, epochs=2), 50)
    # 13 micro-batches (the last of 2 examples) make 5 steps (the last of 1 micro-batch).
    assert plan.steps_per_epoch == 5
    assert plan.total_steps == 10
    assert [plan.position_after(s) for s in (0, 4, 5, 9)] == [(0, 0), (0, 4), (1, 0), (1, 4)]
    assert plan.epoch_at(7) == pytest.approx(1.4)
    assert plan.schedule(0.03) == (1, 10)  # ceil(0.3)
    assert TrainingPlan.make(TrainingParams(epochs=2, max_steps=7), 50).total_steps == 7


def test_rebased_plan_continues_from_the_carried_position() -> None:
    plan = TrainingPlan.make(TrainingParams(batch_size=2, epochs=3), 40)  # 20 steps an epoch
    moved = plan.rebased(16, 1, 5)  # 16 steps done (old layout), now at step 5 of epoch 1
    assert moved.total_steps == 16 + 15 + 20
    assert moved.position_after(16) == (1, 5)
    assert moved.position_after(31) == (2, 0)
    assert moved.epoch_at(16) == pytest.approx(1.25)
    assert moved.schedule(0.1, from_step=16) == (4, 35)
    assert plan.rebased(0, 0, 0) == plan  # the origin of a fresh run


def test_lora_kwargs_map_the_params() -> None:
    kwargs = lora_kwargs(TrainingParams(lora_rank=8, lora_alpha=16, lora_dropout=0.1, target_modules=("q_proj",)))
    assert kwargs == {
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.1,
        "target_modules": ["q_proj"],
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
