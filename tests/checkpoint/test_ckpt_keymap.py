"""Key maps: InternLM2 wqkv packing by hand, ViT qkv thirds, and identities official/hf <-> ours."""

from __future__ import annotations

import pytest
import torch

from ivl.checkpoint import keymap
from ivl.errors import CheckpointError


def test_split_wqkv_hand_example():
    # H=4 query heads, Hkv=2 kv heads (g=2), head_dim=2, hidden=1: row r holds the integer r.
    # kv-group 0 = rows 0..7 = [q0 q0 q1 q1 k0 k0 v0 v0], group 1 = rows 8..15 = [q2 q2 q3 q3 k1 k1 v1 v1].
    w = torch.arange(16.0).reshape(16, 1)
    q, k, v = keymap.split_wqkv(w, num_heads=4, num_kv_heads=2, head_dim=2)
    assert q.flatten().tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert k.flatten().tolist() == [4, 5, 12, 13]
    assert v.flatten().tolist() == [6, 7, 14, 15]
    assert torch.equal(keymap.merge_wqkv(q, k, v, 4, 2, 2), w)


def test_split_wqkv_bias_and_mqa():
    # one kv head, g=3, head_dim=1: [q0 q1 q2 k v]; biases are 1-D
    b = torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0])
    q, k, v = keymap.split_wqkv(b, num_heads=3, num_kv_heads=1, head_dim=1)
    assert (q.tolist(), k.tolist(), v.tolist()) == ([10, 11, 12], [13], [14])
    # pieces own their memory (safetensors refuses tensors that share storage)
    assert q.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


def test_split_wqkv_matches_internlm2_forward():
    """The split must reproduce the heads InternLM2's forward reads out of the packed projection."""
    heads, kv, d, hidden = 6, 2, 4, 8
    g = heads // kv
    torch.manual_seed(0)
    w = torch.randn(kv * (g + 2) * d, hidden)
    x = torch.randn(3, hidden)
    packed = (x @ w.T).view(3, kv, g + 2, d)  # "(h gs d)" with gs = g + 2
    ref_q = packed[:, :, :g].reshape(3, heads, d)  # query head = group * g + slot
    ref_k, ref_v = packed[:, :, -2], packed[:, :, -1]
    q, k, v = keymap.split_wqkv(w, heads, kv, d)
    torch.testing.assert_close((x @ q.T).view(3, heads, d), ref_q, rtol=0, atol=1e-6)
    torch.testing.assert_close((x @ k.T).view(3, kv, d), ref_k, rtol=0, atol=1e-6)
    torch.testing.assert_close((x @ v.T).view(3, kv, d), ref_v, rtol=0, atol=1e-6)


def test_split_wqkv_rejects_wrong_rows():
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wqkv.*expected 16 rows"):
        keymap.split_wqkv(torch.zeros(15, 3), 4, 2, 2, key="layers.0.attention.wqkv.weight")


def test_vit_qkv_thirds():
    w = torch.arange(12.0).reshape(6, 2)
    q, k, v = keymap.split_thirds(w)
    assert q.tolist() == [[0, 1], [2, 3]] and k.tolist() == [[4, 5], [6, 7]] and v.tolist() == [[8, 9], [10, 11]]
    assert torch.equal(keymap.merge_thirds([q, k, v]), w)
    with pytest.raises(CheckpointError, match="not divisible by 3"):
        keymap.split_thirds(torch.zeros(4, 2), key="qkv.weight")


KINDS = ["qwen2", "internlm2", "internlm2_g3", "internlm2_mqa", "llama", "mono"]


@pytest.mark.parametrize("kind", KINDS)
def test_official_round_trip(kind, random_model):
    model = random_model(kind)
    state = model.state_dict()
    official = keymap.ours_to_official(state, model.config)
    back = keymap.official_to_ours(official, model.config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    if model.config.text.flavour == "internlm2":
        names = set(official)
        assert "language_model.model.tok_embeddings.weight" in names
        assert "language_model.output.weight" in names
        assert "language_model.model.layers.1.attention.wqkv.weight" in names
        assert "language_model.model.layers.1.feed_forward.w3.weight" in names
        assert not any("q_proj" in n or "embed_tokens" in n for n in names)
    else:
        assert official.keys() == state.keys()  # Qwen2 / Llama: identical names
    if kind == "mono":
        assert "language_model.model.layers.0.feed_forward_ve.w1.weight" in official
        assert not any(n.startswith("vision_model.encoder") for n in official)


def test_official_internlm2_names_and_values(random_model):
    model = random_model("internlm2")
    state = model.state_dict()
    official = keymap.ours_to_official(state, model.config)
    p = "language_model.model.layers.0."
    assert torch.equal(official[p + "feed_forward.w1.weight"], state[p + "mlp.gate_proj.weight"])
    assert torch.equal(official[p + "feed_forward.w2.weight"], state[p + "mlp.down_proj.weight"])
    assert torch.equal(official[p + "attention_norm.weight"], state[p + "input_layernorm.weight"])
    assert torch.equal(official[p + "ffn_norm.weight"], state[p + "post_attention_layernorm.weight"])
    assert torch.equal(official[p + "attention.wo.weight"], state[p + "self_attn.o_proj.weight"])
    wqkv = official[p + "attention.wqkv.weight"].view(2, 4, 16, 64)  # kv groups, (q q k v), head_dim, hidden
    assert torch.equal(wqkv[1, 1], state[p + "self_attn.q_proj.weight"][48:64])  # query head 3 = group 1, slot 1
    assert torch.equal(wqkv[1, 2], state[p + "self_attn.k_proj.weight"][16:32])
    assert torch.equal(wqkv[0, 3], state[p + "self_attn.v_proj.weight"][0:16])


def test_official_rotary_buffers_are_ignored(random_model):
    model = random_model("internlm2")
    official = keymap.ours_to_official(model.state_dict(), model.config)
    official["language_model.model.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(8)
    back = keymap.official_to_ours(official, model.config)
    assert back.keys() == model.state_dict().keys()


@pytest.mark.parametrize("kind", ["qwen2", "internlm2", "llama"])
def test_hf_round_trip(kind, random_model):
    model = random_model(kind)
    state = model.state_dict()
    hf = keymap.ours_to_hf(state, model.config)
    assert "model.vision_tower.encoder.layer.1.attention.k_proj.weight" in hf
    assert "model.multi_modal_projector.linear_2.bias" in hf
    assert "lm_head.weight" in hf and "model.language_model.embed_tokens.weight" in hf
    assert not any(k.startswith(("vision_model", "mlp1", "language_model")) for k in hf)
    qkv = state["vision_model.encoder.layers.1.attn.qkv.weight"]
    assert torch.equal(hf["model.vision_tower.encoder.layer.1.attention.v_proj.weight"], qkv[64:])
    back = keymap.hf_to_ours(hf, model.config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    # the spelling transformers' save_pretrained writes loads too
    on_disk = {keymap.hf_file_name(k): v for k, v in hf.items()}
    assert "vision_tower.embeddings.cls_token" in on_disk and "language_model.lm_head.weight" in on_disk
    assert "language_model.model.norm.weight" in on_disk
    back = keymap.hf_to_ours(on_disk, model.config)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_mono_has_no_hf_layout(tiny_config):
    with pytest.raises(CheckpointError, match="Mono-InternVL"):
        keymap.ours_to_hf_map(tiny_config("mono"))


def test_streaming_merge_across_shards(random_model):
    """q/k/v parts of one ViT layer arrive in different 'shards'; the merge waits for the last part."""
    model = random_model("qwen2")
    hf = keymap.ours_to_hf(model.state_dict(), model.config)
    stream = keymap.hf_to_ours_map(model.config).stream()
    prefix = "model.vision_tower.encoder.layer.0.attention."
    assert stream.push(prefix + "v_proj.weight", hf[prefix + "v_proj.weight"]) == []
    assert stream.push(prefix + "q_proj.weight", hf[prefix + "q_proj.weight"]) == []
    assert stream.incomplete() == {
        "vision_model.encoder.layers.0.attn.qkv.weight": [prefix + "q_proj.weight", prefix + "v_proj.weight"]
    }
    with pytest.raises(CheckpointError, match="parts missing"):
        stream.finish()
    ((name, merged),) = stream.push(prefix + "k_proj.weight", hf[prefix + "k_proj.weight"])
    assert name == "vision_model.encoder.layers.0.attn.qkv.weight"
    assert torch.equal(merged, model.state_dict()[name])
    stream.finish()


def test_unknown_keys_are_reported(random_model):
    model = random_model("qwen2")
    state = dict(model.state_dict())
    state["something.else"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"no mapping for keys: something\.else"):
        keymap.official_to_ours(state, model.config)
    mapped = keymap.official_to_ours_map(model.config).convert(state, strict=False)
    assert "something.else" not in mapped


def test_works_on_meta_tensors(tiny_config):
    """The loader plans names and shapes from headers: every rule must accept meta tensors."""
    config = tiny_config("internlm2")
    w = torch.empty(2 * 4 * 16, 64, device="meta")
    out = keymap.official_to_ours({"language_model.model.layers.0.attention.wqkv.weight": w}, config)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "language_model.model.layers.0.self_attn.q_proj.weight": (64, 64),
        "language_model.model.layers.0.self_attn.k_proj.weight": (32, 64),
        "language_model.model.layers.0.self_attn.v_proj.weight": (32, 64),
    }


def test_map_stream_is_lazy(random_model):
    model = random_model("internlm2")
    official = keymap.ours_to_official(model.state_dict(), model.config)
    pulled = []

    def source():
        for key, tensor in official.items():
            pulled.append(key)
            yield key, tensor

    mapped = keymap.official_to_ours_map(model.config).map_stream(source())
    first = next(mapped)
    assert len(pulled) == 1 and first[0] == next(iter(official)).replace("tok_embeddings", "embed_tokens")
    rest = dict(mapped)
    assert len(rest) + 1 == len(model.state_dict())
