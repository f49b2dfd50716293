"""Test-time scaling on a benchmark: direct answering vs chain of thought vs majority vote over K samples.

Usage: .venv/bin/python bench/eval_tts.py --model DIR --task WORLD_OR_FILE [--vote 5] [--temperature 0.7]
       [--limit N] [--max-tiles N] [--out eval_out/tts] [--device auto]

Runs the same model over the same items four ways (direct greedy; CoT greedy; direct + vote@K; CoT +
vote@K; all resumable under ``--out``) and prints one Markdown table: per task the primary score of each
mode, plus the mean over tasks and items/s. Paste it into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", required=True, help="NAME=FILE, FILE or a synthetic world directory")
    parser.add_argument("--vote", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tiles", type=int, default=None, help="override the tasks' tiles (the demo model: 1)")
    parser.add_argument("--out", default="eval_out/tts")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    from ivl.evaluation.runner import EvalOptions, evaluate, load_engine_predictor

    predictor = load_engine_predictor(
        args.model, device=args.device, dtype=args.dtype, max_batch_size=args.batch * args.vote
    )
    modes = {
        "direct": {"chain_of_thought": False, "vote": 1},
        "CoT": {"chain_of_thought": True, "vote": 1},
        f"vote@{args.vote}": {"chain_of_thought": False, "vote": args.vote},
        f"CoT + vote@{args.vote}": {"chain_of_thought": True, "vote": args.vote},
    }
    table: dict[str, dict[str, float]] = {}
    speed: dict[str, float] = {}
    for name, mode in modes.items():
        out = Path(args.out) / name.replace(" ", "").replace("+", "_").replace("@", "")
        start = time.perf_counter()
        options = EvalOptions(
            args.task,
            str(out),
            model=str(Path(args.model).resolve()),
            batch_size=args.batch,
            temperature=args.temperature,
            limit=args.limit,
            max_tiles=args.max_tiles,
            **mode,
        )
        results = evaluate(predictor, options)
        speed[name] = results["num_items"] / (time.perf_counter() - start)
        table[name] = {task: p["value"] for task, p in results["primary"].items()}
        print(f"{name}: done ({results['num_items']} items)")
    tasks = list(next(iter(table.values())))
    header = "| task | " + " | ".join(modes) + " |"
    print("\n" + header + "\n|" + "---|" * (len(modes) + 1))
    for task in tasks:
        print(f"| {task} | " + " | ".join(f"{100 * table[m][task]:.1f}" for m in modes) + " |")
    if len(tasks) > 1:
        print("| **mean** | " + " | ".join(f"{100 * sum(table[m].values()) / len(tasks):.1f}" for m in modes) + " |")
    print("| items/s | " + " | ".join(f"{speed[m]:.2f}" for m in modes) + " |")


if __name__ == "__main__":
    main()
