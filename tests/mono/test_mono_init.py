"""``ivl mono init``: a plain InternLM2 / Qwen2 checkpoint becomes a Mono-InternVL whose text path is the source LLM.

References are independent: transformers' Llama (= InternLM2 with unpacked qkv) and Qwen2 models, a hand-packed
InternLM2 ``wqkv``, and hand-computed mean rows for the new tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ivl.errors import CheckpointError
from ivl.models.mono import MonoInternVL
from ivl.mono_init import build_mono_from_llm, init_mono_from_llm
from ivl.processing.tokenizer import INTERNVL_TOKENS

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A red square and a blue circle on a white background.",
    "Describe the image in detail. What is shown in the picture? There are three cats and two dogs.",
    "Please provide the bounding box coordinate of the region this sentence describes.",
] * 4
HIDDEN, FFN, LAYERS, HEADS, KV = 64, 96, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS


def plain_tokenizer(flavour: str, save_dir: Path):
    """A byte-level BPE without the InternVL tokens (like a base LLM's tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    leading = ["<unk>", "<s>", "</s>"] if flavour == "internlm2" else []
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=leading,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    chat = ["<|im_end|>", "<|im_start|>"] if flavour == "internlm2" else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in chat])
    names = {"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"} if flavour == "internlm2" else {}
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    wrapped.save_pretrained(str(save_dir))
    return wrapped


def random_llm_weights(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Unpacked Llama-style weights (q/k/v/o, gate/up/down, norms), spread wide enough for clear logits."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.15) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    state = {"model.embed_tokens.weight": rand(vocab, HIDDEN, std=1.0), "model.norm.weight": 1 + rand(HIDDEN)}
    state["lm_head.weight"] = rand(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = rand(HEADS * HEAD_DIM, HIDDEN)
        state[p + "self_attn.k_proj.weight"] = rand(KV * HEAD_DIM, HIDDEN)
        state[p + "self_attn.v_proj.weight"] = rand(KV * HEAD_DIM, HIDDEN)
        state[p + "self_attn.o_proj.weight"] = rand(HIDDEN, HEADS * HEAD_DIM)
        state[p + "mlp.gate_proj.weight"] = rand(FFN, HIDDEN)
        state[p + "mlp.up_proj.weight"] = rand(FFN, HIDDEN)
        state[p + "mlp.down_proj.weight"] = rand(HIDDEN, FFN)
        state[p + "input_layernorm.weight"] = 1 + rand(HIDDEN)
        state[p + "post_attention_layernorm.weight"] = 1 + rand(HIDDEN)
    return state


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """InternLM2 layout by hand: per KV head h the rows q(h,0..g-1), k(h), v(h)."""
    g = HEADS // KV
    q, k, v = q.view(HEADS, HEAD_DIM, -1), k.view(KV, HEAD_DIM, -1), v.view(KV, HEAD_DIM, -1)
    groups = [torch.cat([*(q[h * g + s] for s in range(g)), k[h], v[h]]) for h in range(KV)]
    return torch.cat(groups)


def to_internlm2_names(llama: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {
        "model.tok_embeddings.weight": llama["model.embed_tokens.weight"],
        "model.norm.weight": llama["model.norm.weight"],
        "output.weight": llama["lm_head.weight"],
    }
    for i in range(LAYERS):
        s, d = f"model.layers.{i}.", f"model.layers.{i}."
        out[d + "attention.wqkv.weight"] = pack_wqkv(
            llama[s + "self_attn.q_proj.weight"],
            llama[s + "self_attn.k_proj.weight"],
            llama[s + "self_attn.v_proj.weight"],
        )
        out[d + "attention.wo.weight"] = llama[s + "self_attn.o_proj.weight"]
        out[d + "feed_forward.w1.weight"] = llama[s + "mlp.gate_proj.weight"]
        out[d + "feed_forward.w3.weight"] = llama[s + "mlp.up_proj.weight"]
        out[d + "feed_forward.w2.weight"] = llama[s + "mlp.down_proj.weight"]
        out[d + "attention_norm.weight"] = llama[s + "input_layernorm.weight"]
        out[d + "ffn_norm.weight"] = llama[s + "post_attention_layernorm.weight"]
    return out


@pytest.fixture(scope="module")
def internlm2_dir(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A plain InternLM2ForCausalLM checkpoint (official names, packed wqkv) and its unpacked weights."""
    path = tmp_path_factory.mktemp("internlm2")
    vocab = len(plain_tokenizer("internlm2", path))
    llama = random_llm_weights(vocab, seed=3)
    save_file({k: v.contiguous() for k, v in to_internlm2_names(llama).items()}, str(path / "model.safetensors"))
    config = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": vocab,
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32",
        "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    (path / "modeling_internlm2.py").write_text("# remote modelling code of the base LLM\n")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 92542]}))
    return path, llama


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """A Qwen2ForCausalLM written by transformers' save_pretrained (tied embeddings, vocabulary padded by 10)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("qwen2")
    tokens = len(plain_tokenizer("qwen2", path))
    config = Qwen2Config(
        vocab_size=tokens + 10, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(5)
    model = Qwen2ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if "embed" in name else 0.15))
    model.save_pretrained(str(path))
    return path, model, tokens


def llama_reference(llama: dict[str, torch.Tensor], vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(llama, strict=True)
    return model


def _image_ids(image_id: int, prefix: list[int], suffix: list[int], tiles: int = 1) -> torch.Tensor:
    return torch.tensor([[*prefix, image_id - 2, *[image_id] * (256 * tiles), image_id - 1, *suffix]])


# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_internlm2_init_keeps_the_text_path_and_adds_the_official_tokens(internlm2_dir, tmp_path):
    src, llama = internlm2_dir
    out = tmp_path / "mono"
    report = init_mono_from_llm(src, out, vision_width=48, seed=7)
    vocab = llama["model.embed_tokens.weight"].shape[0]
    assert report.added_tokens == list(INTERNVL_TOKENS)
    assert report.vocab_size == vocab + 9 and report.image_token_id == vocab + 2

    # tokenizer: the nine tokens follow the base vocabulary in spec order
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids(list(INTERNVL_TOKENS)) == list(range(vocab, vocab + 9))
    assert not (out / "modeling_internlm2.py").exists() and (out / "generation_config.json").exists()

    # weights on disk: the language weights bit for bit, experts = text FFN, spec §6.9 rows for the new tokens
    saved = load_file(str(out / "model.safetensors"))
    source = load_file(str(src / "model.safetensors"))
    for i in range(LAYERS):
        p = f"language_model.model.layers.{i}."
        assert torch.equal(saved[p + "attention.wqkv.weight"], source[f"model.layers.{i}.attention.wqkv.weight"])
        for w in ("w1", "w2", "w3"):
            assert torch.equal(
                saved[f"{p}feed_forward_ve.{w}.weight"], source[f"model.layers.{i}.feed_forward.{w}.weight"]
            )
    embed, head = saved["language_model.model.tok_embeddings.weight"], saved["language_model.output.weight"]
    assert torch.equal(embed[:vocab], llama["model.embed_tokens.weight"])
    assert torch.equal(head[:vocab], llama["lm_head.weight"])
    assert torch.allclose(head[vocab:], llama["lm_head.weight"].mean(0).expand(9, -1), atol=1e-6)
    assert torch.allclose(embed[vocab:], llama["model.embed_tokens.weight"].mean(0).expand(9, -1), atol=1e-6)
    assert saved["vision_model.embeddings.position_embedding"].shape == (1, 1025, 48)
    config = json.loads((out / "config.json").read_text())
    assert config["llm_config"]["architectures"] == ["InternLM2VEForCausalLM"]
    assert config["vision_config"]["model_type"] == "intern_vit_patch" and config["template"] == "internlm2-chat"
    assert config["llm_config"]["rms_norm_eps"] == 1e-5 and config["llm_config"]["vocab_size"] == vocab + 9

    # behaviour: text-only logits are the source LLM's (transformers Llama on the unpacked weights) ...
    model = MonoInternVL.from_pretrained(out)
    reference = llama_reference(llama, vocab)
    ids = torch.tensor([tok("A red square and a blue circle")["input_ids"]])
    assert ids.max() < vocab
    got = model(ids).logits
    assert (got[..., :vocab] - reference(ids).logits).abs().max() <= 1e-4
    # ... and with an image too, on the same embeddings, because the fresh experts equal the text FFN
    image_id = report.image_token_id
    ids = _image_ids(image_id, [1, 30, 31], [32, 33])
    pixels = torch.randn(1, 3, 448, 448)
    embeds = model.embed(ids, pixel_values=pixels)
    got = model(ids, pixels).logits[..., :vocab]
    assert (got - reference(inputs_embeds=embeds).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_qwen2_init_unties_shrinks_the_padded_vocabulary_and_matches_transformers(qwen2_dir, tmp_path):
    src, hf_model, tokens = qwen2_dir
    report = init_mono_from_llm(src, tmp_path / "mono", vision_width=32, seed=0)
    assert report.vocab_size == tokens + 9  # the padded 10 extra rows are dropped (spec §6.9: resize to len(tok))
    config = json.loads((tmp_path / "mono" / "config.json").read_text())
    assert config["llm_config"]["architectures"] == ["InternLM2VEForCausalLM"] and config["llm_config"]["bias"]
    assert config["template"] == "internvl2_5" and not config["llm_config"]["tie_word_embeddings"]
    model = MonoInternVL.from_pretrained(tmp_path / "mono")
    head = model.language_model.lm_head.weight
    source_embed = hf_model.model.embed_tokens.weight
    assert torch.equal(head[:tokens], source_embed[:tokens])  # untied copy of the tied matrix
    assert torch.allclose(head[tokens:], source_embed[:tokens].mean(0).expand(9, -1), atol=1e-6)
    assert torch.equal(
        model.language_model.model.layers[0].self_attn.q_proj.bias, hf_model.model.layers[0].self_attn.q_proj.bias
    )

    ids = torch.randint(0, tokens, (2, 12))
    assert (model(ids).logits[..., :tokens] - hf_model(ids).logits[..., :tokens]).abs().max() <= 1e-4
    ids = _image_ids(report.image_token_id, [20, 21], [22, 23, 24])
    pixels = torch.randn(1, 3, 448, 448)
    embeds = model.embed(ids, pixel_values=pixels)
    want = hf_model(inputs_embeds=embeds).logits[..., :tokens]
    assert (model(ids, pixels).logits[..., :tokens] - want).abs().max() <= 1e-4


def test_fresh_visual_embedding_is_seeded(internlm2_dir):
    src, _ = internlm2_dir
    a, _, _ = build_mono_from_llm(src, vision_width=16, seed=1)
    b, _, _ = build_mono_from_llm(src, vision_width=16, seed=1)
    c, _, _ = build_mono_from_llm(src, vision_width=16, seed=2)
    for name in ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding",
                 "mlp1.1.weight"):  # fmt: skip
        assert torch.equal(a.state_dict()[name], b.state_dict()[name])
        assert not torch.equal(a.state_dict()[name], c.state_dict()[name])
    std = a.state_dict()["mlp1.1.weight"].std().item()
    assert 0.015 < std < 0.025  # N(0, 0.02) like the rest of ivl's from-scratch init
    assert torch.equal(a.mlp1[0].weight, torch.ones_like(a.mlp1[0].weight))


def test_bf16_output_on_request(internlm2_dir):
    src, _ = internlm2_dir
    model, _, report = build_mono_from_llm(src, vision_width=16, dtype="bfloat16")
    assert report.dtype == torch.bfloat16 and {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_cli_mono_init(internlm2_dir, tmp_path):
    from ivl.cli import app

    src, _ = internlm2_dir
    result = CliRunner().invoke(app, ["mono", "init", "--llm", str(src), "--out", str(tmp_path / "m"),
                                      "--vision-width", "16"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "added tokens: <img>" in result.output and "vision width 16" in result.output
    assert isinstance(MonoInternVL.from_pretrained(tmp_path / "m"), MonoInternVL)


def test_refuses_what_it_cannot_start_from(internlm2_dir, mono_checkpoint, tmp_path):
    src, _ = internlm2_dir
    with pytest.raises(CheckpointError, match="not a plain LLM"):
        init_mono_from_llm(mono_checkpoint, tmp_path / "x")
    with pytest.raises(CheckpointError, match="source directory"):
        init_mono_from_llm(src, src)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        init_mono_from_llm(tmp_path, tmp_path / "y")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        init_mono_from_llm(src, tmp_path / "notes", vision_width=16)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "user data"
