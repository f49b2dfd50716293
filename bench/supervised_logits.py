"""Training loss from the supervised positions' logits only vs from the full logits, one run, same model.

The trainer (``ivl.training.trainer.micro_batch_loss``) asks the model for logits only where a target is
supervised; the peer arm is the usual full ``[T, V]`` logits followed by a masked cross-entropy (what the
official InternVL and transformers' ``ForCausalLMLoss`` do). Both arms run forward + backward on the same
packed batch; arms alternate over ``--rounds`` and each arm's best round counts. Also printed: the size of
the float32 logits each arm materialises (the memory that decides the largest pack that fits).

    .venv/bin/python bench/supervised_logits.py                            # the demo's model and packs
    .venv/bin/python bench/supervised_logits.py --vocab 151674 --hidden 256 --tokens 2048   # a Qwen2.5 vocabulary
"""

from __future__ import annotations

import argparse
import time

import torch

from ivl.config import get_preset
from ivl.models.internvl import InternVL
from ivl.training.loss import loss_weights, weighted_cross_entropy
from ivl.training.trainer import micro_batch_loss


def packed_batch(config, tokens: int, sample_len: int, answer_len: int, seed: int) -> dict:
    """Text-only packs of ``sample_len``-token samples whose last ``answer_len`` targets are supervised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.text.vocab_size - 8, (1, tokens), generator=g)
    starts = list(range(0, tokens, sample_len))
    cu = torch.tensor([*starts, tokens], dtype=torch.int32)
    targets = torch.full((1, tokens), -100)
    for start, end in zip(starts, [*starts[1:], tokens], strict=True):
        first = max(start, end - 1 - answer_len)
        targets[0, first : end - 1] = ids[0, first + 1 : end]
    positions = torch.cat([torch.arange(e - s) for s, e in zip(starts, [*starts[1:], tokens], strict=True)])[None]
    return {
        "input_ids": ids, "targets": targets, "loss_weights": loss_weights(targets, "square", cu),
        "position_ids": positions, "cu_seqlens": cu, "pixel_values": None, "num_real_tokens": tokens,
    }  # fmt: skip


def full_logits_step(model, batch) -> None:
    out = model(batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"])
    weighted_cross_entropy(out.logits, batch["targets"], batch["loss_weights"])[0].backward()


def supervised_logits_step(model, batch) -> None:
    micro_batch_loss(model, batch, torch.device("cpu"))[0].backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per pack")
    parser.add_argument("--sample-len", type=int, default=48, help="tokens per packed sample (the demo's ~48)")
    parser.add_argument("--answer-len", type=int, default=4, help="supervised targets per sample")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = get_preset("tiny")
    config.text.hidden_size, config.text.num_hidden_layers = args.hidden, args.layers
    config.text.num_attention_heads, config.text.num_key_value_heads = 4, 2
    config.text.intermediate_size, config.text.vocab_size = 3 * args.hidden, args.vocab
    config.image_token_id = args.vocab - 7
    torch.manual_seed(0)
    model = InternVL(config.validate())
    batch = packed_batch(model.config, args.tokens, args.sample_len, args.answer_len, seed=0)
    supervised = int((batch["targets"] != -100).sum())
    arms = {"full logits (peer)": full_logits_step, "supervised logits (ivl)": supervised_logits_step}
    best = {name: float("inf") for name in arms}
    for _ in range(args.rounds):
        for name, step in arms.items():
            step(model, batch)  # warm-up
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            for _ in range(args.steps):
                step(model, batch)
                model.zero_grad(set_to_none=True)
            best[name] = min(best[name], (time.perf_counter() - started) / args.steps)
    print(f"pack {args.tokens} tokens, {supervised} supervised ({supervised / args.tokens:.0%}); vocab {args.vocab}, "
          f"hidden {args.hidden}, {args.layers} layers, {args.threads} threads")  # fmt: skip
    rows = {"full logits (peer)": args.tokens, "supervised logits (ivl)": supervised}
    for name in arms:
        mib = rows[name] * args.vocab * 4 / 2**20
        print(f"{name:26s} {best[name] * 1000:8.1f} ms per fwd+bwd   float32 logits {mib:9.1f} MiB")
    print(f"speed-up: {best['full logits (peer)'] / best['supervised logits (ivl)']:.2f}x")


if __name__ == "__main__":
    main()
