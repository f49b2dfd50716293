"""How many images does the demo's from-scratch InternViT need to learn a task? A direct classifier probe.

The demo's ViT learns only through the LLM's next-token loss; this trains the same InternViT (demo vision
config) with a linear head on the task's labels, no LLM in the way, and prints held-out accuracy as the images
seen grow. It bounds what the demo can learn per image (docs/benchmarks.md, "Demo").

Usage: .venv/bin/python bench/demo_vit_probe.py --world runs/demo/world --task shape [--layer-scale 0.1]
       [--patch 14] [--layers 4] [--init-std 0.02] [--steps 400] [--batch 32] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image


def load_split(world: Path, split: str, task: str, tile: int) -> tuple[torch.Tensor, list[str]]:
    from ivl.processing.tiling import dynamic_tiles, normalize_tiled

    records = [json.loads(line) for line in (world / split / f"{task}.jsonl").read_text().splitlines() if line]
    tiles = [
        dynamic_tiles(Image.open(world / split / task / r["image"]).convert("RGB"), max_num=1, image_size=tile)
        for r in records
    ]
    return normalize_tiled(tiles), [r["conversations"][1]["value"] for r in records]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", required=True)
    parser.add_argument("--task", default="shape")
    parser.add_argument("--layer-scale", type=float, default=0.1, help="InternViT layer-scale init")
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--init-std",
        type=float,
        default=0.02,
        help="N(0, std) init (ivl from scratch: 0.02, the demo ViT: 0.05); 0: torch default",
    )
    parser.add_argument("--tile", type=int, default=56)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from ivl.config import VisionConfig
    from ivl.models.internvit import InternViT

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    world = Path(args.world)
    x_train, y_train = load_split(world, "train", args.task, args.tile)
    x_test, y_test = load_split(world, "test", args.task, args.tile)
    classes = sorted(set(y_train))
    t_train = torch.tensor([classes.index(y) for y in y_train])
    t_test = torch.tensor([classes.index(y) if y in classes else -1 for y in y_test])
    config = VisionConfig(
        hidden_size=128, num_hidden_layers=args.layers, num_attention_heads=4, intermediate_size=512,
        image_size=args.tile, patch_size=args.patch, initializer_factor=args.layer_scale,
    )  # fmt: skip
    vit, head = InternViT(config), torch.nn.Linear(config.hidden_size, len(classes))
    if args.init_std > 0:
        from ivl.models.decoder import init_weights

        init_weights(vit, std=args.init_std)
    optimizer = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=args.lr)
    print(f"{args.task}: {len(classes)} classes, {len(x_train)} train / {len(x_test)} test tiles, {config}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        index = torch.randint(0, len(x_train), (args.batch,))
        loss = F.cross_entropy(head(vit(x_train[index]).mean(1)), t_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            with torch.no_grad():
                accuracy = (head(vit(x_test).mean(1)).argmax(-1) == t_test).float().mean().item()
            seen = step * args.batch
            print(f"images seen {seen:6d}  loss {loss.item():.3f}  test accuracy {accuracy:.2f}  "
                  f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
