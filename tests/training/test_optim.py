"""AdamW groups and the cosine-with-warmup schedule against transformers' reference implementation."""

from __future__ import annotations

import pytest
import torch

from ivl.config import get_preset
from ivl.errors import ConfigError
from ivl.models.internvl import InternVL
from ivl.training.optim import build_optimizer, cosine_schedule, param_groups, resolve_warmup
from ivl.training.stages import apply_freeze_plan, plan_for


@pytest.mark.parametrize(("total", "warmup"), [(100, 10), (37, 0), (5, 5), (1000, 30)])
def test_schedule_equals_transformers_cosine_with_warmup(total, warmup):
    from transformers import get_cosine_schedule_with_warmup

    def lrs(make):
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=0.5)
        sched = make(opt)
        out = []
        for _ in range(total + 1):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: cosine_schedule(o, total, warmup))
    ref = lrs(lambda o: get_cosine_schedule_with_warmup(o, warmup, total))
    assert ours == pytest.approx(ref, abs=1e-12)
    if total > warmup:
        assert ours[-1] == pytest.approx(0.0, abs=1e-12)
    if warmup:
        assert ours[0] == 0.0 and ours[warmup] == pytest.approx(0.5)


def test_warmup_ratio_rounds_up_like_transformers():
    assert resolve_warmup(5500, warmup_ratio=0.03) == 165
    assert resolve_warmup(11, warmup_ratio=0.03) == 1
    assert resolve_warmup(100, warmup_steps=7, warmup_ratio=0.5) == 7
    with pytest.raises(ConfigError):
        resolve_warmup(10, warmup_ratio=1.5)


def test_min_ratio_floors_the_cosine():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = cosine_schedule(opt, 10, 0, min_ratio=0.1)
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_no_weight_decay_on_biases_and_norms_and_only_trainable_parameters():
    model = InternVL(get_preset("tiny"))
    apply_freeze_plan(model, plan_for("stage1_5"))
    groups = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert "mlp1.1.weight" in decay and "vision_model.encoder.layers.0.attn.qkv.weight" in decay
    assert {"mlp1.0.weight", "mlp1.0.bias", "mlp1.1.bias", "vision_model.encoder.layers.0.norm1.weight"} <= no_decay
    assert not any(n.startswith("language_model.") for n in decay | no_decay)  # frozen in stage 1.5
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == expected and not decay & no_decay


def test_adamw_uses_the_official_betas_and_eps():
    model = InternVL(get_preset("tiny"))
    opt = build_optimizer(model, 4e-5, 0.01)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    with pytest.raises(ConfigError, match="learning rate"):
        build_optimizer(model, 0.0)


def test_the_fused_adamw_steps_like_the_reference_implementation():
    """build_optimizer picks torch's fused kernel for plain parameters; it must step like the single-tensor
    AdamW (decay and no-decay groups, bias correction) up to float rounding."""
    torch.manual_seed(0)
    model = InternVL(get_preset("tiny"))
    twin = InternVL(get_preset("tiny"))
    twin.load_state_dict(model.state_dict())
    fused = build_optimizer(model, 1e-2, 0.1)
    assert fused.defaults["fused"] is True
    reference = torch.optim.AdamW(param_groups(twin, 0.1), lr=1e-2, foreach=False)
    pairs = list(zip(model.parameters(), twin.parameters(), strict=True))
    start = [a.detach().clone() for a, _ in pairs]
    for step in range(5):
        for a, b in pairs:
            grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(step * 1000 + a.numel() % 997))
            a.grad, b.grad = grad.clone(), grad.clone()
        fused.step()
        reference.step()
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in pairs)
    assert all(float((a.detach() - a0).abs().max()) > 1e-3 for (a, _), a0 in zip(pairs, start, strict=True))


def test_adamw_takes_plain_parameter_lists_and_groups():
    from ivl.training.optim import adamw

    layer = torch.nn.Linear(3, 2)
    assert adamw(layer.parameters(), lr=1e-3).defaults["fused"] is True
    assert adamw([{"params": [layer.weight]}, {"params": [layer.bias], "weight_decay": 0.0}], lr=1e-3).defaults["fused"]
