"""MiniMindVLM: vision tower -> projector -> the language model's embeddings at the image placeholders.

Each image is a run of cfg.image_token_len placeholder tokens (cfg.image_token_id) in input_ids;
the k-th run, counted row by row, receives the projected patch features of the k-th image.
Architecture only: reading and writing a model directory is modeldir.py's, whose MiniMindVLM (this class
with from_pretrained / save_pretrained) is the one `from minimind_v import MiniMindVLM` gives.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from minimind_v.model.config import VLMConfig
from minimind_v.model.llm import CausalLMOutput, KVCache, MiniMindLM
from minimind_v.model.projector import Projector
from minimind_v.model.vision import VisionTower


class MiniMindVLM(nn.Module):
    _tied_weights_keys = {"lm.lm_head.weight": "lm.embed_tokens.weight"}
    """What peft reads (with get_input_embeddings and config) to give the output head the embedding rows a LoRA
    adapter trains (adapters.lora_config's token_ids): the head is the embedding, tied."""

    def __init__(self, cfg: VLMConfig, vision: VisionTower | None = None):
        """Random language model and projector; the tower is `vision` if given, else built from cfg.vision."""
        super().__init__()
        self.cfg = cfg
        self.vision = vision if vision is not None else VisionTower(cfg.vision)
        self.projector = Projector(cfg.projector, cfg.vision.hidden_size, cfg.lm.hidden_size)
        self.lm = MiniMindLM(cfg.lm)

    @property
    def config(self) -> dict[str, object]:
        """The one fact of a Hugging Face config peft asks a model for: its output head is its embedding."""
        return {"tie_word_embeddings": True}

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.embed_tokens

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) or (B, N, 3, H, W) -> patch features (N_total, n_patches, vision_dim)."""
        return self.vision(pixel_values.flatten(0, pixel_values.dim() - 4))

    def insert_images(self, input_ids: Tensor, embeds: Tensor, features: Tensor,
                      image_index: Tensor | None = None) -> Tensor:
        """Replace each placeholder run by the projected features of its image, in order.

        image_index: (N*P,) long flat indices into (B*T) of the placeholders, row-major, given by the host.
        """
        if image_index is not None:
            return self._copy_images(embeds, features, image_index)
        is_image = input_ids == self.cfg.image_token_id  # (B, T)
        n_slots, n_images = int(is_image.sum()), features.shape[0]
        expected = n_images * self.cfg.image_token_len
        if n_slots != expected or features.shape[1] != self.cfg.image_token_len:
            raise ValueError(f"{n_slots} image placeholder tokens (id {self.cfg.image_token_id}) in the batch, but "
                             f"{n_images} images x {features.shape[1]} features need {expected}")
        projected = self.projector(features.to(self.projector_dtype))  # (N, P, C)
        # Boolean indexing walks the batch row-major, so image k lands in the k-th run.
        embeds[is_image] = projected.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds

    def _copy_images(self, embeds: Tensor, features: Tensor, image_index: Tensor) -> Tensor:
        """insert_images with host-given slots: the count is a shape, so checking it never waits for the device."""
        n_slots, n_images = image_index.numel(), features.shape[0]
        expected = n_images * self.cfg.image_token_len
        if n_slots != expected or features.shape[1] != self.cfg.image_token_len:
            raise ValueError(f"{n_slots} image placeholder slots given for {n_images} images x "
                             f"{features.shape[1]} features, which need {expected}")
        projected = self.projector(features.to(self.projector_dtype)).reshape(-1, embeds.shape[-1])  # (N*P, C)
        flat = embeds.flatten(0, 1).index_copy(0, image_index, projected.to(embeds.dtype))  # (B*T, C)
        return flat.view_as(embeds)

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                segment_ids: Tensor | None = None, labels: Tensor | None = None,
                image_features: Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False, logits_to_keep: int | str | None = None,
                image_index: Tensor | None = None, supervised_index: Tensor | None = None,
                positions_checked: bool = False) -> CausalLMOutput:
        """image_index: see insert_images; supervised_index, positions_checked: see MiniMindLM.forward."""
        embeds = self.lm.embed_tokens(input_ids)  # (B, T, C)
        has_images = pixel_values is not None or image_features is not None
        # Decode steps with a cache carry no placeholders: their images are already in the cache.
        if has_images and not (past_key_values and not bool((input_ids == self.cfg.image_token_id).any())):
            features = image_features if image_features is not None else self.encode_images(pixel_values)
            embeds = self.insert_images(input_ids, embeds, features, image_index)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                       segment_ids=segment_ids, labels=labels, past_key_values=past_key_values,
                       use_cache=use_cache, logits_to_keep=logits_to_keep, supervised_index=supervised_index,
                       positions_checked=positions_checked)
