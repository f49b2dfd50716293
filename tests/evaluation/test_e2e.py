"""End to end with a tiny random model on disk: the engine path, resume, sharding/merge, voting, the CLI.

Random weights answer gibberish, so these tests check plumbing and invariants (same questions, same seeds,
same answers whichever way the run is split), not scores.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from ivl.evaluation.runner import EvalOptions, Query, evaluate, load_engine_predictor, merge_shards


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer

    from ivl.config import get_preset
    from ivl.models.internvl import InternVL

    torch.manual_seed(0)
    model = InternVL(get_preset("tiny")).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights than the default init, so replies vary from item to item
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ivl.data.synthetic import generate_world

    path = tmp_path_factory.mktemp("world") / "w"
    generate_world(path, seed=0, n_train=0, n_val=0, n_test=2, tasks=["colour", "grounding", "multi_image"])
    return path


class Counting:
    def __init__(self, inner) -> None:
        self.inner, self.asked = inner, []

    def __call__(self, queries: Sequence[Query]) -> list[str]:
        self.asked += [(q.item_id, q.sample) for q in queries]
        return self.inner(queries)


def _opts(world: Path, out: Path, **kw) -> EvalOptions:
    base = {"max_new_tokens": 6, "progress": False}
    return EvalOptions(str(world), str(out), **(base | kw))


def test_engine_run_resume_and_shards_agree(model_dir: Path, world: Path, tmp_path: Path) -> None:
    # float64: padding in a batch cannot flip an argmax, so batched and one-by-one runs must agree exactly
    predictor = load_engine_predictor(model_dir, device="cpu", dtype="float64", max_batch_size=4)
    whole = evaluate(predictor, _opts(world, tmp_path / "whole", batch_size=4))
    assert whole["num_items"] == 6 and set(whole["scores"]) == {"colour", "grounding", "multi_image"}
    replies = [r["replies"][0] for r in whole["items"]]
    assert all(isinstance(r, str) for r in replies) and len(set(replies)) > 1
    for i in range(2):
        counting = Counting(predictor)
        evaluate(counting, _opts(world, tmp_path / "sharded", batch_size=1, shard=(i, 2)))
        assert len(counting.asked) == 3
    merged = merge_shards(_opts(world, tmp_path / "sharded", shard=(0, 2)))
    assert [r["replies"] for r in merged["items"]] == [r["replies"] for r in whole["items"]]
    assert merged["scores"] == whole["scores"]
    again = Counting(predictor)
    evaluate(again, _opts(world, tmp_path / "whole", batch_size=4))
    assert again.asked == []  # resumed: nothing left to ask


def test_vote_with_sampling_is_reproducible(model_dir: Path, world: Path, tmp_path: Path) -> None:
    predictor = load_engine_predictor(model_dir, device="cpu", dtype="float64", max_batch_size=8)
    a = evaluate(predictor, _opts(world, tmp_path / "a", vote=3, temperature=1.0, limit=2, batch_size=2))
    b = evaluate(predictor, _opts(world, tmp_path / "b", vote=3, temperature=1.0, limit=2, batch_size=1))
    assert [r["replies"] for r in a["items"]] == [r["replies"] for r in b["items"]]
    assert all(len(r["replies"]) == 3 and "vote" in r for r in a["items"])
    assert any(len(set(r["replies"])) > 1 for r in a["items"])  # sampling really samples


def test_cli_eval(model_dir: Path, world: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ivl.cli import app

    out = tmp_path / "cli"
    args = ["eval", "--model", str(model_dir), "--task", str(world), "--out", str(out), "--limit", "3",
            "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "scores" in result.output and "max tiles" in result.output and "the benchmark's own prompt" in result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["num_items"] == 3 and saved["settings"]["colour"]["max_new_tokens"] == 4
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    shard = CliRunner().invoke(app, [*args[:-1], "--shard", "1/2", "--out", str(tmp_path / "s"), "--no-progress"])
    assert shard.exit_code == 0 and "merge with --merge 2" in shard.output


@pytest.mark.slow
def test_cli_procs_launches_shards_and_merges(model_dir: Path, world: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ivl.cli import app

    out = tmp_path / "procs"
    args = ["eval", "--model", str(model_dir), "--task", str(world), "--out", str(out), "--limit", "4",
            "--max-new-tokens", "3", "--device", "cpu", "--procs", "2", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "predictions.shard-0-of-2.jsonl").is_file() and (out / "predictions.shard-1-of-2.jsonl").is_file()
    assert json.loads((out / "results.json").read_text())["num_items"] == 4
