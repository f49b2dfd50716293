"""The benchmark runner: ask a model every item of a benchmark, save each answer as it comes, then score.

Flow: ``load_benchmark`` → keep this shard's items → skip items already in the predictions file (resume) →
batches of queries (K per item when voting) through a :class:`Predictor` → one JSONL line per item, flushed
as soon as its batch is done → ``score_predictions`` → ``results.json`` and a printed table.

Sharding: ``shard=(i, n)`` takes items i, i+n, i+2n, … and writes ``predictions.shard-i-of-n.jsonl``;
``merge_shards`` joins the shard files (every item exactly once) and scores them. ``launch_shards`` runs the
n shards as separate processes (one GPU each when there are GPUs) and merges.

Sampling seeds depend on the item id and the sample index only, never on batch position, so a sharded,
resumed or re-batched run asks exactly the same questions with the same seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ivl.errors import ConfigError, DataError
from ivl.evaluation.answers import AnswerKind, extract_final_answer
from ivl.evaluation.metrics import aggregate_by, get_metric
from ivl.evaluation.tasks import (
    COT_MAX_NEW_TOKENS,
    COT_MC,
    COT_OPEN,
    EvalItem,
    build_prompt,
    item_images,
    load_benchmark,
)
from ivl.evaluation.voting import vote_answers

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"


# --------------------------------------------------------------------------------------------------------
# options


@dataclass
class EvalOptions:
    """How to run a benchmark. Fields in ``PREDICTION_FIELDS`` change the answers; resume checks them."""

    benchmark: str  # NAME=FILE, FILE, or a synthetic world directory
    out_dir: str
    split: str = "test"  # synthetic worlds only
    model: str = ""  # shown in reports; resume refuses to mix models
    batch_size: int = 8  # items per engine call (x vote samples)
    chain_of_thought: bool = False
    vote: int = 1  # K > 1: sample K replies (temperature > 0) and take the majority answer
    temperature: float = 0.7  # sampling only (vote > 1)
    top_p: float = 0.95
    seed: int = 0
    max_new_tokens: int | None = None  # default: the task's (direct) or COT_MAX_NEW_TOKENS (CoT)
    max_tiles: int | None = None  # default: the task's
    limit: int | None = None  # first N items (after circular expansion), for smoke tests
    shard: tuple[int, int] = (0, 1)
    overwrite: bool = False  # discard earlier predictions instead of resuming
    progress: bool = True

    PREDICTION_FIELDS = (
        "benchmark", "split", "model", "chain_of_thought", "vote", "temperature", "top_p", "seed",
        "max_new_tokens", "max_tiles",
    )  # fmt: skip

    def validate(self) -> EvalOptions:
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"shard must be i/n with 0 <= i < n, got {index}/{count}")
        if self.vote < 1:
            raise ConfigError(f"vote must be >= 1 samples, got {self.vote}")
        if self.vote > 1 and self.temperature <= 0:
            raise ConfigError(f"majority voting needs sampling: temperature must be > 0, got {self.temperature}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ConfigError(f"max_tiles must be >= 1, got {self.max_tiles}")
        return self

    def fingerprint(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.PREDICTION_FIELDS}

    @property
    def shard_suffix(self) -> str:
        index, count = self.shard
        return "" if count == 1 else f".shard-{index}-of-{count}"


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n)."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard must be i/n with 0 <= i < n, got {text!r}")
    return index, count


# --------------------------------------------------------------------------------------------------------
# what the model is asked


@dataclass
class Query:
    """One generation: a prompt with ``<image>``/``<video>`` placeholders, its media and decoding settings."""

    item_id: str
    sample: int
    prompt: str
    images: list[Any]
    video: str | None
    max_tiles: int
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int


class Predictor(Protocol):
    """Anything that answers queries: the engine adapter below, or a test double."""

    def __call__(self, queries: Sequence[Query]) -> list[str]: ...


def sample_seed(base: int, item_id: str, sample: int) -> int:
    """A 31-bit seed that depends on the item and the sample index only (stable across shards and batches)."""
    digest = hashlib.sha256(f"{base}/{item_id}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def answer_kind(item: EvalItem) -> AnswerKind:
    return "box" if item.task == "grounding" else item.settings.answer_kind


def queries_for(item: EvalItem, options: EvalOptions) -> list[Query]:
    """The K queries of one item (K = ``options.vote``)."""
    settings = item.settings
    max_tiles = options.max_tiles or item.max_tiles or settings.max_tiles
    if options.max_new_tokens is not None:
        max_new = options.max_new_tokens
    else:
        max_new = COT_MAX_NEW_TOKENS if options.chain_of_thought else settings.max_new_tokens
    prompt = build_prompt(item, options.chain_of_thought)
    images = item_images(item)
    sampling = options.vote > 1
    return [
        Query(
            item_id=item.id,
            sample=k,
            prompt=prompt,
            images=images,
            video=item.video,
            max_tiles=max_tiles,
            max_new_tokens=max_new,
            do_sample=sampling,
            temperature=options.temperature if sampling else 1.0,
            top_p=options.top_p if sampling else 1.0,
            seed=sample_seed(options.seed, item.id, k),
        )
        for k in range(options.vote)
    ]


def prediction_record(item: EvalItem, replies: list[str], options: EvalOptions) -> dict[str, Any]:
    """What is saved per item: raw replies and the text that gets scored (final answer / vote winner)."""
    record: dict[str, Any] = {"id": item.id, "task": item.task, "replies": replies}
    if options.vote > 1:
        choices = item.choices or None
        vote = vote_answers(replies, answer_kind(item), choices, chain_of_thought=options.chain_of_thought)
        record["prediction"] = vote.answer
        record["vote"] = {"key": vote.key, "count": vote.count, "total": vote.total, "tally": vote.tally}
    elif options.chain_of_thought:
        record["prediction"] = extract_final_answer(replies[0])
    else:
        record["prediction"] = replies[0].strip()
    return record


class EnginePredictor:
    """Answers queries with ``ivl.inference.engine.Engine``: processor → requests → batched generation.

    The K samples of one item share one processed input (tiles are computed once); every sample carries its
    own seed, so sampled replies do not depend on which other queries share the batch.
    """

    def __init__(self, engine: Any, processor: Any, stop_token_ids: list[int] | None = None) -> None:
        self.engine = engine
        self.processor = processor
        self.stop_token_ids = stop_token_ids  # None: the engine's defaults (template end-of-turn tokens)
        self.last_results: list[Any] = []

    def __call__(self, queries: Sequence[Query]) -> list[str]:
        from ivl.inference.engine import GenerationRequest

        inputs: dict[str, Any] = {}
        requests = []
        for q in queries:
            if q.item_id not in inputs:
                inputs[q.item_id] = self.processor(
                    q.prompt,
                    images=q.images or None,
                    videos=[q.video] if q.video else None,
                    max_num=q.max_tiles,
                )
            requests.append(
                GenerationRequest.from_inputs(
                    inputs[q.item_id], self.generation_config(q), request_id=f"{q.item_id}#{q.sample}"
                )
            )
        self.last_results = self.engine.generate(requests)  # kept for callers that want token ids (benchmarks)
        return [result.text.strip() for result in self.last_results]

    def generation_config(self, query: Query) -> Any:
        """Decoding settings of one query (the template's stop tokens end a reply)."""
        from ivl.inference.engine import GenerationConfig

        return GenerationConfig(
            max_new_tokens=query.max_new_tokens,
            do_sample=query.do_sample,
            temperature=query.temperature,
            top_p=query.top_p,
            seed=query.seed if query.do_sample else None,
            stop_token_ids=self.stop_token_ids,
        )


def load_engine_predictor(
    model_dir: str | Path, *, device: str = "auto", dtype: str = "auto", max_batch_size: int = 8
) -> EnginePredictor:
    """Model + processor from a checkpoint directory, wrapped for the runner.

    ``device="auto"`` picks CUDA when available; ``dtype="auto"`` is bfloat16 on CUDA and float32 on CPU.
    """
    import torch

    from ivl.inference.chat import load_for_inference
    from ivl.inference.engine import Engine

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r} (use auto, float32, bfloat16 or float16)")
    model, processor = load_for_inference(model_dir, dtype=torch_dtype, device=device)
    return EnginePredictor(Engine(model, processor, max_batch_size=max_batch_size), processor)


# --------------------------------------------------------------------------------------------------------
# predictions file (append-only JSONL, resumable)


def read_predictions(path: Path, repair: bool = False) -> dict[str, dict[str, Any]]:
    """Saved predictions by id. A torn last line (crash mid-write) is ignored, and cut off if ``repair``."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        if repair:
            with path.open("r+b") as fh:
                fh.truncate(end)
        data = data[:end]
    out: dict[str, dict[str, Any]] = {}
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: corrupt prediction line ({exc.msg}); delete it to re-run that item"
            ) from exc
        out[str(record["id"])] = record
    return out


def _check_resume(run_file: Path, options: EvalOptions, n_items: int) -> None:
    header = {"options": options.fingerprint(), "shard": list(options.shard), "items": n_items}
    if run_file.is_file() and not options.overwrite:
        saved = json.loads(run_file.read_text(encoding="utf-8"))
        diff = {
            k: (saved.get("options", {}).get(k), v)
            for k, v in header["options"].items()
            if saved.get("options", {}).get(k) != v
        }
        if saved.get("shard") != header["shard"]:
            diff["shard"] = (saved.get("shard"), header["shard"])
        if diff:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise ConfigError(
                f"{run_file.parent}: earlier predictions were made with other settings ({shown}); "
                "use another --out or --overwrite"
            )
    run_file.write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------------
# progress


class _Progress:
    """A rich progress bar with items/s and ETA; silent when disabled."""

    def __init__(self, enabled: bool, total: int, done: int, label: str) -> None:
        self.progress = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class ItemsPerSecond(ProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                if speed is None and task.elapsed:  # too few updates for rich's window: use the run's average
                    speed = (task.completed - task.fields["resumed"]) / task.elapsed
                return Text("-- items/s" if not speed else f"{speed:.2f} items/s")

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            ItemsPerSecond(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.progress.start()
        self.task = self.progress.add_task(label, total=total, completed=done, resumed=done)

    def advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# --------------------------------------------------------------------------------------------------------
# running


@dataclass
class RunStats:
    """What one call to :func:`predict` did."""

    items: int = 0
    skipped: int = 0
    queries: int = 0
    seconds: float = 0.0

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


def select_items(options: EvalOptions) -> list[EvalItem]:
    """All items of the benchmark (after ``limit``), before sharding."""
    items = load_benchmark(options.benchmark, split=options.split)
    return items[: options.limit] if options.limit is not None else items


def shard_items(items: Sequence[EvalItem], shard: tuple[int, int]) -> list[EvalItem]:
    index, count = shard
    return list(items[index::count])


def _batches(items: Sequence[EvalItem], size: int) -> Iterator[Sequence[EvalItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict(predictor: Predictor, options: EvalOptions, items: Sequence[EvalItem] | None = None) -> RunStats:
    """Generate and save predictions for this shard's unfinished items; returns counts and timing."""
    options.validate()
    out = Path(options.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = shard_items(items if items is not None else select_items(options), options.shard)
    pred_file = out / f"predictions{options.shard_suffix}.jsonl"
    _check_resume(out / f"run{options.shard_suffix}.json", options, len(mine))
    if options.overwrite and pred_file.exists():
        pred_file.unlink()
    done = read_predictions(pred_file, repair=True)
    todo = [it for it in mine if it.id not in done]
    stats = RunStats(skipped=len(mine) - len(todo))
    label = f"eval {Path(options.benchmark.split('=')[-1]).name}" + (
        f" [{options.shard[0]}/{options.shard[1]}]" if options.shard[1] > 1 else ""
    )
    bar = _Progress(options.progress and bool(todo), len(mine), stats.skipped, label)
    start = time.perf_counter()
    try:
        with pred_file.open("a", encoding="utf-8") as fh:
            for batch in _batches(todo, options.batch_size):
                queries = [q for item in batch for q in queries_for(item, options)]
                replies = predictor(queries)
                if len(replies) != len(queries):
                    raise DataError(f"predictor returned {len(replies)} replies for {len(queries)} queries")
                for i, item in enumerate(batch):
                    mine_replies = [str(r) for r in replies[i * options.vote : (i + 1) * options.vote]]
                    fh.write(json.dumps(prediction_record(item, mine_replies, options), ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                stats.items += len(batch)
                stats.queries += len(queries)
                bar.advance(len(batch))
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - start
    return stats


# --------------------------------------------------------------------------------------------------------
# scoring


def effective_settings(item: EvalItem, options: EvalOptions | None) -> dict[str, Any]:
    """The task's settings as this run used them (command-line overrides and CoT budget applied)."""
    described = item.settings.describe()
    if item.max_tiles is not None:
        described["max_tiles"] = item.max_tiles
    if options is None:
        return described
    if options.max_tiles is not None:
        described["max_tiles"] = options.max_tiles
    if options.max_new_tokens is not None:
        described["max_new_tokens"] = options.max_new_tokens
    elif options.chain_of_thought:
        described["max_new_tokens"] = COT_MAX_NEW_TOKENS
    if options.chain_of_thought:
        described["prompt_suffix"] = "(chain of thought) " + (
            COT_MC if described["answer_kind"] == "letter" else COT_OPEN
        )
    return described


def score_predictions(
    items: Sequence[EvalItem], predictions: dict[str, dict[str, Any]], options: EvalOptions | None = None
) -> dict[str, Any]:
    """Score every item; per task: the metric's aggregate, per-category aggregates and the per-item records."""
    missing = [it.id for it in items if it.id not in predictions]
    if missing:
        raise DataError(f"{len(missing)} item(s) have no prediction yet (e.g. {missing[:3]}); run or merge first")
    by_task: dict[str, list[dict[str, Any]]] = {}
    metric_of: dict[str, str] = {}
    settings: dict[str, dict[str, Any]] = {}
    for item in items:
        pred = predictions[item.id]
        ref = item.reference()
        metric = get_metric(item.settings.metric)
        scored = metric.score_item(str(pred.get("prediction", "")), ref)
        record = {
            "id": item.id,
            "task": item.task,
            "category": item.category,
            "group": ref["group"],
            "rotation": item.rotation,
            "answers": item.answers,
            "prediction": pred.get("prediction", ""),
            "replies": pred.get("replies", []),
            **({"vote": pred["vote"]} if "vote" in pred else {}),
            **scored,
        }
        by_task.setdefault(item.task, []).append(record)
        metric_of[item.task] = item.settings.metric
        settings[item.task] = effective_settings(item, options)
    scores, per_category, primary = {}, {}, {}
    for task, records in by_task.items():
        metric = get_metric(metric_of[task])
        scores[task] = metric.aggregate(records)
        scores[task]["n"] = len(records)
        primary[task] = {"metric": metric.primary, "value": scores[task][metric.primary]}
        cats = aggregate_by(records, metric)
        if len(cats) > 1 or (cats and task not in cats):
            per_category[task] = cats
    results: dict[str, Any] = {
        "benchmark": options.benchmark if options else None,
        "model": options.model if options else None,
        "options": dataclasses.asdict(options) if options else None,
        "settings": settings,
        "num_items": len(items),
        "scores": scores,
        "primary": primary,
        "per_category": per_category,
    }
    if len(primary) > 1:
        results["mean"] = sum(p["value"] for p in primary.values()) / len(primary)
    results["items"] = [r for records in by_task.values() for r in records]
    return results


def write_results(results: dict[str, Any], out_dir: str | Path) -> Path:
    """``results.json`` (atomically: temp file + rename)."""
    path = Path(out_dir) / RESULTS
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def merge_shards(options: EvalOptions, items: Sequence[EvalItem] | None = None) -> dict[str, Any]:
    """Join ``predictions.shard-*-of-n.jsonl`` into ``predictions.jsonl`` (benchmark order), score, write results."""
    out = Path(options.out_dir)
    count = options.shard[1]
    all_items = list(items) if items is not None else select_items(options)
    merged: dict[str, dict[str, Any]] = {}
    if count > 1:
        for index in range(count):
            path = out / f"predictions.shard-{index}-of-{count}.jsonl"
            if not path.is_file():
                raise DataError(f"{path}: shard {index}/{count} has not written predictions yet")
            for rid, record in read_predictions(path).items():
                if rid in merged:
                    raise DataError(f"{path}: item {rid!r} is also in another shard")
                merged[rid] = record
        ordered = [merged[it.id] for it in all_items if it.id in merged]
        tmp = out / (PREDICTIONS + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered), encoding="utf-8")
        os.replace(tmp, out / PREDICTIONS)
    else:
        merged = read_predictions(out / PREDICTIONS)
    results = score_predictions(all_items, merged, dataclasses.replace(options, shard=(0, 1)))
    write_results(results, out)
    return results


def evaluate(predictor: Predictor, options: EvalOptions) -> dict[str, Any] | None:
    """Predict (resuming) and, for an unsharded run, score and write ``results.json``. Sharded runs return None."""
    items = select_items(options)
    stats = predict(predictor, options, items)
    if options.shard[1] > 1:
        return None
    results = merge_shards(options, items)
    results["run"] = dataclasses.asdict(stats) | {"items_per_second": stats.items_per_second}
    write_results(results, options.out_dir)
    return results


# --------------------------------------------------------------------------------------------------------
# several processes


@dataclass
class LaunchPlan:
    """The command lines of a sharded run, one per process, and the device each one sees."""

    commands: list[list[str]]
    devices: list[str | None] = field(default_factory=list)


def shard_args(options: EvalOptions, *, model: str, device: str = "auto", dtype: str = "auto") -> list[str]:
    """``ivl eval`` arguments that make a child process run ``options`` (the launcher adds ``--shard``)."""
    args = ["--model", model, "--task", options.benchmark, "--out", options.out_dir, "--split", options.split]
    args += ["--batch-size", str(options.batch_size), "--vote", str(options.vote), "--seed", str(options.seed)]
    args += ["--temperature", repr(options.temperature), "--top-p", repr(options.top_p)]
    args += ["--device", device, "--dtype", dtype, "--no-progress"]
    for flag, value in (("--max-new-tokens", options.max_new_tokens), ("--max-tiles", options.max_tiles),
                        ("--limit", options.limit)):  # fmt: skip
        if value is not None:
            args += [flag, str(value)]
    if options.chain_of_thought:
        args.append("--cot")
    if options.overwrite:
        args.append("--overwrite")
    return args


def visible_gpu_count() -> int:
    """CUDA devices this process may use (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_shards(base_args: Sequence[str], processes: int, gpus: int) -> LaunchPlan:
    """``ivl eval`` command lines for ``processes`` shards; with GPUs, process i sees GPU i mod gpus only."""
    commands = [
        [sys.executable, "-m", "ivl.cli", "eval", *base_args, "--shard", f"{i}/{processes}"] for i in range(processes)
    ]
    devices = [str(i % gpus) if gpus else None for i in range(processes)]
    return LaunchPlan(commands, devices)


def launch_shards(plan: LaunchPlan, log: Callable[[str], None] = print) -> None:
    """Run the planned shard processes concurrently and fail if any fails (its exit code is named)."""
    procs = []
    for cmd, device in zip(plan.commands, plan.devices, strict=True):
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        procs.append(subprocess.Popen(cmd, env=env))
    failed = [(i, p.wait()) for i, p in enumerate(procs)]
    bad = [(i, rc) for i, rc in failed if rc != 0]
    if bad:
        raise DataError("shard process(es) failed: " + ", ".join(f"shard {i} exited {rc}" for i, rc in bad))
    log(f"{len(procs)} shard processes finished")


# --------------------------------------------------------------------------------------------------------
# report


def _prompt_note(settings: dict[str, Any]) -> str:
    if settings["prompt_template"] != "{question}":
        return repr(settings["prompt_template"]) + (
            f" + {settings['prompt_suffix']!r}" if settings["prompt_suffix"] else ""
        )
    return repr(settings["prompt_suffix"]) if settings["prompt_suffix"] else "(the benchmark's own prompt)"


def format_report(results: dict[str, Any]) -> Any:
    """A rich renderable: settings, per-task scores, per-category scores."""
    from rich.console import Group
    from rich.table import Table

    parts: list[Any] = []
    opts = results.get("options") or {}
    if opts:
        mode = "CoT" if opts.get("chain_of_thought") else "direct"
        if opts.get("vote", 1) > 1:
            mode += f" + vote@{opts['vote']} (T={opts['temperature']}, top_p={opts['top_p']}, seed={opts['seed']})"
        parts.append(
            f"[bold]model[/bold] {opts.get('model') or '-'}   [bold]benchmark[/bold] {opts.get('benchmark')}   [bold]mode[/bold] {mode}"
        )
    settings = Table(title="settings", show_lines=False)
    for col in ("task", "metric", "max tiles", "upscale", "circular", "max new tokens", "prompt suffix"):
        settings.add_column(col)
    for task, s in results["settings"].items():
        settings.add_row(
            task, s["metric"], str(s["max_tiles"]), str(s["upscale"]), str(s["circular"]), str(s["max_new_tokens"]),
            _prompt_note(s),
        )  # fmt: skip
    parts.append(settings)
    table = Table(title="scores")
    for col in ("task", "n", "metric", "score", "other"):
        table.add_column(col)
    for task, scores in results["scores"].items():
        primary = results["primary"][task]
        others = ", ".join(f"{k}={v:.4f}" for k, v in scores.items() if k not in (primary["metric"], "n"))
        table.add_row(task, str(scores["n"]), primary["metric"], f"{100 * primary['value']:.2f}", others)
    if "mean" in results:
        table.add_row("mean", "", "", f"{100 * results['mean']:.2f}", "")
    parts.append(table)
    for task, cats in results.get("per_category", {}).items():
        cat_table = Table(title=f"{task}: per category")
        cat_table.add_column("category")
        keys = list(next(iter(cats.values())).keys()) if cats else []
        for key in keys:
            cat_table.add_column(key)
        for name, values in cats.items():
            cat_table.add_row(name, *(f"{100 * values[k]:.2f}" for k in keys))
        parts.append(cat_table)
    return Group(*parts)
