"""Evaluation throughput: ``ivl eval``'s batched runner vs the VLMEvalKit way (one item at a time through
transformers' ``generate``), same weights, same benchmark, same token budget, same run.

Usage: .venv/bin/python bench/eval_throughput.py [--items 32] [--batch 8] [--new-tokens 16] [--device cpu]

Builds a small random InternVL (448 px tiles, 256 tokens per tile), saves it in the transformers-native
layout, draws a synthetic benchmark (``ivl synth``: colour/count/shape questions, 1-6 tiles per image), then
times end to end per item (image decode + tiling + tokenisation + generation):

* **ours**: ``ivl.evaluation.runner.evaluate`` with the engine, ``--batch`` items per call;
* **ours, batch 1**: the same runner one item at a time (what batching buys);
* **peer**: ``InternVLForConditionalGeneration.generate`` item by item on the same inputs (VLMEvalKit's
  loop), greedy.

Every reply is exactly ``--new-tokens`` tokens long on both sides (stop tokens disabled), so the work is equal.
Prints items/s and the ratios; also the fraction of items whose greedy tokens agree with the peer's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_checkpoint(path: Path) -> None:
    import torch

    from ivl.config import InternVLConfig, TextConfig, VisionConfig
    from ivl.models.internvl import InternVL
    from ivl.processing.tokenizer import build_tokenizer

    vocab = 2048
    vision = VisionConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768)
    text = TextConfig(
        flavour="qwen2", vocab_size=vocab, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=1408, rope_theta=1e6, max_position_embeddings=8192,
        eos_token_id=vocab - 10, pad_token_id=vocab - 12,
    )  # fmt: skip
    config = InternVLConfig(vision=vision, text=text, image_token_id=vocab - 7, name="bench").validate()
    torch.manual_seed(0)
    model = InternVL(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # wider weights than the init, so greedy replies vary
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(path, layout="hf")
    build_tokenizer(vocab_size=vocab, save_dir=path)


class FixedLength:
    """Engine predictor wrapper: stop tokens disabled so every reply has exactly max_new_tokens tokens."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        predictor.stop_token_ids = []
        self.token_ids: dict[str, list[int]] = {}

    def __call__(self, queries):
        replies = self.predictor(queries)
        for query, result in zip(queries, self.predictor.last_results, strict=True):
            self.token_ids[query.item_id] = result.token_ids
        return replies


def peer_loop(items, model_dir: Path, processor, new_tokens: int, device: str) -> tuple[float, dict[str, list[int]]]:
    """VLMEvalKit-style: one item at a time through transformers' generate (greedy)."""
    import torch
    from transformers import InternVLForConditionalGeneration

    from ivl.evaluation.tasks import build_prompt, item_images

    model = InternVLForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
    out: dict[str, list[int]] = {}
    start = time.perf_counter()
    for item in items:
        inputs = processor(build_prompt(item), images=item_images(item), max_num=item.max_tiles or 6)
        with torch.inference_mode():
            ids = model.generate(
                input_ids=inputs["input_ids"].to(device),
                attention_mask=inputs["attention_mask"].to(device),
                pixel_values=inputs["pixel_values"].to(device),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        out[item.id] = ids[0, inputs["input_ids"].shape[1] :].tolist()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from ivl.data.synthetic import generate_world
    from ivl.evaluation.runner import EvalOptions, evaluate, load_engine_predictor, select_items
    from ivl.evaluation.tasks import build_prompt, item_images

    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        root = Path(tmp)
        build_checkpoint(root / "model")
        per_task = -(-args.items // 3)
        generate_world(root / "world", seed=0, n_train=0, n_val=0, n_test=per_task, tasks=["colour", "count", "shape"])

        def options(out: str, batch: int) -> EvalOptions:
            return EvalOptions(str(root / "world"), str(root / out), batch_size=batch, limit=args.items,
                               max_new_tokens=args.new_tokens, progress=False)  # fmt: skip

        items = select_items(options("x", 1))
        ours = FixedLength(load_engine_predictor(root / "model", device=args.device, dtype="float32",
                                                 max_batch_size=args.batch))  # fmt: skip
        processor = ours.predictor.processor
        tiles = [
            processor(build_prompt(it), images=item_images(it), max_num=it.max_tiles or 6)["pixel_values"].shape[0]
            for it in items
        ]
        print(f"{len(items)} items, {sum(tiles) / len(tiles):.1f} tiles/item on average, {args.new_tokens} new tokens "
              f"each, device {args.device}, {args.threads} threads")  # fmt: skip
        warmup = options("warmup", args.batch)
        warmup.limit = 2
        evaluate(ours, warmup)

        timings: dict[str, float] = {}
        start = time.perf_counter()
        evaluate(ours, options("batched", args.batch))
        timings[f"ours (batch {args.batch})"] = time.perf_counter() - start
        batched_tokens = dict(ours.token_ids)
        start = time.perf_counter()
        evaluate(ours, options("single", 1))
        timings["ours (batch 1)"] = time.perf_counter() - start
        seconds, peer_tokens = peer_loop(items, root / "model", processor, args.new_tokens, args.device)
        timings["transformers generate, 1 by 1"] = seconds

        same_single = sum(ours.token_ids[it.id] == peer_tokens[it.id] for it in items)
        same_batched = sum(batched_tokens[it.id] == peer_tokens[it.id] for it in items)
        peer = timings["transformers generate, 1 by 1"]
        for name, secs in timings.items():
            print(f"{name:>32}: {secs:7.2f} s  {len(items) / secs:6.2f} items/s  ratio vs peer {peer / secs:5.2f}x")
        print(
            f"greedy token ids identical to the peer's (fp32): batch 1 {same_single}/{len(items)}, "
            f"batch {args.batch} {same_batched}/{len(items)} items"
        )


if __name__ == "__main__":
    main()
