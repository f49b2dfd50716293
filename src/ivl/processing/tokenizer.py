"""A tiny byte-level BPE tokenizer with the InternVL special tokens, trained offline in about a second.

Tests, the demo and tiny recipes need a real `transformers` tokenizer (loadable with `AutoTokenizer` from a
directory) without downloading one. The id layout mirrors the released checkpoints: the nine InternVL tokens
take the last nine ids, so ``len(tokenizer) == vocab_size`` and ``<IMG_CONTEXT>`` is ``vocab_size - 7``
(151667 for Qwen2.5's 151674, 500 for the default 507, which matches the ``tiny`` preset).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ivl.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

#: The nine tokens InternVL appends to the LLM vocabulary, in spec order (§3.4).
INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")

#: Chat tokens that follow the trained vocabulary, per flavour (real id order: Qwen 151643.., InternLM2 92542..).
CHAT_TOKENS = {
    "qwen2": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    "internlm2": ("<|im_end|>", "<|im_start|>"),
}
#: Tokens the BPE trainer puts at ids 0.. (InternLM2: <unk>=0, <s>=1, </s>=2; Qwen has none, so id 0 is a byte).
LEADING_TOKENS = {"qwen2": (), "internlm2": ("<unk>", "<s>", "</s>")}

#: The `extra_special_tokens` names transformers' InternVL processor reads from a tokenizer.
EXTRA_SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
}

DEFAULT_VOCAB_SIZE = 507

#: Qwen2's pre-tokenizer split (its tokenizer.json): words, single digits, punctuation runs, newlines, spaces.
#: Single digits matter for grounding: a box is spelled digit by digit from ten tokens, never from merges
#: such as ``Ġ1000`` that a small BPE would otherwise learn for the commonest coordinates. Both flavours use it
#: (the InternLM2 flavour is a byte-level BPE here as well, not the real SentencePiece model).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_DEFAULT_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Describe the image in detail. What is shown in the picture?",
    "A red square and a blue circle on a white background.",
    "Please provide the bounding box coordinate of the region this sentence describes.",
    "The answer is 42. There are 3 cats and 2 dogs in the photo.",
    "你好，世界。这是一张图片。",
    "Image-1: Image-2: Frame-1: Frame-2: Question: Answer:",
)


def build_tokenizer(
    texts: Iterable[str] = (),
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    flavour: Literal["qwen2", "internlm2"] = "qwen2",
    save_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE on ``texts`` (plus a small built-in corpus) and wrap it for transformers.

    ``vocab_size`` is the final ``len(tokenizer)``; if the corpus yields fewer merges, ``<|reserved_k|>`` special
    tokens fill the gap so that the InternVL token ids stay at the top of the vocabulary. ``flavour="qwen2"``:
    no BOS, eos ``<|im_end|>``, pad ``<|endoftext|>``; ``flavour="internlm2"``: ``<s>`` prepended to every
    encoding, eos ``</s>``, pad ``</s>``. Returns a ``PreTrainedTokenizerFast`` (saved to ``save_dir`` if given).
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    if flavour not in CHAT_TOKENS:
        raise ConfigError(f"tokenizer flavour must be 'qwen2' or 'internlm2', got {flavour!r}")
    leading, chat = LEADING_TOKENS[flavour], CHAT_TOKENS[flavour]
    trained_size = vocab_size - len(INTERNVL_TOKENS) - len(chat)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if trained_size < len(alphabet) + len(leading):
        minimum = len(alphabet) + len(leading) + len(chat) + len(INTERNVL_TOKENS)
        raise ConfigError(
            f"vocab_size {vocab_size} is too small for a byte-level {flavour} tokenizer (minimum {minimum})"
        )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=trained_size,
        special_tokens=list(leading),
        initial_alphabet=sorted(alphabet),
        show_progress=False,
    )
    corpus = [*_DEFAULT_CORPUS, *texts]
    tok.train_from_iterator(corpus, trainer)

    def special(content: str) -> AddedToken:
        return AddedToken(content, special=True, normalized=False)

    filler = trained_size - tok.get_vocab_size()
    if filler:
        tok.add_special_tokens([special(f"<|reserved_{k}|>") for k in range(filler)])
    tok.add_special_tokens([special(t) for t in (*chat, *INTERNVL_TOKENS)])
    if tok.get_vocab_size() != vocab_size:  # pragma: no cover - guards the id layout promised above
        raise ConfigError(f"built tokenizer has {tok.get_vocab_size()} tokens, expected {vocab_size}")

    if flavour == "qwen2":
        names = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=dict(EXTRA_SPECIAL_TOKENS), **names)
    if save_dir is not None:
        wrapped.save_pretrained(str(save_dir))
    return wrapped


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """``AutoTokenizer`` from a local directory, offline, without transformers' warning that the directory's
    ``internvl_chat`` config.json is not a tokenizer config (it is the model's, and expected there)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(path))
    finally:
        hf_logging.set_verbosity(level)
