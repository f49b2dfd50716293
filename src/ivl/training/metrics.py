"""Training telemetry: ``metrics.jsonl`` (one line per logged step), a loss-curve PNG, a rich progress bar.

Only rank 0 writes. The JSONL file is appended and flushed line by line, so a killed run keeps every line it
logged; on resume, lines from steps after the checkpoint are dropped first so the file never holds a step
twice.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"


class MetricsLog:
    """Append-only JSONL of per-step metrics."""

    def __init__(self, path: str | os.PathLike[str], enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Keep only lines whose ``step`` is ≤ ``step`` (a resume from that checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in read_metrics(self.path) if int(line.get("step", 0)) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete line of a metrics file (a torn last line from a kill is skipped)."""
    out = []
    path = Path(path)
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_loss_curve(
    metrics: list[dict[str, Any]] | str | os.PathLike[str], out_png: str | os.PathLike[str], title: str = ""
) -> Path:
    """Loss (and a moving average) against step, with lr on a second axis; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics) if not isinstance(metrics, list) else metrics
    records = [r for r in records if "loss" in r and math.isfinite(float(r["loss"]))]
    steps = [int(r["step"]) for r in records]
    losses = [float(r["loss"]) for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 5:
        window = max(2, len(losses) // 20)
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, smooth, lw=1.6, label=f"moving average ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if records and "lr" in records[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [float(r["lr"]) for r in records], color="tab:red", lw=0.8, alpha=0.6)
        ax2.set_ylabel("lr", color="tab:red")
    ax.legend(loc="upper right")
    ax.set_title(title or "training loss")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


class Throughput:
    """Tokens/s and tiles/s over the steps since the last report (wall clock)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0
        self.tiles = 0

    def add(self, tokens: int, tiles: int) -> None:
        self.tokens += tokens
        self.tiles += tiles

    def rates(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = (self.tokens / elapsed, self.tiles / elapsed)
        self.start, self.tokens, self.tiles = time.perf_counter(), 0, 0
        return out


class ProgressBar:
    """A rich progress bar showing loss, lr, tokens/s, tiles/s and ETA; a no-op when disabled."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, description: str = "train") -> None:
        self.enabled = enabled
        self._progress = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tok]} tok/s  {task.fields[tiles]} tiles/s"
            ),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task = self._progress.add_task(
            description, total=total, completed=start, loss="-", lr="-", tok="-", tiles="-"
        )
        self._progress.start()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float | None, tiles_per_s: float) -> None:
        """``tokens_per_s`` None: a run without tokens (vision pre-training) shows "-"."""
        if self._progress is None:
            return
        self._progress.update(
            self._task,
            completed=step,
            loss=f"{loss:.4f}",
            lr=f"{lr:.2e}",
            tok="-" if tokens_per_s is None else f"{tokens_per_s:,.0f}",
            tiles=f"{tiles_per_s:,.1f}",
        )

    def set_total(self, total: int) -> None:
        """A new length for the run (a time budget re-planned it)."""
        if self._progress is not None:
            self._progress.update(self._task, total=total)

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
