"""The demo's LM warm-up from several seeds at once, keeping the candidate whose image lookup formed.

Whether the 2-layer demo LLM learns to look an image up by its colour ("Which image shows a blue shape?")
during the warm-up is a draw of its initialisation and data order: 3 seeds in 5 formed it, and a run that
misses it ends with multi-image at chance (docs/benchmarks.md, session 12). Tiny models use two cores poorly,
so two candidates on one thread each cost ~1.5x one candidate on two threads, not 2x. Each is scored on generated
two-image drills from another stream than the ones it trained on (never the test split), and the best goes on.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ivl.errors import ConfigError
from ivl.training.metrics import METRICS_FILE

if TYPE_CHECKING:
    from ivl.training.trainer import TrainResult

#: the validation drills' generator stream: far from any training-drill seed a demo uses
VALIDATION_DRILL_SEED = 1_000_003


@dataclass
class Candidate:
    seed: int
    result: TrainResult
    drill_accuracy: float


def _train_one(kwargs: dict[str, Any]) -> TrainResult:
    """One candidate, in its own process (``kwargs``: ``ivl.demo.stage_recipe``'s, for the lm_warmup stage)."""
    from ivl.demo import stage_recipe
    from ivl.training.trainer import train

    return train(stage_recipe("lm_warmup", **kwargs), log=lambda message: None)


def drill_accuracy(checkpoint: Path, drills: Sequence[dict[str, Any]]) -> float:
    """Share of text-only drills (world conversation format) a checkpoint answers exactly, greedy."""
    from ivl.inference.chat import batch_chat, load_for_inference

    if not drills:
        raise ConfigError("drill_accuracy needs at least one drill")
    model, processor = load_for_inference(checkpoint, dtype=torch.float32)
    questions = [d["conversations"][0]["value"] for d in drills]
    answers = [d["conversations"][1]["value"] for d in drills]
    replies = batch_chat(model, processor, questions, generation={"max_new_tokens": 8})
    return sum(r.strip() == a for r, a in zip(replies, answers, strict=True)) / len(drills)


def _watch(jobs: dict[int, Any], metrics: dict[int, Path], steps: int, progress: bool) -> None:
    """Wait for the candidates, with one progress bar each read from their metrics files."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not progress:
        for job in jobs.values():
            job.exception()  # waits; errors surface on .result()
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as bar:
        tasks = {seed: bar.add_task(f"lm_warmup seed {seed}", total=steps) for seed in jobs}
        while not all(job.done() for job in jobs.values()):
            for seed, path in metrics.items():
                bar.update(tasks[seed], completed=_last_step(path))
            time.sleep(0.5)
        for seed, job in jobs.items():
            if job.exception() is None:  # a failed candidate's bar stays where it stopped
                bar.update(tasks[seed], completed=steps)


def _last_step(path: Path) -> int:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        if '"step"' in line:
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError):
                continue
    return 0


def warm_up_candidates(
    *,
    out: Path,
    seeds: Sequence[int],
    threads: int,
    validation: Sequence[dict[str, Any]],
    recipe_kwargs: dict[str, Any],
    steps: int,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[Candidate, list[Candidate]]:
    """Train one warm-up per seed in parallel processes (``threads`` shared out), score each on
    ``validation``, return the best (ties: the first seed) and all of them. Candidate ``s`` writes to
    ``out/seed{s}/lm_warmup``; ``recipe_kwargs`` are ``stage_recipe``'s but ``out``, ``seed`` and ``threads``."""
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ConfigError(f"warm-up candidates need distinct seeds, got {list(seeds)}")
    per_job = max(1, threads // len(seeds))
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    with ProcessPoolExecutor(max_workers=len(seeds), mp_context=context) as pool:
        jobs = {
            seed: pool.submit(
                _train_one,
                {**recipe_kwargs, "out": out / f"seed{seed}", "seed": seed, "threads": per_job, "progress": False},
            )
            for seed in seeds
        }
        metrics = {seed: out / f"seed{seed}" / "lm_warmup" / METRICS_FILE for seed in seeds}
        _watch(jobs, metrics, steps, progress)
        results = {seed: job.result() for seed, job in jobs.items()}
    candidates = []
    for seed in seeds:
        final = results[seed].final_dir
        if final is None:
            raise ConfigError(f"warm-up candidate seed {seed} wrote no final model")
        candidates.append(Candidate(seed, results[seed], drill_accuracy(final, validation)))
        log(f"warm-up candidate seed {seed}: held-out drill accuracy {candidates[-1].drill_accuracy:.3f}")
    best = max(candidates, key=lambda c: c.drill_accuracy)  # max keeps the first of equals
    log(f"warm-up: seed {best.seed} goes on")
    return best, candidates
