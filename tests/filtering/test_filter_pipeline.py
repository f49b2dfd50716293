"""The streaming run: conservation of every input line, order, workers, resume after a crash or a kill,
sharding + merging, review mode, per-input exemptions, YAML configs and the CLI."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ivl.errors import ConfigError, DataError
from ivl.filtering import pipeline
from ivl.filtering.config import FilterConfig, InputSpec, load_filter_config
from ivl.filtering.pipeline import merge_outputs, merge_summaries, run_filter, shard_range, unwrap_record

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
]


def record(i: int, answer: str | None = None, **extra) -> dict:
    rng = np.random.default_rng(i)
    text = answer if answer is not None else " ".join(rng.choice(WORDS, 12)) + f". Item {i}."
    return {
        "id": i,
        "conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": text}],
        **extra,
    }


def line(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def mixed_input(n: int = 60) -> bytes:
    """Clean records with defects every few lines, plus lines that cannot be parsed at all."""
    out = []
    for i in range(n):
        kind = i % 10
        if kind == 1:
            out.append(line(record(i, " ".join(WORDS[:11] * 8))))  # repetitive
        elif kind == 3:
            out.append(line(record(i, "The value is 0." + "0" * 40 + "1")))  # zero run (no other rule fires)
        elif kind == 5:
            out.append(b'{"id": 5, "conversations": [truncated\n')  # broken JSON
        elif kind == 6:
            out.append(line(record(i, "Price: 5 \xe2\x82\xac")))  # mojibake
        elif kind == 7:
            out.append(b'{"note": "bad byte \xff here"}\n')  # invalid UTF-8
        elif kind == 8:
            out.append(line(record(i)).replace(b"\n", b"\r\n"))  # CRLF line: kept byte for byte
        elif kind == 9 and i < 20:
            out.append(b"   \n")  # blank line
        else:
            out.append(line(record(i, f'Ünïcödé answer {i} with "quotes" and {{braces}}')))
    out.append(line(record(n))[:-1])  # final line without newline
    return b"".join(out)


def split_lines(data: bytes) -> list[bytes]:
    """Lines with their newline; a final unterminated line gets one (as the filter writes it)."""
    return [m if m.endswith(b"\n") else m + b"\n" for m in re.findall(rb"[^\n]*\n|[^\n]+$", data)]


def outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in pipeline.OUTPUTS}


def reconstructed(out: Path) -> list[bytes]:
    files = outputs(out)
    lines = split_lines(files["kept.jsonl"])
    for name in ("rejected.jsonl", "review.jsonl"):
        lines += [unwrap_record(x) for x in files[name].splitlines()]
    return lines


def make_config(tmp_path: Path, data: bytes, out: str = "out", **kw) -> FilterConfig:
    src = tmp_path / "in.jsonl"
    if not src.exists():
        src.write_bytes(data)
    return FilterConfig(inputs=[InputSpec(str(src))], output_dir=str(tmp_path / out), **kw)


def counts(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("elapsed_s", "records_per_s")}


# ------------------------------------------------------------------ conservation and order


def test_every_line_lands_in_exactly_one_output_byte_identical(tmp_path):
    data = mixed_input()
    config = make_config(tmp_path, data, chunk_size=7, rules={"zero_run": {"action": "review"}})
    summary = run_filter(config)
    out = tmp_path / "out"
    assert Counter(reconstructed(out)) == Counter(split_lines(data))
    assert summary["records"] == len(split_lines(data)) == summary["kept"] + summary["rejected"] + summary["review"]
    kept = split_lines(outputs(out)["kept.jsonl"])
    assert kept == [x for x in split_lines(data) if x in set(kept)]  # input order is preserved
    assert any(x.endswith(b"\r\n") for x in kept)
    rejected = [json.loads(x) for x in outputs(out)["rejected.jsonl"].splitlines()]
    by_filter = Counter(r["filter"] for r in rejected)
    assert by_filter["parse"] == 6 + 6 + 2 and by_filter["ngram_repetition"] == 6 and by_filter["encoding"] == 6
    assert summary["by_filter"]["zero_run"] == {"rejected": 0, "review": 6} and summary["review"] == 6
    binary = next(r for r in rejected if "record_base64" in r)
    assert "UTF-8" in binary["reason"] and binary["line"] == 8
    for r in rejected:  # every wrapper names its source line, filter and reason
        assert (
            r["source"].endswith("in.jsonl")
            and r["line"] >= 1
            and r["reason"]
            and r["flags"][0]["filter"] == r["filter"]
        )


def test_workers_and_chunk_sizes_give_identical_outputs(tmp_path):
    data = mixed_input(120)
    run_filter(make_config(tmp_path, data, "a", chunk_size=256))
    run_filter(make_config(tmp_path, data, "b", chunk_size=5, workers=2))
    run_filter(make_config(tmp_path, data, "c", chunk_size=1))
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b") == outputs(tmp_path / "c")


# ------------------------------------------------------------------ resume


def test_resume_after_exception_between_commits(tmp_path):
    data = mixed_input(80)
    reference = run_filter(make_config(tmp_path, data, "ref", chunk_size=6))

    def stop_after_three(state, calls=[]):  # noqa: B006 - a counter that lives across calls
        calls.append(state.line)
        if len(calls) == 3:
            raise KeyboardInterrupt

    config = make_config(tmp_path, data, "run", chunk_size=6, commit_every_s=0)
    with pytest.raises(KeyboardInterrupt):
        run_filter(config, on_commit=stop_after_three)
    partial = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert partial["line"] == 19 and not partial["done"]
    resumed = run_filter(config)
    assert outputs(tmp_path / "run") == outputs(tmp_path / "ref")
    assert counts(resumed) == counts(reference)


def test_resume_truncates_output_written_after_the_last_commit(tmp_path, monkeypatch):
    data = mixed_input(80)
    run_filter(make_config(tmp_path, data, "ref", chunk_size=6))
    real, calls = pipeline._write_json_atomic, []

    def crash_on_fifth(path, payload):
        calls.append(path)
        if len(calls) == 5:  # outputs of chunk 4 are fsynced, progress.json still says chunk 3
            raise OSError("power cut")
        real(path, payload)

    config = make_config(tmp_path, data, "run", chunk_size=6, commit_every_s=0)
    monkeypatch.setattr(pipeline, "_write_json_atomic", crash_on_fifth)
    with pytest.raises(OSError, match="power cut"):
        run_filter(config)
    monkeypatch.setattr(pipeline, "_write_json_atomic", real)
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert (tmp_path / "run" / "kept.jsonl").stat().st_size > progress["outputs"]["kept.jsonl"]
    run_filter(config)
    assert outputs(tmp_path / "run") == outputs(tmp_path / "ref")


def test_resume_after_sigkill_with_remote_scoring(tmp_path, fake_openai):
    data = b"".join(line(record(i, f"answer {i} SCORE={i % 11}")) for i in range(100))
    (tmp_path / "in.jsonl").write_bytes(data)
    cfg = {
        "inputs": ["in.jsonl"],
        "chunk_size": 5,
        "commit_every_s": 0,
        "rules": {"llm_quality": {"enabled": True}},
        "scorer": {"base_url": fake_openai.base_url, "api_key_env": None, "rate_limit": 150, "concurrency": 2},
    }
    (tmp_path / "f.yaml").write_text(yaml.safe_dump({**cfg, "output_dir": "killed"}))
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({**cfg, "output_dir": "ref"}))
    script = "import sys; from ivl.filtering.config import load_filter_config as l; from ivl.filtering.pipeline import run_filter; run_filter(l(sys.argv[1]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "f.yaml")], env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    progress = tmp_path / "killed" / "progress.json"
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            if progress.exists():
                try:
                    if (json.loads(progress.read_text()).get("line") or 0) > 20:
                        break
                except ValueError:
                    pass
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    state = json.loads(progress.read_text())
    assert proc.returncode == -signal.SIGKILL and not state["done"] and state["line"] > 20
    resumed = run_filter(load_filter_config(tmp_path / "f.yaml"))
    reference = run_filter(load_filter_config(tmp_path / "g.yaml"))
    assert outputs(tmp_path / "killed") == outputs(tmp_path / "ref")
    assert counts(resumed) == counts(reference) and resumed["kept"] == sum(i % 11 >= 7 for i in range(100))
    assert len((tmp_path / "ref" / "scores.jsonl").read_bytes().splitlines()) == 100


def test_resume_refuses_changed_config_inputs_or_stray_outputs(tmp_path):
    data = mixed_input(20)
    config = make_config(tmp_path, data)
    first = run_filter(config)
    assert counts(run_filter(config)) == counts(first)  # a finished run is not redone
    with pytest.raises(ConfigError, match="different filter config"):
        run_filter(make_config(tmp_path, data, rules={"char_run": {"max_run": 3}}))
    (tmp_path / "in.jsonl").write_bytes(data + b"\n" + line(record(99)))
    with pytest.raises(DataError, match="inputs changed"):
        run_filter(config)
    restarted = run_filter(config, restart=True)
    assert restarted["records"] == first["records"] + 1
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "kept.jsonl").write_text("old\n")
    with pytest.raises(ConfigError, match=r"without progress\.json"):
        run_filter(make_config(tmp_path, data, "stray"))


# ------------------------------------------------------------------ sharding


@pytest.mark.parametrize("num_shards", [3, 7])
def test_shards_partition_the_input_and_merge_back(tmp_path, num_shards):
    data = mixed_input(50)
    full = run_filter(make_config(tmp_path, data, "full", chunk_size=4))
    dirs = []
    for i in range(num_shards):
        run_filter(make_config(tmp_path, data, f"s{i}", chunk_size=4, shard_index=i, num_shards=num_shards))
        dirs.append(tmp_path / f"s{i}")
    merged = merge_outputs(dirs, tmp_path / "merged")
    assert outputs(tmp_path / "merged") == outputs(tmp_path / "full")  # byte-identical, line numbers included
    assert counts(merged) == {**counts(full), "shards": [f"{i}/{num_shards}" for i in range(num_shards)]}
    assert json.loads((tmp_path / "merged" / "summary.json").read_text())["records"] == full["records"]
    with pytest.raises(DataError, match="counted twice"):
        merge_summaries([dirs[0], dirs[0]])
    other = run_filter(
        make_config(tmp_path, data, "other", rules={"char_run": {"max_run": 5}}, shard_index=1, num_shards=num_shards)
    )
    assert other["setup"] != full["setup"]
    with pytest.raises(DataError, match="different filter setups"):
        merge_summaries([dirs[0], tmp_path / "other"])


def test_shard_ranges_cut_at_line_starts(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"aaaa\nbb\ncccccc\nd")
    for n in (1, 2, 3, 5, 40):
        ranges = [shard_range(str(path), i, n) for i in range(n)]
        assert ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert all(start in (0, 5, 8, 15, 16) for start, _ in ranges)


# ------------------------------------------------------------------ review mode, exemptions, media


def test_review_mode_and_per_input_exemptions(tmp_path):
    loop = "ha " * 60
    (tmp_path / "web.jsonl").write_bytes(line(record(0, loop)) + line(record(1)))
    (tmp_path / "academic.jsonl").write_bytes(line(record(0, loop)) + line(record(1)))
    config = FilterConfig(
        inputs=[
            InputSpec(str(tmp_path / "web.jsonl")),
            InputSpec(str(tmp_path / "academic.jsonl"), skip_rules=["ngram_repetition", "phrase_loop"], name="acad"),
        ],
        output_dir=str(tmp_path / "out"),
        default_action="review",
    )
    summary = run_filter(config)
    assert summary["review"] == 1 and summary["rejected"] == 0 and summary["kept"] == 3
    assert summary["by_input"]["acad"] == {"records": 2, "kept": 2, "rejected": 0, "review": 0}
    flagged = json.loads((tmp_path / "out" / "review.jsonl").read_text())
    assert flagged["filter"] == "ngram_repetition" and flagged["source"].endswith("web.jsonl")
    assert [f["filter"] for f in flagged["flags"]] == ["ngram_repetition", "phrase_loop"]  # all review flags kept


def test_media_rules_in_the_pipeline_resolve_dataset_roots(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(images / "ok.png")
    Image.new("RGB", (40, 40), "white").save(images / "blank.png")
    (images / "cut.png").write_bytes((images / "ok.png").read_bytes()[:200])
    q = "<image>\nWhat is shown?"
    recs = [
        record(0, image="ok.png"),
        record(1, image="blank.png"),
        record(2, image="cut.png"),
        record(3, image="gone.png"),
    ]
    for r in recs:
        r["conversations"][0]["value"] = q
    (tmp_path / "ann.jsonl").write_bytes(b"".join(line(r) for r in recs))
    config = FilterConfig(
        inputs=[InputSpec(str(tmp_path / "ann.jsonl"), root=str(images))],
        output_dir=str(tmp_path / "out"),
        workers=2,
        chunk_size=1,
    )
    summary = run_filter(config)
    assert summary["kept"] == 1
    assert summary["by_filter"]["media"]["rejected"] == 2 and summary["by_filter"]["degenerate_image"]["rejected"] == 1


# ------------------------------------------------------------------ YAML config and CLI


def test_yaml_config_paths_meta_and_errors(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_bytes(line(record(0)))
    (tmp_path / "meta.json").write_text(json.dumps({"ds": {"root": "media/", "annotation": "data/a.jsonl"}}))
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            {
                "inputs": [{"path": "data/a.jsonl", "domain": "math"}],
                "meta": "meta.json",
                "output_dir": "o",
                "rules": {"char_run": {"max_run": 9}},
                "shard": "1/2",
            }
        )
    )
    config = load_filter_config(tmp_path / "c.yaml")
    assert config.inputs[0].path == str(tmp_path / "data" / "a.jsonl") and config.inputs[0].domain == "math"
    assert config.inputs[0].media_root == str(tmp_path / "data")
    assert config.inputs[1].name == "ds" and config.inputs[1].root == "media/"
    assert config.output_dir == str(tmp_path / "o") and (config.shard_index, config.num_shards) == (1, 2)
    assert next(r for r in config.build_rules() if r.name == "char_run").max_run == 9
    assert load_filter_config(tmp_path / "c.yaml", output_dir="elsewhere").output_dir == str(
        Path("elsewhere").resolve()
    )
    for bad, fragment in [
        ({"inputs": ["a.jsonl"], "rules": {"nope": {}}}, "unknown rule"),
        ({"inputs": ["a.jsonl"], "worker": 2}, "unknown filter config field"),
        ({"inputs": ["a.jsonl"], "shard": "3/2"}, "shard"),
        ({"inputs": []}, "at least one input"),
        ({"inputs": ["a.jsonl"], "chain": ["char_run"], "rules": {"zero_run": {}}}, "not in chain"),
        ({"inputs": [{"path": "a.jsonl", "skip_rules": ["nope"]}]}, "skip_rules"),
        ({"inputs": ["a.jsonl"], "scorer": {"kind": "local"}}, "checkpoint"),
        ({"inputs": ["a.jsonl"], "scorer": {"url": "x"}}, "unknown field"),
    ]:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=fragment):
            load_filter_config(tmp_path / "bad.yaml")


def test_cli_filter_and_merge(tmp_path):
    from typer.testing import CliRunner

    from ivl.cli import app

    data = mixed_input(30)
    (tmp_path / "in.jsonl").write_bytes(data)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"inputs": ["in.jsonl"], "output_dir": "out"}))
    runner = CliRunner()
    result = runner.invoke(app, ["filter", str(tmp_path / "c.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "| ngram_repetition |" in result.output and (tmp_path / "out" / "summary.md").exists()
    for i in range(2):
        result = runner.invoke(
            app,
            [
                "filter",
                str(tmp_path / "c.yaml"),
                "--shard",
                f"{i}/2",
                "-o",
                str(tmp_path / f"s{i}"),
                "--no-progress",
                "--workers",
                "2",
            ],
        )
        assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["filter", "--merge", str(tmp_path / "s0"), "--merge", str(tmp_path / "s1"), "-o", str(tmp_path / "m")]
    )
    assert result.exit_code == 0, result.output
    assert outputs(tmp_path / "m") == outputs(tmp_path / "out")


def test_a_crashing_rule_sends_the_record_to_review_not_to_oblivion(tmp_path):
    from dataclasses import dataclass

    from ivl.filtering.pipeline import check_record
    from ivl.filtering.rules import Rule

    @dataclass(kw_only=True)
    class Boom(Rule):
        name = "boom"

        def check(self, sample):
            raise RuntimeError("bug in a rule")

    status, flags = check_record([Boom()], line(record(1)), "x.jsonl", 1, InputSpec("x.jsonl"))
    assert status == "review" and flags[0].filter == "boom" and "RuntimeError: bug in a rule" in flags[0].reason
