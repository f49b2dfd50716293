"""The staged trainer end to end on a tiny model: resume after kill -9, freeze plans, final official checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ivl.training.checkpointing import latest_checkpoint, list_checkpoints
from ivl.training.metrics import read_metrics
from ivl.training.recipe import recipe_from_dict
from ivl.training.trainer import build_model, train


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]


def test_resume_after_kill_9_reproduces_the_uninterrupted_losses(make_recipe, tmp_path):
    steps = 10
    clean = make_recipe(train={"output_dir": str(tmp_path / "clean"), "max_steps": steps, "save_steps": 100})
    result = train(recipe_from_dict(clean))
    reference = losses(tmp_path / "clean")
    assert [s for s, _ in reference] == list(range(1, steps + 1))
    assert result.losses == [loss for _, loss in reference]

    killed_dir = tmp_path / "killed"
    recipe = make_recipe(train={"output_dir": str(killed_dir), "max_steps": steps, "save_steps": 2})
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ivl.cli", "train", str(recipe_file)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            found = latest_checkpoint(killed_dir)
            if found is not None and found.name >= "checkpoint-00000004":
                break
            if proc.poll() is not None:
                pytest.fail(f"training subprocess ended early:\n{proc.stdout.read().decode()}")
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed_dir / "final").exists()
    done = losses(killed_dir)
    assert len(done) < steps, "the killed run had already logged every step"

    resumed = train(recipe_from_dict(recipe))  # resume: auto
    assert resumed.resumed_from is not None
    assert resumed.resumed_from.name >= "checkpoint-00000004"
    assert losses(killed_dir) == reference  # exactly, step for step
    assert (killed_dir / "final" / "config.json").is_file()
    assert (killed_dir / "loss_curve.png").stat().st_size > 0
    assert len(list_checkpoints(killed_dir)) <= 2  # save_total_limit


def test_loss_falls_and_final_checkpoint_reloads_to_the_same_outputs(make_recipe, tmp_path):
    from ivl.checkpoint.io import load_model

    recipe = recipe_from_dict(make_recipe(train={"max_steps": 12}, optim={"lr": 3e-3}))
    model, processor = build_model(recipe)
    result = train(recipe, model=model, processor=processor)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.5, result.losses
    reloaded = load_model(result.final_dir, dtype=torch.float32)
    assert {**reloaded.config.to_dict(), "name": ""} == {**model.config.to_dict(), "name": ""}
    ids = torch.tensor([[1, 2, 3, 500, 500, 500, 500, 7, 8]])
    pixels = torch.randn(1, 3, 56, 56)
    model.eval()
    with torch.no_grad():
        expected = model(ids, pixels).logits
        got = reloaded(ids, pixels).logits
    assert torch.equal(expected, got)
    assert (result.final_dir / "tokenizer.json").is_file()
    assert (result.final_dir / "ivl_processor_config.json").is_file()


def test_stage1_changes_only_mlp1_and_keeps_frozen_towers_in_eval(make_recipe, capsys):
    recipe = recipe_from_dict(make_recipe(stage={"name": "stage1"}, train={"max_steps": 3, "save_final": False}))
    model, processor = build_model(recipe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(recipe, model=model, processor=processor)
    printed = capsys.readouterr().out
    assert "mlp1" in printed and "trainable" in printed
    assert not model.vision_model.training and not model.language_model.training
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("mlp1.") for k in changed), changed


def test_stale_temporary_checkpoint_is_never_resumed(tmp_path):
    (tmp_path / ".checkpoint-00000009.tmp" / "state").mkdir(parents=True)
    incomplete = tmp_path / "checkpoint-00000008"
    incomplete.mkdir()  # renamed dirs always hold trainer_state.json; without it, it is not a checkpoint
    assert latest_checkpoint(tmp_path) is None
