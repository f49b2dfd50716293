"""Decoder parity against transformers' Qwen2 and Llama implementations (random tiny weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ivl.errors import ModelInputError
from ivl.models.decoder import CausalLM


def _hf_model(ours: CausalLM, rope_parameters: dict | None = None):
    c = ours.config
    common = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta, **(rope_parameters or {})},
    )
    if c.flavour == "qwen2":
        hf = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        hf = LlamaForCausalLM(LlamaConfig(attention_bias=c.attention_bias, mlp_bias=False, **common))
    hf.config._attn_implementation = "eager"  # an independent kernel from our SDPA
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected
    tied = {"lm_head.weight"} if c.tie_word_embeddings else set()
    assert all("rotary" in k or k in tied for k in missing), missing
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf.eval()


def _random_model(config) -> CausalLM:
    model = CausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms so that the weight-after-cast order is exercised
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        dict(flavour="qwen2", attention_bias=True),
        dict(flavour="llama", attention_bias=False),
        dict(flavour="llama", attention_bias=False, tie_word_embeddings=True),
        dict(flavour="qwen2", num_key_value_heads=4),
    ],
    ids=["qwen2", "llama", "llama-tied", "qwen2-mha"],
)
def test_logits_match_transformers(overrides, make_text):
    ours = _random_model(make_text(**overrides))
    hf = _hf_model(ours)
    ids = torch.randint(0, ours.config.vocab_size, (2, 23))
    with torch.no_grad():
        got = ours(ids).logits
        want = hf(ids).logits
    assert (got - want).abs().max() <= 1e-4


def test_tied_head_has_no_key_and_shares_embedding(make_text):
    model = CausalLM(make_text(tie_word_embeddings=True))
    assert "lm_head.weight" not in model.state_dict()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = CausalLM(make_text())
    assert "lm_head.weight" in untied.state_dict()


def test_left_padding_matches_transformers(make_text):
    ours = _random_model(make_text(flavour="qwen2"))
    hf = _hf_model(ours)
    ids = torch.randint(0, 256, (3, 17))
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[0, :5] = 0
    mask[2, :11] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        want = hf(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() <= 1e-4
    assert torch.isfinite(got).all()  # padding rows too: no NaN from empty softmax rows


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "linear", "factor": 3.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ],
    ids=["dynamic", "linear", "llama3"],
)
def test_rope_scaling_matches_transformers(scaling, make_text):
    # max_position_embeddings 32 and 48 tokens: dynamic NTK is active (beyond the trained length)
    ours = _random_model(
        make_text(flavour="llama", attention_bias=False, max_position_embeddings=32, rope_scaling=scaling)
    )
    hf = _hf_model(ours, rope_parameters=scaling)
    for length in (20, 48):
        ids = torch.randint(0, 256, (1, length))
        with torch.no_grad():
            got = ours(ids).logits
            want = hf(ids).logits
        assert (got - want).abs().max() <= 1e-4, length


def test_dynamic_rope_is_plain_within_trained_length(make_text):
    plain = _random_model(make_text(flavour="llama", attention_bias=False, max_position_embeddings=32))
    dynamic = CausalLM(
        make_text(
            flavour="llama",
            attention_bias=False,
            max_position_embeddings=32,
            rope_scaling={"type": "dynamic", "factor": 2.0},
        )
    ).eval()
    dynamic.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, dynamic(ids).logits)
        longer = torch.randint(0, 256, (1, 40))
        assert not torch.allclose(plain(longer).logits, dynamic(longer).logits)


def test_logits_to_keep_and_hidden_states(make_text):
    model = _random_model(make_text())
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(ids)
        last = model(ids, logits_to_keep=3)
    assert last.logits.shape == (2, 3, 256)
    assert torch.allclose(last.logits, full.logits[:, -3:], atol=1e-6)
    assert full.hidden_states.shape == (2, 12, 64)
    assert torch.allclose(model.lm_head(full.hidden_states), full.logits, atol=1e-6)


def test_logits_positions_give_the_full_logits_at_those_positions(make_text):
    model = _random_model(make_text())
    ids = torch.randint(0, 256, (2, 12))
    keep = torch.zeros(2, 12, dtype=torch.bool)
    keep[0, [3, 4, 11]] = True
    keep[1, 0] = True
    with torch.no_grad():
        full = model(ids).logits
        some = model(ids, logits_positions=keep).logits
        none = model(ids, logits_positions=torch.zeros_like(keep)).logits
    assert some.shape == (4, 256) and none.shape == (0, 256)
    torch.testing.assert_close(some, torch.cat([full[0, [3, 4, 11]], full[1, [0]]]), rtol=0, atol=1e-6)
    with pytest.raises(ModelInputError, match="bool mask of shape"):
        model(ids, logits_positions=keep[:, :5])
    with pytest.raises(ModelInputError, match="bool mask"):
        model(ids, logits_positions=keep.long())
    with pytest.raises(ModelInputError, match="not both"):
        model(ids, logits_to_keep=1, logits_positions=keep)


def test_no_buffers_in_state_dict(make_text):
    model = CausalLM(make_text(rope_scaling={"type": "dynamic", "factor": 2.0}))
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}
