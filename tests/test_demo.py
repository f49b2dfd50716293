"""`ivl demo --quick`: the whole pipeline end to end, short. The loss falls and the easiest task is learned."""

from __future__ import annotations

import json

import pytest
import torch

from ivl.checkpoint.layouts import detect_layout


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _check_report(out, report) -> None:
    """report.json on disk matches the returned report and has the documented schema."""
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["tasks"] == report["tasks"]
    assert set(on_disk) >= {"tasks", "mean_accuracy", "minutes"}
    for row in on_disk["tasks"].values():
        assert set(row) == {"accuracy", "blind", "chance", "n"}
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["blind"] <= 1.0 and row["n"] > 0
    assert on_disk["mean_accuracy"] == pytest.approx(
        sum(r["accuracy"] for r in on_disk["tasks"].values()) / len(on_disk["tasks"])
    )


@pytest.mark.slow
def test_quick_demo_trains_learns_and_keeps_frozen_weights(tmp_path):
    """One test, one demo run: split over several tests, xdist ran the shared fixture once per worker."""
    from ivl.demo import run_demo

    out = tmp_path / "demo"
    report = run_demo(out, quick=True, progress=False, threads=1)  # one per xdist worker: no oversubscription
    _check_report(out, report)

    for stage, loss in report["losses"].items():
        if stage == "stage1_5":
            # ViT tuning at a low LR from an already-aligned model: 20 steps are noise; it must not diverge,
            # i.e. stay well below where the alignment stage started
            assert loss["last"] < report["losses"]["stage1"]["first"], (stage, loss)
        else:
            assert loss["last"] < loss["first"], (stage, loss)
    final = out / "stage2" / "final"
    assert detect_layout(final) == "official"
    assert (final / "tokenizer.json").is_file() and (out / "stage2" / "loss_curve.png").is_file()
    assert report["chat_example"]["answer"]

    # the easiest task is learned, and not from the question alone
    colour = report["tasks"]["colour"]
    assert colour["accuracy"] >= colour["chance"] + 0.4, colour  # chance is 1/6
    assert colour["blind"] <= colour["chance"] + 0.25, colour

    # the freeze plans held on disk; the ViT pre-training moved the ViT alone (LLM outputs bit-identical)
    assert set(report["frozen_weights"]) == {"vision_pretrain", "stage1", "stage1_5"}
    for stage, check in report["frozen_weights"].items():
        assert check["frozen_tensors"] > 0 and check["changed"] == [], (stage, check)
    assert report["frozen_weights"]["vision_pretrain"]["text_logits_identical"] is True
    pretrained = report["losses"]["vision_pretrain"]
    assert pretrained["held_out_accuracy"]["colour"] >= 0.5, pretrained  # 6 colours: chance 1/6
    assert (out / "vision_pretrain" / "metrics.jsonl").is_file() and (
        out / "vision_pretrain" / "loss_curve.png"
    ).is_file()


@pytest.mark.slow
def test_quick_mono_demo_learns_and_keeps_its_language_weights(tmp_path):
    """`ivl demo --model mono`: EViP S1.1 leaves every language weight and text-only logit bit-identical."""
    from ivl.demo import run_demo

    report = run_demo(tmp_path / "mono", model="mono", quick=True, progress=False, threads=1)
    _check_report(tmp_path / "mono", report)
    s1_1 = report["frozen_weights"]["stage1"]
    assert s1_1["changed"] == [] and s1_1["text_logits_identical"] is True, s1_1
    assert report["frozen_weights"]["stage1_5"]["changed"] == []
    colour = report["tasks"]["colour"]
    assert colour["accuracy"] >= colour["chance"] + 0.4, colour
    assert detect_layout(tmp_path / "mono" / "stage2" / "final") == "official"


def test_vit_pretraining_labels_agree_with_each_task_answer(tmp_path):
    """Every labelled image of the world gets attributes that agree with its record's ground truth."""
    from ivl.data.synthetic import generate_world, read_records
    from ivl.demo import image_attributes, labelled_tiles

    world = tmp_path / "world"
    generate_world(world, seed=3, n_train=12, n_val=0, n_test=0, image_size_range=(56, 80), absolute_paths=True)
    expected_images = 0
    for record in read_records(world, "train"):
        labels = image_attributes(record)
        task, answer = record["task"], record["answer"]
        if task in ("video", "text"):
            assert labels == []
            continue
        expected_images += len(labels)
        if task == "ocr":
            (label,) = labels
            assert label["word"] == answer and set(label["patch_shape"]) == {"background", "text"}
        elif task == "multi_image":
            shown = [label["colour"] for label in labels]
            asked = record["conversations"][0]["value"]
            assert [colour in asked for colour in shown].count(True) >= 1 and all(lb["count"] == "1" for lb in labels)
            assert shown[int(answer[-1]) - 1] in asked
        else:
            (label,) = labels
            assert label["count"] == str(len(record["objects"]))
            if task in ("colour", "shape", "count"):
                assert label[{"colour": "colour", "shape": "shape", "count": "count"}[task]] == answer
            if task == "position":
                assert "colour" not in label  # two objects of different colours: no single colour
            # every object covers at least one patch centre of the 8 x 8 grid, with its own colour and shape
            covered = set(zip(label["patch_colour"], label["patch_shape"], strict=True)) - {("background",) * 2}
            assert covered == {(o["colour"], o["shape"]) for o in record["objects"]}, record["id"]
    tiles = labelled_tiles(world, "train", image_size=56, patch_size=7, box_bins=20)
    assert len(tiles) == expected_images and tiles.pixel_values.shape[1:] == (3, 56, 56)
    assert tiles.labels["patch_colour"].shape == (expected_images, 64) and tiles.labels["colour"].ndim == 1
    # a patch has a box label exactly where an object (not background, not the word) covers it
    covered = (tiles.labels["patch_colour"] > 0) & (tiles.labels["patch_shape"] < len(tiles.classes["patch_shape"]) - 1)
    assert torch.equal(tiles.labels["patch_x1"] >= 0, covered)
    assert bool((tiles.labels["patch_x1"][covered] <= tiles.labels["patch_x2"][covered]).all())


def test_patch_box_labels_give_each_covered_patch_its_objects_binned_box():
    """Hand-computed: on a 4 x 4 grid (cell centres at 125, 375, 625, 875), a box [0, 0, 499, 260] covers the
    centres of cells 0 and 1; in 10 bins of 100 its coordinates fall in bins 0, 0, 4, 2. Background and the
    rendered word carry no box; without bins there are no box attributes."""
    from ivl.demo import PATCH_BOX, attribute_classes, image_attributes

    record = {"task": "colour", "objects": [{"colour": "red", "shape": "circle", "box": [0, 0, 499, 260]}]}
    (label,) = image_attributes(record, grid=4, box_bins=10)
    expected = {"patch_x1": "0", "patch_y1": "0", "patch_x2": "4", "patch_y2": "2"}
    for name, bin_ in expected.items():
        assert label[name] == [bin_, bin_] + [None] * 14
    assert label["patch_colour"][:3] == ["red", "red", "background"]
    (plain,) = image_attributes(record, grid=4)
    assert not set(PATCH_BOX) & set(plain) and not set(PATCH_BOX) & set(attribute_classes())
    assert attribute_classes(10)["patch_x2"] == [str(i) for i in range(10)]
    # a box edge at 1000 falls in the last bin, not past it
    record["objects"][0]["box"] = [500, 500, 1000, 1000]
    (edge,) = image_attributes(record, grid=4, box_bins=10)
    assert edge["patch_x2"][15] == "9" and edge["patch_x1"][15] == "5"
    ocr = {"task": "ocr", "answer": "cat", "text_box": [0, 0, 1000, 1000]}
    (word,) = image_attributes(ocr, grid=4, box_bins=10)
    assert word["patch_x1"] == [None] * 16 and set(word["patch_colour"]) == {"text"}


@pytest.mark.slow
def test_warmup_candidates_train_side_by_side_and_the_best_goes_on(tmp_path):
    """Two LM warm-ups (seeds 0 and 1) run in parallel processes; each is scored on held-out drills, the
    better one is the checkpoint the next stage starts from, and the report lists both."""
    from ivl.demo import DemoSettings, VisionPretrainSettings, run_demo

    settings = DemoSettings(
        n_train=20, n_test=6, tasks=("colour", "multi_image"), warmup_drills=60, warmup_candidates=2,
        steps={"lm_warmup": 8, "stage1": 4, "stage1_5": 2, "stage2": 4},
        vision_pretrain=VisionPretrainSettings(steps=4, batch_size=8),
    )  # fmt: skip
    out = tmp_path / "demo"
    report = run_demo(out, settings=settings, progress=False, threads=2)
    _check_report(out, report)
    tried = report["warmup_candidates"]
    assert [c["seed"] for c in tried] == [0, 1] and all(0.0 <= c["drill_accuracy"] <= 1.0 for c in tried)
    best = max(tried, key=lambda c: c["drill_accuracy"])
    for c in tried:
        assert (out / "lm_warmup_candidates" / f"seed{c['seed']}" / "lm_warmup" / "final").is_dir()
    assert report["losses"]["lm_warmup"]["steps"] == 8
    # the ViT pre-training started from the chosen candidate: its LLM weights are that candidate's
    from safetensors.torch import load_file

    def llm_weights(path):
        tensors = {}
        for shard in sorted(path.glob("*.safetensors")):
            tensors.update({k: v for k, v in load_file(shard).items() if k.startswith("language_model.")})
        return tensors

    chosen = llm_weights(out / "lm_warmup_candidates" / f"seed{best['seed']}" / "lm_warmup" / "final")
    after = llm_weights(out / "vision_pretrain" / "final")
    assert chosen and chosen.keys() == after.keys() and all(torch.equal(chosen[k], after[k]) for k in chosen)


def test_time_budget_shortens_stage2_and_the_report_says_so(tmp_path, monkeypatch):
    """With no time left, Stage 2 stops at its first speed measurement (step 2 here) and saves its model."""
    import functools

    import ivl.training.trainer as trainer
    from ivl.demo import DemoSettings, VisionPretrainSettings, run_demo
    from ivl.training.time_budget import TimeBudget

    monkeypatch.setattr(trainer, "TimeBudget", functools.partial(TimeBudget, first=2, every=1, skip=1))
    settings = DemoSettings(
        n_train=12, n_test=4, tasks=("colour",), warmup_drills=0, warmup_candidates=1, minutes=1e-3,
        steps={"lm_warmup": 4, "stage1": 2, "stage1_5": 2, "stage2": 6},
        vision_pretrain=VisionPretrainSettings(steps=2, batch_size=4),
    )  # fmt: skip
    report = run_demo(tmp_path / "demo", settings=settings, progress=False, threads=1)
    stage2 = report["losses"]["stage2"]
    assert stage2["steps"] == 2 and stage2["max_steps"] == 6 and stage2["budget_plans"] == [[2, 2]]
    assert stage2["time_budget_s"] == 0.0  # the floor (1 ms, rounded): spent before Stage 2 began
    assert "time_budget_s" not in report["losses"]["stage1"]
    assert (tmp_path / "demo" / "stage2" / "final" / "config.json").is_file()


def test_cli_minutes_sets_the_demo_budget(monkeypatch):
    """``--minutes M`` budgets the run, ``--minutes 0`` turns the budget off, a negative one is refused."""
    from typer.testing import CliRunner

    import ivl.demo
    from ivl.cli import app

    seen = []
    monkeypatch.setattr(ivl.demo, "run_demo", lambda out, **kwargs: seen.append(kwargs["settings"]))
    runner = CliRunner()
    assert runner.invoke(app, ["demo", "--out", "x", "--minutes", "12"]).exit_code == 0
    assert runner.invoke(app, ["demo", "--out", "x", "--quick", "--minutes", "0"]).exit_code == 0
    assert runner.invoke(app, ["demo", "--out", "x"]).exit_code == 0
    assert seen[0].minutes == 12 and seen[0].steps == ivl.demo.FULL.steps
    assert seen[1].minutes is None and seen[1].steps == ivl.demo.QUICK.steps
    assert seen[2] is None  # the defaults: FULL's 15 minutes
    refused = runner.invoke(app, ["demo", "--out", "x", "--minutes", "-1"])
    assert refused.exit_code != 0 and "--minutes must be >= 0" in refused.output
