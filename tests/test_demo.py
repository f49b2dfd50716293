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


@pytest.mark.slow
def test_quick_demo_learns_and_writes_the_report(tmp_path):
    from ivl.demo import run_demo

    out = tmp_path / "demo"
    report = run_demo(out, quick=True, progress=False)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["tasks"] == report["tasks"]
    assert set(on_disk) >= {"tasks", "mean_accuracy", "minutes"}
    for row in on_disk["tasks"].values():
        assert set(row) == {"accuracy", "blind", "chance", "n"}
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["blind"] <= 1.0 and row["n"] > 0
    assert on_disk["mean_accuracy"] == pytest.approx(
        sum(r["accuracy"] for r in on_disk["tasks"].values()) / len(on_disk["tasks"])
    )

    for stage, loss in report["losses"].items():
        assert loss["last"] < loss["first"], (stage, loss)
    colour = report["tasks"]["colour"]
    assert colour["accuracy"] >= colour["chance"] + 0.4, colour  # chance is 1/6
    assert colour["blind"] <= colour["chance"] + 0.25, colour

    final = out / "stage2" / "final"
    assert detect_layout(final) == "official"
    assert (final / "tokenizer.json").is_file() and (out / "stage2" / "loss_curve.png").is_file()
    assert report["chat_example"]["answer"]
