"""The whole InternVL-2.5 / Mono-InternVL model: vision stem -> pixel unshuffle -> mlp1 -> decoder LLM.

``config.vision.model_type`` picks InternViT (``intern_vit_6b``) or the encoder-free patch stem
(``intern_vit_patch``, Mono-InternVL, whose decoder then carries visual FFN experts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ivl.config import InternVLConfig
from ivl.errors import ModelInputError
from ivl.models.cache import KVCache
from ivl.models.connector import Projector, pixel_unshuffle
from ivl.models.decoder import CausalLM, CausalLMOutput, init_weights
from ivl.models.internvit import InternViT
from ivl.models.patch_embed import PatchStem


class InternVL(nn.Module):
    def __init__(self, config: InternVLConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.vision_model: nn.Module = PatchStem(config.vision) if config.is_mono else InternViT(config.vision)
        self.mlp1 = Projector(config.connector_in_features, config.text.hidden_size)
        self.language_model = CausalLM(config.text)
        init_weights(self.mlp1)
        init_weights(self.vision_model, std=config.vision.initializer_range)

    # ---------------------------------------------------------------------------------------------- images

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles ``[N, 3, S, S]`` -> LLM tokens ``[N, (S/p)^2 / 4, H]`` (ViT or stem, drop CLS, unshuffle, mlp1)."""
        features = self.vision_model(pixel_values, select_layer=self.config.select_layer)
        patch = self.config.vision.patch_size
        n, _, dim = features.shape
        grid = features.reshape(n, pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch, dim)
        tokens = pixel_unshuffle(grid, self.config.downsample_ratio)
        tokens = tokens.reshape(n, -1, tokens.shape[-1])
        return self.mlp1(tokens.to(self.mlp1[1].weight.dtype))

    def embed(
        self,
        input_ids: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with ``<IMG_CONTEXT>`` rows replaced by image features in sequence order.

        Tiles whose ``image_flags`` is 0 (dummy tiles of text-only samples) are encoded with the others and then
        dropped: they keep the vision tower in the graph, as data-parallel training needs.
        """
        embeds = self.language_model.model.embed_tokens(input_ids)
        if pixel_values is not None and image_features is not None:
            raise ModelInputError("give pixel_values or image_features, not both")
        tiles = pixel_values if pixel_values is not None else image_features
        keep = None
        if tiles is not None and image_flags is not None:
            keep = image_flags.reshape(-1).to(device=tiles.device).bool()
            if keep.numel() != tiles.shape[0]:
                raise ModelInputError(f"image_flags has {keep.numel()} entries for {tiles.shape[0]} tiles")
        is_image = input_ids == self.config.image_token_id
        num_tokens = int(is_image.sum())
        if tiles is None:
            if num_tokens:
                raise ModelInputError(
                    f"input_ids hold {num_tokens} image tokens (id {self.config.image_token_id}) "
                    "but no pixel_values or image_features were given"
                )
            return embeds
        if pixel_values is not None:
            features = self.encode_images(tiles) if tiles.shape[0] else embeds.new_zeros(0, 0, embeds.shape[-1])
        else:
            features = tiles
        if keep is not None:
            dropped = features[~keep]
            features = features[keep]
            if dropped.numel() and dropped.requires_grad:
                # dummy tiles of text-only samples keep the vision tower in the graph (DDP/FSDP need every grad)
                embeds = embeds + 0.0 * dropped.sum().to(embeds.dtype)
        features = features.reshape(-1, embeds.shape[-1])
        if features.shape[0] != num_tokens:
            raise ModelInputError(
                f"input_ids hold {num_tokens} image tokens (id {self.config.image_token_id}) "
                f"but the images give {features.shape[0]} feature rows"
            )
        if num_tokens == 0:
            return embeds
        return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))

    # ---------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        image_features: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        logits_positions: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        embeds = self.embed(
            input_ids, pixel_values=pixel_values, image_features=image_features, image_flags=image_flags
        )
        visual_mask = input_ids == self.config.image_token_id if self.config.text.visual_experts else None
        return self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            visual_mask=visual_mask,
            cu_seqlens=cu_seqlens,
            logits_to_keep=logits_to_keep,
            logits_positions=logits_positions,
        )

    # ---------------------------------------------------------------------------------------------- training

    def gradient_checkpointing_enable(self) -> None:
        """Recompute every ViT and decoder layer in backward (torch.utils.checkpoint, non-reentrant)."""
        self._set_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self._set_checkpointing(False)

    def _set_checkpointing(self, enabled: bool) -> None:
        encoder = getattr(self.vision_model, "encoder", None)
        if encoder is not None:
            encoder.gradient_checkpointing = enabled
        self.language_model.model.gradient_checkpointing = enabled

    # ---------------------------------------------------------------------------------------------- chat

    def chat(self, processor: Any, question: str, images: Any = None, video: Any = None, **kwargs: Any) -> Any:
        """``model.chat`` as on the official model card, without ``trust_remote_code``: see
        :func:`ivl.inference.chat.chat` for the arguments (history, generation, return_history, max_num, ...)."""
        from ivl.inference.chat import chat

        return chat(self, processor, question, images, video, **kwargs)

    def stream_chat(self, processor: Any, question: str, images: Any = None, video: Any = None, **kwargs: Any) -> Any:
        """Text deltas of :meth:`chat`'s answer as they are generated (:func:`ivl.inference.chat.stream_chat`)."""
        from ivl.inference.chat import stream_chat

        return stream_chat(self, processor, question, images, video, **kwargs)

    def batch_chat(self, processor: Any, questions: Any, images: Any = None, **kwargs: Any) -> list[str]:
        """Many independent questions decoded as one batch (:func:`ivl.inference.chat.batch_chat`)."""
        from ivl.inference.chat import batch_chat

        return batch_chat(self, processor, questions, images, **kwargs)

    # ---------------------------------------------------------------------------------------------- IO

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> InternVL:
        from ivl.checkpoint.io import load_model

        return load_model(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, *, layout: str = "official", max_shard_size: str = "5GB") -> None:
        from ivl.checkpoint.io import save_model

        save_model(self, path, layout=layout, max_shard_size=max_shard_size)


def count_parameters(model: InternVL) -> dict[str, int]:
    """Parameter counts per component (tied weights counted once); works on the meta device."""

    def total(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    lm = model.language_model
    layers = total(lm.model.layers)
    experts = sum(total(layer.mlp_visual) for layer in lm.model.layers if layer.mlp_visual is not None)
    counts = {
        "vision": total(model.vision_model),
        "connector": total(model.mlp1),
        "language": total(lm),
        "language.embeddings": lm.model.embed_tokens.weight.numel(),
        "language.layers": layers,
        "language.visual_experts": experts,
        "language.norm": total(lm.model.norm),
        "language.lm_head": total(lm.lm_head),
    }
    counts["total"] = counts["vision"] + counts["connector"] + counts["language"]
    return counts
