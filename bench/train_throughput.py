"""Training throughput: packed vs padded batches on the same mixed-length multimodal samples, one run.

All arms train the same model (same init) on exactly the same samples for one pass, with the same
optimizer, forward + backward + AdamW step. Reported per arm:

* non-pad fraction — real tokens / token slots computed. A packed row has no padding at all; we also
  report its *fill* (real tokens / (packs × max_packed_tokens)), i.e. the non-pad fraction if every pack
  were padded to the fixed budget for static shapes.
* training tokens/s — real (non-pad) tokens per second of wall time.

The pack statistics are measured on a long sample stream (steady state); the timed pass uses the first
``--timed-packs`` packs of that stream, and the very same samples for the padded arms: in sampler order
(``padded``) and sorted by length into batches (``grouped``, like transformers' ``group_by_length``, the
strongest padded peer). Arms alternate within each of ``--rounds`` rounds; each arm's best round counts.

    .venv/bin/python bench/train_throughput.py            # CPU, 1 thread, ~5 min on a busy 2-core box
    .venv/bin/python bench/train_throughput.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from ivl.config import get_preset
from ivl.data.collate import packed_collate, padded_collate
from ivl.data.packing import GreedyPacker, PackingConfig
from ivl.models.internvl import InternVL
from ivl.training.loss import weighted_cross_entropy


def bench_config(hidden: int, layers: int, image_size: int):
    config = get_preset("tiny")
    config.text.hidden_size = hidden
    config.text.num_hidden_layers = layers
    config.text.num_attention_heads = max(4, hidden // 64)
    config.text.num_key_value_heads = max(1, config.text.num_attention_heads // 4)
    config.text.intermediate_size = int(hidden * 2.75)
    config.vision.image_size = image_size
    config.force_image_size = image_size
    return config.validate()


def make_samples(n: int, config, seed: int, max_text: int, max_tiles: int) -> list[dict]:
    """Long-tailed text lengths (log-uniform 16..max_text) and 0..max_tiles tiles (40% text-only)."""
    g = torch.Generator().manual_seed(seed)
    per_tile, size = config.num_image_token, config.image_size
    tile = torch.randn(1, 3, size, size, generator=g)  # shared and expanded: no memory per sample, same compute
    out = []
    for i in range(n):
        text = int(math.exp(torch.empty(1).uniform_(math.log(16), math.log(max_text), generator=g).item()))
        tiles = (
            0 if torch.rand(1, generator=g).item() < 0.4 else int(torch.randint(1, max_tiles + 1, (1,), generator=g))
        )
        ids = torch.randint(0, 400, (text + tiles * per_tile,), generator=g)
        ids[4 : 4 + tiles * per_tile] = config.image_token_id
        labels = ids.clone()
        answer = max(1, text // 3)
        labels[: ids.numel() - answer] = -100
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "pixel_values": tile.expand(tiles, -1, -1, -1),
                "image_flags": torch.ones(tiles, dtype=torch.long),
                "num_patches_list": [tiles] if tiles else [],
                "key": i,
            }
        )
    return out


def pack(samples, cfg: PackingConfig, image_token_id: int):
    packer = GreedyPacker(cfg, image_token_id)
    packs = [p for s in samples for p in packer.add(s)]
    return packs, packer


def to_device(batch: dict, device: str, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if k == "pixel_values":
                v = v.to(dtype)
        out[k] = v
    return out


def train_pass(model, batches, packed: bool, device: str, dtype: torch.dtype) -> tuple[float, float, float]:
    """Wall seconds, process CPU seconds and mean loss of one pass (fwd + bwd + AdamW step per batch)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    for raw in batches:
        b = to_device(raw, device, dtype)
        extra = {"cu_seqlens": b["cu_seqlens"]} if packed else {"attention_mask": b["attention_mask"]}
        logits = model(
            b["input_ids"], b["pixel_values"], image_flags=b["image_flags"], position_ids=b["position_ids"], **extra
        ).logits
        loss_sum, weight_sum = weighted_cross_entropy(logits, b["targets"], b["loss_weights"])
        loss = loss_sum / weight_sum
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return wall, cpu, float(torch.stack(losses).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=112, help="tile size; tokens per tile = (S/14)²/4")
    ap.add_argument("--max-text", type=int, default=1024)
    ap.add_argument("--max-tiles", type=int, default=4)
    ap.add_argument("--max-packed-tokens", type=int, default=2048)
    ap.add_argument("--max-packed-tiles", type=int, default=24)
    ap.add_argument("--stream-samples", type=int, default=20000, help="samples for the packing statistics")
    ap.add_argument("--timed-packs", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; on a shared, oversubscribed CPU use 1: OpenMP barriers then stall the many small "
        "per-sub-sample attention calls of the packed arm and measure the neighbours, not the method",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    config = bench_config(args.hidden, args.layers, args.image_size)
    pcfg = PackingConfig(max_packed_tokens=args.max_packed_tokens, max_packed_tiles=args.max_packed_tiles)
    samples = make_samples(args.stream_samples, config, args.seed, args.max_text, args.max_tiles)
    packs, packer = pack(samples, pcfg, config.image_token_id)
    real = sum(p.num_tokens for p in packs)
    fill = real / (len(packs) * pcfg.max_packed_tokens)
    mean_len = sum(s["input_ids"].numel() for s in samples) / len(samples)

    timed = packs[: args.timed_packs]
    timed_samples = sorted((s for p in timed for s in p.samples), key=lambda s: s["key"])  # sampler order
    batch_size = max(1, round(pcfg.max_packed_tokens / mean_len))  # same expected real tokens per step
    padded = [
        padded_collate(timed_samples[i : i + batch_size], pad_token_id=0, loss_mode="square")
        for i in range(0, len(timed_samples), batch_size)
    ]
    by_length = sorted(timed_samples, key=lambda s: s["input_ids"].numel())  # HF-style group_by_length peer
    grouped = [
        padded_collate(by_length[i : i + batch_size], pad_token_id=0, loss_mode="square")
        for i in range(0, len(by_length), batch_size)
    ]
    packed = [packed_collate(p, loss_mode="square") for p in timed]
    tokens = sum(b["num_real_tokens"] for b in packed)
    assert tokens == sum(b["num_real_tokens"] for b in padded) == sum(b["num_real_tokens"] for b in grouped)
    padded_slots = sum(b["input_ids"].numel() for b in padded)
    grouped_slots = sum(b["input_ids"].numel() for b in grouped)

    torch.manual_seed(args.seed)
    model = InternVL(config).to(device=args.device, dtype=dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    train_pass(model, packed[:1], True, args.device, dtype)  # warm-up (allocator, kernels)
    train_pass(model, padded[:1], False, args.device, dtype)
    # arms alternate within every round so that load changes on a shared machine hit both alike;
    # each arm's best round is its time
    arms = {"packed": (packed, True), "padded": (padded, False), "grouped": (grouped, False)}
    times: dict[str, list[float]] = {k: [] for k in arms}
    cpu: dict[str, list[float]] = {k: [] for k in arms}
    losses: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (batches, is_packed) in arms.items():
            model.load_state_dict(state)
            seconds, cpu_seconds, losses[name] = train_pass(model, batches, is_packed, args.device, dtype)
            times[name].append(seconds)
            cpu[name].append(cpu_seconds)
    best = {k: min(v) for k, v in times.items()}

    result = {
        "device": args.device,
        "dtype": args.dtype,
        "model": f"text {args.hidden}x{args.layers}, tile {args.image_size}px ({config.num_image_token} tokens/tile)",
        "stream_samples": len(samples),
        "mean_sample_tokens": round(mean_len, 1),
        "packs": len(packs),
        "pack_fill": round(fill, 4),
        "packing_rejected": packer.stats.rejected,
        "timed_samples": len(timed_samples),
        "timed_real_tokens": tokens,
        "packed_non_pad_fraction": 1.0,
        "packed_fill_of_fixed_budget": round(
            sum(p.num_tokens for p in timed) / (len(timed) * pcfg.max_packed_tokens), 4
        ),
        "padded_batch_size": batch_size,
        "padded_non_pad_fraction": round(tokens / padded_slots, 4),
        "grouped_non_pad_fraction": round(tokens / grouped_slots, 4),
        "packed_tokens_per_s": round(tokens / best["packed"], 1),
        "padded_tokens_per_s": round(tokens / best["padded"], 1),
        "grouped_tokens_per_s": round(tokens / best["grouped"], 1),
        "speedup_packed_over_padded": round(best["padded"] / best["packed"], 3),
        "speedup_packed_over_grouped": round(best["grouped"] / best["packed"], 3),
        "speedup_over_padded_in_cpu_time": round(min(cpu["padded"]) / min(cpu["packed"]), 3),
        "round_seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "mean_loss": {k: round(v, 4) for k, v in losses.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
