"""A run fitted into a time budget: the plan from the measured speed, the re-spanned schedule, the trainer."""

from __future__ import annotations

import functools

import pytest
import torch

from ivl.errors import ConfigError
from ivl.training.optim import cosine_factor, cosine_schedule, respan_cosine
from ivl.training.time_budget import TimeBudget


class FakeClock:
    """Reads ``now``; the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_plan(budget: TimeBudget, clock: FakeClock, steps: int, seconds_per_step: float, start: int = 1) -> dict:
    plans = {}
    for step in range(start, start + steps):
        clock.now += seconds_per_step
        planned = budget.replan(step)
        if planned is not None:
            plans[step] = planned
    return plans


def test_plan_is_the_steps_that_fit_measured_after_the_slow_first_steps():
    """Hand-computed: 1 s per step after step 2 (the first two cost 5 s each), 100 s budget. At step 10:
    8 s over the 8 steps since step 2, so 1 s per step, 100 - 18 = 82 s left: 10 + 82 = 92 steps."""
    clock = FakeClock()
    budget = TimeBudget(100.0, max_steps=1000, started=0.0, first=10, every=20, skip=2, clock=clock)
    plans = run_plan(budget, clock, 2, 5.0) | run_plan(budget, clock, 28, 1.0, start=3)
    assert plans == {10: 92, 30: 92}
    assert budget.plans == [(10, 92), (30, 92)]


def test_plan_never_exceeds_max_steps_nor_falls_behind_the_current_step():
    clock = FakeClock()
    fast = TimeBudget(1e6, max_steps=40, started=0.0, first=10, every=10, skip=2, clock=clock)
    assert run_plan(fast, clock, 40, 1.0) == {10: 40, 20: 40, 30: 40, 40: 40}
    clock = FakeClock()
    spent = TimeBudget(5.0, max_steps=40, started=0.0, first=10, every=10, skip=2, clock=clock)
    assert run_plan(spent, clock, 10, 1.0) == {10: 10}  # over budget already: stop here


def test_plan_follows_a_machine_that_slows_down():
    clock = FakeClock()
    budget = TimeBudget(200.0, max_steps=1000, started=0.0, first=10, every=40, skip=0, clock=clock)
    plans = run_plan(budget, clock, 10, 1.0)
    assert plans == {10: 200}
    plans = run_plan(budget, clock, 40, 3.0, start=11)  # 3 s per step: 130 s over 50 steps, 2.6 s per step
    assert plans == {50: 50 + int((200 - 130) / 2.6)} == {50: 76}


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_budget_must_be_positive_seconds(bad):
    with pytest.raises(ConfigError, match="positive number of seconds"):
        TimeBudget(bad, max_steps=10, started=0.0)


def test_respan_gives_the_lr_a_schedule_of_the_new_length_would_and_ends_at_its_last_step():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.5)
    scheduler = cosine_schedule(optimizer, 100, warmup_steps=10)
    for _ in range(30):
        optimizer.step()
        scheduler.step()
    respan_cosine(scheduler, 60, warmup_steps=6)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * cosine_factor(30, 60, 6))
    assert scheduler.get_last_lr() == [optimizer.param_groups[0]["lr"]]
    for step in range(31, 61):
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * cosine_factor(step, 60, 6))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match="re-span"):
        respan_cosine(scheduler, 10, warmup_steps=11)


@pytest.fixture
def quick_budget(monkeypatch):
    """The trainer's budget measuring from step 1 and planning at step 3, then every 2 steps."""
    import ivl.training.trainer as trainer

    monkeypatch.setattr(trainer, "TimeBudget", functools.partial(TimeBudget, first=3, every=2, skip=1))


def test_trainer_cuts_the_run_to_its_budget_and_saves_the_final_model(make_recipe, quick_budget):
    from ivl.training.metrics import read_metrics
    from ivl.training.recipe import recipe_from_dict
    from ivl.training.trainer import train

    recipe = recipe_from_dict(make_recipe(train={"max_steps": 8, "time_budget_s": 1e-3, "resume": None}))
    result = train(recipe)
    assert result.steps == 3 and result.stopped == "time_budget" and result.budget_plans == [(3, 3)]
    assert result.final_dir is not None and (result.final_dir / "config.json").is_file()
    assert [r["step"] for r in read_metrics(result.output_dir / "metrics.jsonl")] == [1, 2, 3]


def test_trainer_with_room_in_its_budget_runs_every_step(make_recipe, quick_budget):
    from ivl.training.recipe import recipe_from_dict
    from ivl.training.trainer import train

    recipe = recipe_from_dict(make_recipe(train={"max_steps": 6, "time_budget_s": 3600, "resume": None}))
    result = train(recipe)
    assert result.steps == 6 and result.stopped == "max_steps" and result.budget_plans == [(3, 6), (5, 6)]


def test_a_budget_refuses_to_resume_and_must_be_positive(make_recipe, tmp_path):
    from ivl.training.recipe import recipe_from_dict
    from ivl.training.trainer import train

    train(recipe_from_dict(make_recipe(train={"max_steps": 2})))  # leaves a checkpoint to resume
    with pytest.raises(ConfigError, match="applies to fresh runs"):
        train(recipe_from_dict(make_recipe(train={"max_steps": 4, "time_budget_s": 60})))
    with pytest.raises(ConfigError, match="time_budget_s must be > 0"):
        recipe_from_dict(make_recipe(train={"time_budget_s": 0})).validate()
    with pytest.raises(ConfigError, match="and finite"):
        recipe_from_dict(make_recipe(train={"time_budget_s": float("inf")})).validate()
