"""The training data path with and without its caches, one run, the demo's world and Stage-2 mixture.

The peer arm decodes every image and video and tokenises every text piece each time a record is drawn, as the
official InternVL dataset (and our path before the caches) does. The ``cached`` arm keeps decoded media in a
`MediaCache` (``data.media_cache_mb``) and piece ids in the processor's `TokenCache`. Both arms produce the
same packs (checked here, pack for pack). Each arm first reads ``--warm`` packs (at least one epoch, so the
caches are full, as in every epoch after the first), then ``--packs`` packs are timed; arms alternate over
``--rounds`` and each arm's best round counts. Sample → pack → collate, in the main process, like the demo.

    .venv/bin/python bench/data_path.py          # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ivl.data.dataset import DatasetOptions, PackedIterable, PackedLoaderConfig, build_datasets
from ivl.data.packing import PackingConfig
from ivl.data.synthetic import generate_world
from ivl.demo import FULL, SYSTEM_MESSAGE, tokenizer_corpus, write_stage_meta
from ivl.processing.processor import Processor
from ivl.processing.token_cache import TokenCache
from ivl.processing.tokenizer import build_tokenizer, load_tokenizer


def make_stream(meta: Path, processor: Processor, cached: bool, seed: int):
    options = DatasetOptions(seed=seed, min_num_frames=8, max_num_frames=8, media_cache_bytes=(512 << 20) * cached)
    datasets = build_datasets(meta, processor, options)
    packing = PackingConfig(max_packed_tokens=1024, max_packed_tiles=128, max_buffer_size=16)
    config = PackedLoaderConfig(packing=packing, seed=seed, num_epochs=None, dummy_tile_size=processor.image_size)
    return iter(PackedIterable(datasets, config, processor.image_token_id))


def run_arm(meta: Path, tokenizer, cached: bool, warm: int, packs: int, seed: int) -> tuple[float, list, int]:
    processor = Processor(
        tokenizer, image_size=56, patch_size=7, downsample_ratio=0.25, system_message=SYSTEM_MESSAGE, max_num=1
    )
    if not cached:
        processor.token_cache = TokenCache(tokenizer, max_entries=0)
    stream = make_stream(meta, processor, cached, seed)
    samples = 0
    for _ in range(warm):
        samples += len(next(stream)["keys"])
    signature = []
    start = time.perf_counter()
    for _ in range(packs):
        batch = next(stream)
        signature.append((batch["input_ids"].sum().item(), float(batch["pixel_values"].double().sum())))
    seconds = time.perf_counter() - start
    return seconds, signature, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=300, help="train records per task")
    parser.add_argument("--warm", type=int, default=500, help="packs read before timing (fill the caches)")
    parser.add_argument("--packs", type=int, default=150, help="packs timed per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = root / "world"
        summary = generate_world(
            world, seed=0, n_train=args.n_train, n_val=0, n_test=1, image_size_range=FULL.image_size_range,
            absolute_paths=True,
        )  # fmt: skip
        build_tokenizer(
            tokenizer_corpus(world, sum(summary.counts["train"].values())), vocab_size=1024, save_dir=root / "tok"
        )
        tokenizer = load_tokenizer(root / "tok")
        meta = write_stage_meta(world, root, "stage2", FULL.tiles, FULL.mixture["stage2"])
        records = sum(n for task, n in summary.counts["train"].items() if task != "text")
        best: dict[str, float] = {}
        signatures: dict[str, list] = {}
        for r in range(args.rounds):
            for name in ("uncached", "cached"):
                seconds, signature, samples = run_arm(meta, tokenizer, name == "cached", args.warm, args.packs, seed=r)
                best[name] = min(best.get(name, float("inf")), seconds)
                signatures.setdefault(f"{name}{r}", signature)
                print(f"round {r} {name:9s} {1000 * seconds / args.packs:6.1f} ms/pack ({samples} samples warmed)")
            if signatures[f"uncached{r}"] != signatures[f"cached{r}"]:
                raise SystemExit(f"round {r}: the cached arm produced different packs")
        print(
            f"world: {records} vision train records; {args.packs} packs timed after {args.warm}, best of {args.rounds}"
        )
        ms = {name: 1000 * s / args.packs for name, s in best.items()}
        print(f"uncached {ms['uncached']:.1f} ms/pack, cached {ms['cached']:.1f} ms/pack: "
              f"{ms['uncached'] / ms['cached']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
