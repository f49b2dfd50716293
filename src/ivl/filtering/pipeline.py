"""Streaming filter run: JSONL in → ``kept`` / ``rejected`` / ``review`` JSONL out, resumable and sharded.

Guarantees: every input line lands in exactly one output (kept lines byte-identical; rejected and review
lines wrap the original text with the filter, score and reason). Outputs are append-only; after each chunk
they are fsynced and only then ``progress.json`` records their sizes and the input offset, so a run killed
at any instant resumes by truncating to the last commit and re-reading from its offset.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import multiprocessing
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ivl.errors import ConfigError, DataError
from ivl.filtering.config import FilterConfig, InputSpec, ScorerConfig
from ivl.filtering.rules import Flag, RecordParseError, Rule, Sample, parse_line
from ivl.filtering.scoring import LLMRule, OpenAIScorer, PromptLibrary, Scorer, ScoringError, guess_domain

Status = Literal["kept", "rejected", "review"]
OUTPUTS = ("kept.jsonl", "rejected.jsonl", "review.jsonl", "scores.jsonl")
PROGRESS = "progress.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------------
# per-record decisions (runs in worker processes)


def check_record(rules: list[Rule], raw: bytes, source: str, line: int, spec: InputSpec) -> tuple[Status, list[Flag]]:
    """Run the model-free chain on one line: the first rejecting rule decides; review flags accumulate."""
    try:
        sample = parse_line(raw, source, line, root=spec.media_root, domain=spec.domain)
    except RecordParseError as exc:
        return "rejected", [Flag(exc.filter, str(exc))]
    flags: list[Flag] = []
    for rule in rules:
        if rule.name in spec.skip_rules:
            continue
        try:
            flag = rule.check(sample)
        except Exception as exc:  # a rule bug must not lose the record: a person looks at it instead
            flag = Flag(rule.name, f"rule raised {type(exc).__name__}: {exc}", None, "review")
        if flag is None:
            continue
        if flag.action == "reject":
            return "rejected", [flag, *flags]
        flags.append(flag)
    return ("review" if flags else "kept"), flags


_WORKER: dict[str, Any] = {}


def _init_worker(rules: list[Rule], inputs: list[InputSpec]) -> None:
    _WORKER["rules"], _WORKER["inputs"] = rules, inputs


def _check_chunk_in_worker(file_index: int, first_line: int, lines: list[bytes]) -> list[tuple[Status, list[Flag]]]:
    spec = _WORKER["inputs"][file_index]
    return [check_record(_WORKER["rules"], raw, spec.path, first_line + i, spec) for i, raw in enumerate(lines)]


# --------------------------------------------------------------------------------------------------------
# input reading


@dataclass
class Chunk:
    """Consecutive lines of one input file and the offset just after them (the resume point)."""

    file_index: int
    first_line: int
    lines: list[bytes]
    end_offset: int

    @property
    def nbytes(self) -> int:
        return sum(len(x) for x in self.lines)


def _align(fh: Any, pos: int, size: int) -> int:
    """Offset of the first line that starts at or after ``pos`` (a shard owns the lines starting in it)."""
    if pos <= 0:
        return 0
    if pos >= size:
        return size
    fh.seek(pos - 1)
    fh.readline()
    return fh.tell()


def shard_range(path: str, index: int, count: int) -> tuple[int, int]:
    """Byte range [start, end) of a file owned by shard ``index`` of ``count``, cut at line starts."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        return _align(fh, size * index // count, size), _align(fh, size * (index + 1) // count, size)


def _count_newlines(path: str, end: int) -> int:
    count, left = 0, end
    with open(path, "rb") as fh:
        while left > 0:
            block = fh.read(min(left, 1 << 20))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


def _read_chunks(file_index: int, path: str, start: int, end: int, first_line: int, size: int) -> Iterator[Chunk]:
    with open(path, "rb") as fh:
        fh.seek(start)
        offset, line, lines = start, first_line, []
        while offset < end:
            raw = fh.readline()
            if not raw:
                break
            lines.append(raw)
            offset += len(raw)
            if len(lines) >= size:
                yield Chunk(file_index, line, lines, offset)
                line, lines = line + len(lines), []
        if lines:
            yield Chunk(file_index, line, lines, offset)


# --------------------------------------------------------------------------------------------------------
# run state and tallies


@dataclass
class Tally:
    """Counters of a run (and, summed, of many shards)."""

    records: int = 0
    kept: int = 0
    rejected: int = 0
    review: int = 0
    by_filter: dict[str, dict[str, int]] = field(default_factory=dict)
    by_input: dict[str, dict[str, int]] = field(default_factory=dict)
    llm: dict[str, dict[str, Any]] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def add(self, label: str, status: Status, flags: list[Flag]) -> None:
        self.records += 1
        setattr(self, status, getattr(self, status) + 1)
        per_input = self.by_input.setdefault(label, {"records": 0, "kept": 0, "rejected": 0, "review": 0})
        per_input["records"] += 1
        per_input[status] += 1
        if status == "rejected":
            self._filter(flags[0].filter)["rejected"] += 1
        elif status == "review":
            for name in dict.fromkeys(f.filter for f in flags):
                self._filter(name)["review"] += 1

    def _filter(self, name: str) -> dict[str, int]:
        return self.by_filter.setdefault(name, {"rejected": 0, "review": 0})

    def add_score(self, rule: str, score: float | None, failed: bool = False) -> None:
        entry = self.llm.setdefault(
            rule, {"scored": 0, "unparsable": 0, "failed": 0, "score_sum": 0.0, "histogram": [0] * 11}
        )
        if failed:
            entry["failed"] += 1
        elif score is None:
            entry["unparsable"] += 1
        else:
            entry["scored"] += 1
            entry["score_sum"] += score
            entry["histogram"][min(10, max(0, int(score)))] += 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tally:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def merge(self, other: Tally) -> None:
        for key in ("records", "kept", "rejected", "review"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        for mine, theirs in ((self.by_filter, other.by_filter), (self.by_input, other.by_input)):
            for name, counts in theirs.items():
                target = mine.setdefault(name, dict.fromkeys(counts, 0))
                for k, v in counts.items():
                    target[k] = target.get(k, 0) + v
        for name, entry in other.llm.items():
            target = self.llm.setdefault(
                name, {"scored": 0, "unparsable": 0, "failed": 0, "score_sum": 0.0, "histogram": [0] * 11}
            )
            for k in ("scored", "unparsable", "failed", "score_sum"):
                target[k] += entry.get(k, 0)
            target["histogram"] = [
                a + b for a, b in zip(target["histogram"], entry.get("histogram", [0] * 11), strict=True)
            ]
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)  # shards run side by side


@dataclass
class RunState:
    """Contents of ``progress.json``: where the next record starts and how long each output was then."""

    fingerprint: str
    inputs: list[dict[str, Any]]
    file_index: int = 0
    offset: int | None = None  # None: start of this file's shard range
    line: int | None = None
    outputs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTPUTS, 0))
    tally: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    version: int = FORMAT_VERSION


def _input_identity(spec: InputSpec) -> dict[str, Any]:
    try:
        st = os.stat(spec.path)
    except FileNotFoundError as exc:
        raise DataError(f"input {spec.path!r} not found") from exc
    return {"path": spec.path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _prepare_output(config: FilterConfig, restart: bool) -> RunState:
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = out / PROGRESS
    if restart:
        for name in (*OUTPUTS, PROGRESS, SUMMARY_JSON, SUMMARY_MD):
            (out / name).unlink(missing_ok=True)
    identity = [_input_identity(s) for s in config.inputs]
    fingerprint = config.fingerprint()
    if progress.exists():
        try:
            data = json.loads(progress.read_text(encoding="utf-8"))
            state = RunState(**data)
        except (ValueError, TypeError) as exc:
            raise DataError(f"{progress}: unreadable progress file ({exc}); rerun with restart") from exc
        if state.fingerprint != fingerprint:
            raise ConfigError(f"{out} holds a run with a different filter config; use another output_dir or restart")
        if not config.resume:
            raise ConfigError(f"{out} holds a previous run and resume is off; use restart or another output_dir")
        if state.inputs != identity:
            raise DataError(f"inputs changed since the run in {out} started (size or mtime); restart it")
        for name, size in state.outputs.items():
            path = out / name
            if not path.exists() and size:
                raise DataError(f"{path} is missing but progress says {size} bytes were committed; restart")
            with open(path, "ab") as fh:
                fh.truncate(size)  # drop what was written after the last commit
        return state
    leftovers = [n for n in OUTPUTS if (out / n).exists() and (out / n).stat().st_size]
    if leftovers:
        raise ConfigError(f"{out} already holds {leftovers} without {PROGRESS}; use restart or another output_dir")
    for name in OUTPUTS:
        (out / name).write_bytes(b"")
    state = RunState(fingerprint=fingerprint, inputs=identity)
    _write_json_atomic(progress, dataclasses.asdict(state))
    return state


# --------------------------------------------------------------------------------------------------------
# output records


def wrap_record(raw: bytes, source: str, line: int, flags: list[Flag]) -> bytes:
    """A rejected/review line: the original text (``record``, or ``record_base64`` if not UTF-8) plus why."""
    body = raw[:-1] if raw.endswith(b"\n") else raw
    try:
        original: dict[str, str] = {"record": body.decode("utf-8")}
    except UnicodeDecodeError:
        original = {"record_base64": base64.b64encode(body).decode("ascii")}
    first = flags[0]
    out = {
        **original,
        "source": source,
        "line": line,
        "filter": first.filter,
        "score": first.score,
        "reason": first.reason,
        "flags": [f.to_dict() for f in flags],
    }
    return json.dumps(out, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n"


def unwrap_record(line: bytes | str) -> bytes:
    """The original input line (with its newline) from a rejected/review line: inverse of :func:`wrap_record`."""
    obj = json.loads(line)
    body = obj["record"].encode("utf-8") if "record" in obj else base64.b64decode(obj["record_base64"])
    return body + b"\n"


# --------------------------------------------------------------------------------------------------------
# scorers


def build_scorer(config: ScorerConfig) -> Scorer:
    """The scorer a config names: an OpenAI-compatible endpoint, or an ivl checkpoint run locally."""
    if config.kind == "openai":
        return OpenAIScorer(
            base_url=config.base_url,
            model=config.model,
            api_key=os.environ.get(config.api_key_env) if config.api_key_env else None,
            concurrency=config.concurrency,
            rate_limit=config.rate_limit,
            max_retries=config.max_retries,
            backoff_s=config.backoff_s,
            timeout_s=config.timeout_s,
            max_tokens=config.max_tokens,
            temperature=config.temperature,
        )
    from ivl.filtering.scoring import local_scorer

    return local_scorer(config.checkpoint or "", max_new_tokens=config.max_tokens, batch_size=config.batch_size)


class _LLMStage:
    """Scores the chain's survivors of one chunk with every enabled LLM rule, in chain order."""

    def __init__(
        self, rules: list[LLMRule], scorer: Scorer, library: PromptLibrary, batch_size: int, on_error: str
    ) -> None:
        self.rules, self.scorer, self.library = rules, scorer, library
        self.batch_size, self.on_error = batch_size, on_error

    def _ask(self, prompts: list[str]) -> tuple[list[str | None], list[str | None]]:
        replies: list[str | None] = []
        errors: list[str | None] = []
        for i in range(0, len(prompts), self.batch_size):
            batch = prompts[i : i + self.batch_size]
            try:
                got = self.scorer.score_batch(batch)
            except ScoringError as exc:
                if self.on_error == "stop":
                    raise
                replies += exc.replies
                errors += exc.errors
                continue
            if len(got) != len(batch):
                raise ScoringError(
                    f"scorer returned {len(got)} replies for {len(batch)} prompts",
                    [None] * len(batch),
                    ["count"] * len(batch),
                )
            replies += got
            errors += [None] * len(batch)
        return replies, errors

    def run(
        self, samples: dict[int, Sample], decisions: list[tuple[Status, list[Flag]]], tally: Tally
    ) -> list[dict[str, Any]]:
        scores: list[dict[str, Any]] = []
        domains = {i: guess_domain(s) for i, s in samples.items()}
        for rule in self.rules:
            todo = [
                i
                for i, s in samples.items()
                if decisions[i][0] != "rejected" and rule.name not in _skips(s) and rule.applies(s)
            ]
            if not todo:
                continue
            prompts = [rule.prompt(samples[i], domains[i], self.library) for i in todo]
            replies, errors = self._ask(prompts)
            for i, reply, error in zip(todo, replies, errors, strict=True):
                flags = decisions[i][1]
                if error is not None or reply is None:
                    tally.add_score(rule.name, None, failed=True)
                    flag: Flag | None = Flag(rule.name, f"scoring failed: {error}", None, "review")
                    score = None
                else:
                    score, flag = rule.decide(reply, domains[i])
                    tally.add_score(rule.name, score)
                scores.append(
                    {
                        "source": samples[i].source,
                        "line": samples[i].line,
                        "filter": rule.name,
                        "domain": domains[i],
                        "score": score,
                        "reply": (reply or "")[:500],
                    }
                )
                if flag is None:
                    continue
                if flag.action == "reject":
                    decisions[i] = ("rejected", [flag, *flags])
                else:
                    decisions[i] = ("review", [*flags, flag])
        return scores


def _skips(sample: Sample) -> list[str]:
    return sample.cache.get("skip_rules", [])


# --------------------------------------------------------------------------------------------------------
# progress display


class _ProgressBar:
    """Rich bar over input bytes, showing records and records/s; silent when disabled."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.records, self.started = 0, time.perf_counter()
        self._progress = None
        if enabled:
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("filter"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[records]:,} records"),
                TextColumn("{task.fields[rate]:,.0f} records/s"),
                TimeElapsedColumn(),
            )
            self._task = self._progress.add_task("filter", total=max(total_bytes, 1), records=0, rate=0.0)
            self._progress.start()

    def advance(self, nbytes: int, records: int) -> None:
        self.records += records
        if self._progress is not None:
            rate = self.records / max(time.perf_counter() - self.started, 1e-9)
            self._progress.update(self._task, advance=nbytes, records=self.records, rate=rate)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


# --------------------------------------------------------------------------------------------------------
# the run


def run_filter(
    config: FilterConfig,
    *,
    scorer: Scorer | None = None,
    restart: bool = False,
    progress: bool = False,
    on_commit: Callable[[RunState], None] | None = None,
) -> dict[str, Any]:
    """Filter every input of ``config`` into ``config.output_dir`` and return the summary.

    ``scorer`` overrides the one the config names (any object with ``score_batch``). A run that finds a
    ``progress.json`` from the same config continues where it stopped; ``restart`` starts over.
    Outputs are appended per chunk and committed (fsync + ``progress.json``) at most every
    ``config.commit_every_s`` seconds; ``on_commit`` is called after each such commit inside a file
    (tests use it to interrupt at a known point).
    """
    config.validate()
    rules = config.build_rules()
    chain = [r for r in rules if r.stage == "rule"]
    llm_rules = [r for r in rules if isinstance(r, LLMRule)]
    stage, owned_scorer = None, None
    if llm_rules:
        if scorer is None:
            if config.scorer is None:
                raise ConfigError(f"LLM rules {[r.name for r in llm_rules]} are enabled but the config has no scorer")
            scorer = owned_scorer = build_scorer(config.scorer)
        scorer_cfg = config.scorer or ScorerConfig()
        stage = _LLMStage(
            llm_rules, scorer, PromptLibrary(config.prompts_dir), scorer_cfg.batch_size, scorer_cfg.on_error
        )

    out = Path(config.output_dir)
    state = _prepare_output(config, restart)
    tally = Tally.from_dict(state.tally) if state.tally else Tally()
    if state.done:
        return _finish(config, state, tally)

    ranges = [shard_range(s.path, config.shard_index, config.num_shards) for s in config.inputs]
    remaining = sum(
        end - (state.offset if i == state.file_index and state.offset is not None else start)
        for i, (start, end) in enumerate(ranges)
        if i >= state.file_index
    )
    pool = _start_workers(config.workers, chain, config.inputs) if config.workers > 1 else None
    bar = _ProgressBar(remaining, progress)  # after the fork: its refresh thread must not be copied
    handles = {name: open(out / name, "ab") for name in OUTPUTS}  # noqa: SIM115 - closed in finally
    session_start, elapsed_before = time.perf_counter(), tally.elapsed_s
    last_commit = session_start
    try:
        for file_index in range(state.file_index, len(config.inputs)):
            spec = config.inputs[file_index]
            start, end = ranges[file_index]
            if file_index == state.file_index and state.offset is not None:
                start, first_line = state.offset, state.line or 1
            else:
                first_line = _count_newlines(spec.path, start) + 1
            chunks = _read_chunks(file_index, spec.path, start, end, first_line, config.chunk_size)
            for chunk, decisions in _checked(chunks, chain, config.inputs, pool, config.workers):
                scores = []
                if stage is not None:
                    samples = _survivors(chunk, decisions, spec)
                    scores = stage.run(samples, decisions, tally) if samples else []
                _write_chunk(handles, chunk, decisions, spec, tally, scores if config.write_scores else [])
                state.file_index, state.offset, state.line = (
                    file_index,
                    chunk.end_offset,
                    chunk.first_line + len(chunk.lines),
                )
                bar.advance(chunk.nbytes, len(chunk.lines))
                # fsync costs milliseconds: commit at most every commit_every_s; a crash redoes the rest
                if time.perf_counter() - last_commit >= config.commit_every_s:
                    tally.elapsed_s = elapsed_before + time.perf_counter() - session_start
                    _commit(out, handles, state, tally)
                    last_commit = time.perf_counter()
                    if on_commit is not None:
                        on_commit(state)
            state.file_index, state.offset, state.line = file_index + 1, None, None
            tally.elapsed_s = elapsed_before + time.perf_counter() - session_start
            _commit(out, handles, state, tally)
        state.done = True
        tally.elapsed_s = elapsed_before + time.perf_counter() - session_start
        _commit(out, handles, state, tally)
    finally:
        bar.close()
        if owned_scorer is not None and hasattr(owned_scorer, "close"):
            owned_scorer.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for fh in handles.values():
            fh.close()
    return _finish(config, state, tally)


def _checked(
    chunks: Iterator[Chunk], chain: list[Rule], inputs: list[InputSpec], pool: Any, workers: int
) -> Iterator[tuple[Chunk, list[tuple[Status, list[Flag]]]]]:
    """Rule decisions per chunk, in input order; with a pool, a bounded number of chunks run ahead."""
    if pool is None:
        for chunk in chunks:
            spec = inputs[chunk.file_index]
            yield (
                chunk,
                [check_record(chain, raw, spec.path, chunk.first_line + i, spec) for i, raw in enumerate(chunk.lines)],
            )
        return
    pending: deque[tuple[Chunk, Any]] = deque()
    for chunk in chunks:
        pending.append((chunk, pool.submit(_check_chunk_in_worker, chunk.file_index, chunk.first_line, chunk.lines)))
        if len(pending) >= 2 * workers:
            done, future = pending.popleft()
            yield done, _result(future)
    while pending:
        done, future = pending.popleft()
        yield done, _result(future)


def _start_workers(workers: int, chain: list[Rule], inputs: list[InputSpec]) -> ProcessPoolExecutor:
    """Worker processes for the model-free rules. Fork when this process has no other thread (fast, and
    works from notebooks and stdin scripts); otherwise spawn, since forking a threaded process can deadlock."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1 else "spawn"
    context = multiprocessing.get_context(method)
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(chain, inputs))


def _result(future: Any) -> list[tuple[Status, list[Flag]]]:
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise ConfigError(
            f"filter worker processes died ({exc}); a spawned worker must be able to import the main script "
            "(run from a file, not stdin), or set workers: 1"
        ) from exc


def _survivors(chunk: Chunk, decisions: list[tuple[Status, list[Flag]]], spec: InputSpec) -> dict[int, Sample]:
    samples = {}
    for i, (status, _flags) in enumerate(decisions):
        if status != "rejected":
            sample = parse_line(
                chunk.lines[i], spec.path, chunk.first_line + i, root=spec.media_root, domain=spec.domain
            )
            sample.cache["skip_rules"] = spec.skip_rules
            samples[i] = sample
    return samples


def _write_chunk(
    handles: dict[str, Any],
    chunk: Chunk,
    decisions: list[tuple[Status, list[Flag]]],
    spec: InputSpec,
    tally: Tally,
    scores: list[dict[str, Any]],
) -> None:
    for i, (status, flags) in enumerate(decisions):
        raw = chunk.lines[i]
        if status == "kept":
            handles["kept.jsonl"].write(raw if raw.endswith(b"\n") else raw + b"\n")
        else:
            handles[f"{status}.jsonl"].write(wrap_record(raw, spec.path, chunk.first_line + i, flags))
        tally.add(spec.label, status, flags)
    for entry in scores:
        handles["scores.jsonl"].write(json.dumps(entry, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n")


def _commit(out: Path, handles: dict[str, Any], state: RunState, tally: Tally) -> None:
    for name, fh in handles.items():
        fh.flush()
        os.fsync(fh.fileno())
        state.outputs[name] = fh.tell()
    state.tally = tally.to_dict()
    _write_json_atomic(out / PROGRESS, dataclasses.asdict(state))


def _finish(config: FilterConfig, state: RunState, tally: Tally) -> dict[str, Any]:
    summary = make_summary(
        tally,
        complete=state.done,
        shards=[f"{config.shard_index}/{config.num_shards}"],
        setup=config.fingerprint(include_shard=False),
    )
    write_summary(Path(config.output_dir), summary)
    return summary


# --------------------------------------------------------------------------------------------------------
# summaries


def make_summary(tally: Tally, complete: bool, shards: list[str], setup: str) -> dict[str, Any]:
    data = tally.to_dict()
    data["records_per_s"] = tally.records / tally.elapsed_s if tally.elapsed_s > 0 else 0.0
    return {"version": FORMAT_VERSION, "complete": complete, "setup": setup, "shards": shards, **data}


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    _write_json_atomic(out / SUMMARY_JSON, summary)
    (out / SUMMARY_MD).write_text(format_summary(summary), encoding="utf-8")


def format_summary(summary: dict[str, Any]) -> str:
    """Markdown tables: totals, one row per filter, one row per input, LLM score statistics."""
    n = summary["records"] or 1
    lines = [
        f"records: {summary['records']:,}  kept: {summary['kept']:,} ({summary['kept'] / n:.1%})  "
        f"rejected: {summary['rejected']:,} ({summary['rejected'] / n:.1%})  review: {summary['review']:,} ({summary['review'] / n:.1%})  "
        f"throughput: {summary['records_per_s']:,.0f} records/s  complete: {summary['complete']}",
        "",
        "| filter | rejected | review | % of records |",
        "|---|---:|---:|---:|",
    ]
    for name, counts in sorted(summary["by_filter"].items(), key=lambda kv: -(kv[1]["rejected"] + kv[1]["review"])):
        lines.append(
            f"| {name} | {counts['rejected']:,} | {counts['review']:,} | {(counts['rejected'] + counts['review']) / n:.2%} |"
        )
    lines += ["", "| input | records | kept | rejected | review |", "|---|---:|---:|---:|---:|"]
    for name, c in summary["by_input"].items():
        lines.append(f"| {name} | {c['records']:,} | {c['kept']:,} | {c['rejected']:,} | {c['review']:,} |")
    if summary["llm"]:
        lines += ["", "| LLM rule | scored | mean | unparsable | failed |", "|---|---:|---:|---:|---:|"]
        for name, e in summary["llm"].items():
            mean = e["score_sum"] / e["scored"] if e["scored"] else float("nan")
            lines.append(f"| {name} | {e['scored']:,} | {mean:.2f} | {e['unparsable']:,} | {e['failed']:,} |")
    return "\n".join(lines) + "\n"


def merge_summaries(paths: list[str | os.PathLike[str]]) -> dict[str, Any]:
    """Combine the ``summary.json`` of independent shard runs (files or their output folders).

    Refuses summaries of different filter setups or the same shard twice (double counting).
    """
    if not paths:
        raise ConfigError("merge needs at least one summary")
    total, shards, setups, complete = Tally(), [], set(), True
    for p in paths:
        path = Path(p) / SUMMARY_JSON if Path(p).is_dir() else Path(p)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DataError(f"{path}: summary not found") from exc
        except ValueError as exc:
            raise DataError(f"{path}: not a summary JSON ({exc})") from exc
        dup = set(shards) & set(data["shards"])
        if dup:
            raise DataError(
                f"{path}: shard(s) {sorted(dup)} already merged; a shard counted twice would double its records"
            )
        shards += data["shards"]
        setups.add(data["setup"])
        complete &= bool(data["complete"])
        total.merge(Tally.from_dict(data))
    if len(setups) > 1:
        raise DataError(f"summaries come from different filter setups {sorted(setups)}; merge only shards of one job")
    return make_summary(total, complete=complete, shards=shards, setup=setups.pop())


def merge_outputs(dirs: list[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Concatenate the shard outputs (in the order given) and write the merged summary into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = merge_summaries(dirs)
    for name in OUTPUTS:
        with open(out / name, "wb") as dst:
            for d in dirs:
                src = Path(d) / name
                if src.exists():
                    with open(src, "rb") as fh:
                        shutil.copyfileobj(fh, dst)
    write_summary(out, summary)
    return summary
