"""InternLM2 flavour: our decoder equals a hand-written InternLM2 forward over the official packed ``wqkv``.

The reference is written here from the spec (§3.3 / mono §5.2): wqkv rows are kv-group major, each group
holding g query heads, then the key head, then the value head.
"""

from __future__ import annotations

import math

import torch

from ivl.models.decoder import CausalLM


def _pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    hidden = q.shape[1]
    g = q.shape[0] // (kv_heads * head_dim)
    groups = torch.cat(
        [
            q.view(kv_heads, g, head_dim, hidden),
            k.view(kv_heads, 1, head_dim, hidden),
            v.view(kv_heads, 1, head_dim, hidden),
        ],
        dim=1,
    )
    return groups.reshape(kv_heads * (g + 2) * head_dim, hidden)


def _official_weights(model: CausalLM) -> dict[str, torch.Tensor]:
    c = model.config
    sd = model.state_dict()
    out = {"tok_embeddings": sd["model.embed_tokens.weight"], "norm": sd["model.norm.weight"]}
    out["output"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out[f"{i}.wqkv"] = _pack_wqkv(
            sd[p + "self_attn.q_proj.weight"],
            sd[p + "self_attn.k_proj.weight"],
            sd[p + "self_attn.v_proj.weight"],
            c.num_key_value_heads,
            c.resolved_head_dim,
        )
        out[f"{i}.wo"] = sd[p + "self_attn.o_proj.weight"]
        out[f"{i}.w1"] = sd[p + "mlp.gate_proj.weight"]
        out[f"{i}.w3"] = sd[p + "mlp.up_proj.weight"]
        out[f"{i}.w2"] = sd[p + "mlp.down_proj.weight"]
        out[f"{i}.attention_norm"] = sd[p + "input_layernorm.weight"]
        out[f"{i}.ffn_norm"] = sd[p + "post_attention_layernorm.weight"]
    return out


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, heads, T, d], rotate-half convention, positions 0..T-1."""
    d, t = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype), torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _internlm2_forward(w: dict[str, torch.Tensor], ids: torch.Tensor, cfg) -> torch.Tensor:
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
    g = heads // kv
    b, t = ids.shape
    h = w["tok_embeddings"][ids]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(cfg.num_hidden_layers):
        x = _rms(h, w[f"{i}.attention_norm"], cfg.rms_norm_eps)
        qkv = (x @ w[f"{i}.wqkv"].T).view(b, t, kv, g + 2, d)
        q = qkv[..., :g, :].reshape(b, t, heads, d).transpose(1, 2)  # query head = group * g + slot
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = (probs @ v).transpose(1, 2).reshape(b, t, heads * d)
        h = h + attn @ w[f"{i}.wo"].T
        x = _rms(h, w[f"{i}.ffn_norm"], cfg.rms_norm_eps)
        h = h + (torch.nn.functional.silu(x @ w[f"{i}.w1"].T) * (x @ w[f"{i}.w3"].T)) @ w[f"{i}.w2"].T
    return _rms(h, w["norm"], cfg.rms_norm_eps) @ w["output"].T


def test_internlm2_decoder_matches_packed_wqkv_reference(make_text):
    cfg = make_text(
        flavour="internlm2",
        attention_bias=False,
        num_attention_heads=8,
        num_key_value_heads=2,
        hidden_size=64,
        rms_norm_eps=1e-5,
        rope_theta=1_000_000.0,
        rope_scaling={"type": "dynamic", "factor": 2.0},
    )
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    weights = _official_weights(model)
    assert weights["0.wqkv"].shape == (2 * (4 + 2) * 8, 64)
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        got = model(ids).logits
    want = _internlm2_forward(weights, ids, cfg)
    assert (got - want).abs().max() <= 1e-4


def test_internlm2_has_no_biases(make_text):
    model = CausalLM(make_text(flavour="internlm2", attention_bias=False))
    assert not [n for n in model.state_dict() if n.endswith(".bias")]
