"""The seam to data/feature_cache.py: a frozen tower's features are computed once and then only read.

When the tower is frozen, the dataset skips decoding images (`decode_images=False`) and this
collate wrapper puts each sample's cached features where its pixels would have been; the batch
then carries `image_features` (N_images, n_patches, dim) instead of `pixel_values`, and the model
skips the tower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from minimind_v.data.dataset import Sample, VLMDataset
from minimind_v.data.feature_cache import BrokenImage, FeatureCache, NotCached, tower_fingerprint
from minimind_v.data.formats import BadSample
from minimind_v.data.images import ImagePreprocessor
from minimind_v.model.vlm import MiniMindVLM


def open_cache(model: MiniMindVLM, preprocessor: ImagePreprocessor, root: Path, dtype: str) -> FeatureCache:
    cfg = model.cfg
    fingerprint = tower_fingerprint(model.vision.model, preprocessor.to_config())
    return FeatureCache(root, fingerprint, n_patches=cfg.image_token_len, dim=cfg.vision.hidden_size,
                        describe={"vision": cfg.vision.name_or_path}, dtype=dtype)


def fill_cache(cache: FeatureCache, datasets: list[VLMDataset],
               preprocessor: ImagePreprocessor, encode: Callable[[torch.Tensor], torch.Tensor],
               log: Callable[[str], None], share: tuple[int, int] = (0, 1)) -> None:
    """Encode this process's share (`share=(rank, world)`) of the images of `datasets` not yet in the cache."""
    images = (ref for ds in datasets for i in range(len(ds)) for ref in ds.images(i))
    cache.build(images, preprocess=preprocessor, encode=encode, log=log, share=share)


class WithCachedFeatures:
    """collate_fn: the cached features of each sample's images go through the collator in its pixels' place,
    so they come out in placeholder order (packing reorders samples), then are renamed image_features."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]], cache: FeatureCache) -> None:
        self.collate, self.cache = collate, cache

    def __call__(self, items: list[Sample | BadSample]) -> dict[str, Any]:
        batch = self.collate([self._with_features(item) for item in items])
        batch["image_features"] = batch.pop("pixel_values", None)
        return batch

    def _with_features(self, item: Sample | BadSample) -> Sample | BadSample:
        if isinstance(item, BadSample) or not item.images:
            return item
        try:
            features = torch.stack([self.cache.features(ref) for ref in item.images])  # (n, P, D) fp16
        except (BrokenImage, NotCached) as err:
            return BadSample("bad_image", str(err), item.source)
        return dataclasses.replace(item, pixel_values=features)
