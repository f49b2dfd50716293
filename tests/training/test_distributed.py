"""2 ranks (torchrun, gloo, FSDP2 per block) give the losses of 1 process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from ivl.training.metrics import read_metrics
from ivl.training.recipe import recipe_from_dict
from ivl.training.trainer import train


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_two_gloo_ranks_match_one_process_with_gradient_accumulation(make_recipe, tmp_path):
    steps = 4
    # stage 2 with text-only packs in the mixture: the vision path must stay in every rank's graph
    one = make_recipe(
        train={"output_dir": str(tmp_path / "one"), "max_steps": steps, "grad_accum": 2, "save_final": False}
    )
    train(recipe_from_dict(one))
    reference = read_metrics(tmp_path / "one" / "metrics.jsonl")

    two = make_recipe(
        train={"output_dir": str(tmp_path / "two"), "max_steps": steps, "grad_accum": 1, "save_steps": steps}
    )
    recipe_file = tmp_path / "two.yaml"
    recipe_file.write_text(yaml.safe_dump(two))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "ivl.cli", "train", str(recipe_file),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = read_metrics(tmp_path / "two" / "metrics.jsonl")

    assert [r["step"] for r in got] == [r["step"] for r in reference] == list(range(1, steps + 1))
    for mine, ref in zip(got, reference, strict=True):
        assert mine["tokens"] == ref["tokens"] and mine["tiles"] == ref["tiles"]  # the same global batch
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4, abs=1e-6)
    # the sharded run also writes a resumable DCP checkpoint and the final model in the official layout
    assert (tmp_path / "two" / f"checkpoint-{steps:08d}" / "trainer_state.json").is_file()
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()
