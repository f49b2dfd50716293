"""Proof, after a stage has run, that its freeze plan held: every frozen weight is bit-identical to the start.

Mono-InternVL's promise (no forgetting) rests on this: the EViP stages S1.1/S1.2 train only the patch
embedding, ``mlp1`` and the visual experts, so text-only outputs must not move by a single bit. The check
compares two checkpoints on disk (the stage's input and output), so it covers the trainer, the optimizer
(weight decay on frozen tensors would break it) and the checkpoint writer together.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ivl.training.stages import FreezePlan, apply_freeze_plan, output_embedding


def frozen_weights_report(
    before: str | Path,
    after: str | Path,
    plan: FreezePlan,
    *,
    reinitialised_output_rows: Sequence[int] = (),
    text_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Compare the weights ``plan`` freezes between checkpoints ``before`` and ``after``.

    Returns ``{"frozen_tensors", "changed": [names], "text_logits_identical"}``; the last is filled when
    ``text_ids`` is given and the plan freezes the whole language path (``llm=False`` with no attention or
    norm patterns), comparing text-only logits of the two models column by column, except the columns of
    ``reinitialised_output_rows`` (new-token output rows the recipe resets at the stage's start).
    """
    from ivl.models.internvl import InternVL

    start = InternVL.from_pretrained(before, dtype=torch.float32).eval()
    end = InternVL.from_pretrained(after, dtype=torch.float32).eval()
    apply_freeze_plan(end, plan)
    start_params = dict(start.named_parameters())
    head = output_embedding(end).weight
    skip = sorted({int(r) for r in reinitialised_output_rows})
    keep = torch.ones(head.shape[0], dtype=torch.bool)
    keep[skip] = False
    frozen, changed = 0, []
    for name, param in end.named_parameters():
        if param.requires_grad:
            continue
        frozen += 1
        old, new = start_params[name].detach(), param.detach()
        if param is head and skip:
            old, new = old[keep], new[keep]
        if not torch.equal(old, new):
            changed.append(name)
    report: dict[str, Any] = {"frozen_tensors": frozen, "changed": changed, "text_logits_identical": None}
    language_frozen = not plan.llm and all(p == "mlp_visual" for p in plan.llm_patterns)
    if text_ids is not None and language_frozen:
        ids = torch.tensor([list(text_ids)])
        with torch.no_grad():
            a = start(input_ids=ids).logits[..., keep]
            b = end(input_ids=ids).logits[..., keep]
        report["text_logits_identical"] = bool(torch.equal(a, b))
    return report
