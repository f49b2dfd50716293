"""Checkpoint loading vs transformers' from_pretrained (same sharded HF checkpoint, same run): time and peak RSS.

Usage: .venv/bin/python bench/bench_checkpoint.py [--layers 16] [--hidden 1024] [--repeats 3]

Writes one random bf16 InternVL checkpoint with transformers' save_pretrained (200 MB shards), then loads it
in fresh subprocesses, alternating ours (``ivl.checkpoint.io.load_model``) and transformers'
``InternVLForConditionalGeneration.from_pretrained``. Each child reports the wall time of the load alone
(imports excluded) and its peak RSS growth (``VmHWM``) over the load plus one pass reading every weight, so
that lazily mmapped weights are counted too. Prints medians
and the ratios ours / transformers (< 1: we are faster / lighter). Also times ours converting the checkpoint
to the official layout and back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHILD = r"""
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
kind, path = sys.argv[1], sys.argv[2]
if kind == "ours":
    from ivl.checkpoint.io import load_model
    load = lambda: load_model(path)
else:
    from transformers import InternVLForConditionalGeneration
    load = lambda: InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
def hwm_kib():  # peak RSS of this process image (VmHWM resets at exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
torch.set_num_threads(2)
before = hwm_kib()
start = time.perf_counter()
model = load()
seconds = time.perf_counter() - start
params = sum(p.numel() for p in model.parameters())
checksum = 0.0  # touch every weight (lazily mmapped ones count too), in small chunks to add no peak of its own
for p in model.parameters():
    for chunk in p.detach().reshape(-1).split(1 << 16):
        checksum += float(chunk.double().abs().sum())
after = hwm_kib()
print(json.dumps({"seconds": seconds, "rss_mb": (after - before) / 1024, "params": params, "sum": checksum}))
"""


def _build(path: Path, layers: int, hidden: int) -> int:
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    vision = InternVLVisionConfig(
        hidden_size=1024, num_hidden_layers=max(2, layers // 2), num_attention_heads=16, intermediate_size=4096,
        attention_bias=True, image_size=448, patch_size=14,
    )  # fmt: skip
    text = Qwen2Config(
        vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256), intermediate_size=hidden * 11 // 4, tie_word_embeddings=False,
    )  # fmt: skip
    config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=31990, image_seq_length=256, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.save_pretrained(path, max_shard_size="200MB")
    return sum(p.numel() for p in model.parameters())


def _child(kind: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as tmp:
        path = Path(tmp) / "hf"
        params = _build(path, args.layers, args.hidden)
        size_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
        shards = len(list(path.glob("*.safetensors")))
        print(f"checkpoint: {params / 1e6:.0f} M params, bf16, {size_mb:.0f} MiB in {shards} shards")
        results: dict[str, list[dict]] = {"ours": [], "transformers": []}
        for _ in range(args.repeats):
            for kind in ("ours", "transformers"):
                results[kind].append(_child(kind, path))
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "rss_mb")} for k, v in results.items()}
        assert results["ours"][0]["params"] == results["transformers"][0]["params"]
        sums = results["ours"][0]["sum"], results["transformers"][0]["sum"]
        assert abs(sums[0] - sums[1]) <= 1e-9 * abs(sums[1]), sums  # same weights
        for kind, values in med.items():
            print(f"{kind:>12}: load {values['seconds']:.2f} s, peak RSS growth {values['rss_mb']:.0f} MiB")
        print(
            f"ratio ours/transformers: time {med['ours']['seconds'] / med['transformers']['seconds']:.2f}, "
            f"peak RSS {med['ours']['rss_mb'] / med['transformers']['rss_mb']:.2f} "
            f"(checkpoint is {size_mb:.0f} MiB; 1.0x of it = weights held once)"
        )

        from ivl.checkpoint.io import convert_checkpoint

        start = time.perf_counter()
        convert_checkpoint(path, Path(tmp) / "official", "official")
        convert_checkpoint(Path(tmp) / "official", Path(tmp) / "back", "hf")
        seconds = time.perf_counter() - start
        print(f"convert hf -> official -> hf: {seconds:.2f} s ({2 * size_mb / seconds:.0f} MiB/s)")


if __name__ == "__main__":
    main()
