"""Preference pairs as `train --stage dpo` reads them: each pair two training samples, collated side by side.

A pair (data/formats.py `PreferenceRecord`: a prompt with its images, a chosen and a rejected answer) is two
conversations, the prompt followed by each answer. Each side is read by an ordinary `VLMDataset` over a view of the
pairs (`ChosenSide`, `RejectedSide`), so both go through the same up-front pass as SFT data: the chat template
(data/template.py), the loss mask, the image checks, the encodings kept on disk (the views' class names keep their
keys apart), the bad-sample reasons. A pair is usable when both of its sides are, whole: an empty answer, identical
answers, a missing or unreadable image, or a prompt and answer longer than max_seq_len make it bad, counted once by
its record's source like any bad sample (so --max-bad-fraction applies).

Labels cover the answer only: the last supervised run of each side (its text and end-of-turn token), never an
assistant turn of the prompt. Images are those of SFT: decoded pixels from the image preprocessing, or, with a
frozen tower, the feature cache's rows (train/features.py wraps the inner collate); the chosen side decodes them
and the rejected side shares its tensor. A batch of P pairs has 2P rows: the chosen answers, then the rejected
ones in the same order (`PairCollate`), so one forward pass scores both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minimind_v.constants import IGNORE_INDEX
from minimind_v.data.augment import ChatAugmentation
from minimind_v.data.dataset import BadSampleTracker, DataSettings, Sample, VLMDataset
from minimind_v.data.formats import BadSample, PreferenceReader, RawSample, ReaderView, open_preferences
from minimind_v.data.images import ImagePreprocessor
from minimind_v.data.template import ImageTokens
from minimind_v.errors import UserError


class _Side(ReaderView):
    """The pairs as training conversations: each prompt followed by one of its answers (a Reader over a
    PreferenceReader)."""

    side = ""

    def __getitem__(self, index: int) -> RawSample:
        pair = self.inner[index]
        answer = {"role": "assistant", "content": getattr(pair, self.side)}
        return RawSample([*pair.prompt, answer], pair.images, pair.source)


class ChosenSide(_Side):
    side = "chosen"


class RejectedSide(_Side):
    side = "rejected"


@dataclass
class PreferencePair:
    chosen: Sample
    rejected: Sample


def answer_only(sample: Sample) -> Sample:
    """`sample` supervised on its last answer alone: the labels before its last supervised run set to IGNORE_INDEX."""
    supervised = sample.labels != IGNORE_INDEX
    last = int(supervised.nonzero().max())
    before = (~supervised[:last]).nonzero()
    start = int(before.max()) + 1 if len(before) else 0
    labels = sample.labels.clone()
    labels[:start] = IGNORE_INDEX
    return dataclasses.replace(sample, labels=labels)


class PreferenceDataset(torch.utils.data.Dataset):
    """The usable pairs of a PreferenceReader, in file order; `bad_upfront`: the pairs the up-front pass rejected."""

    def __init__(self, reader: PreferenceReader, tokenizer: Any, image: ImageTokens,
                 preprocessor: ImagePreprocessor | None, settings: DataSettings) -> None:
        self.reader, self.settings = reader, settings
        self.chosen = VLMDataset(ChosenSide(reader), tokenizer, image, preprocessor, settings)
        # The rejected side never decodes: it shares the chosen side's pixels.
        rejected = dataclasses.replace(settings, decode_images=False)
        self.rejected = VLMDataset(RejectedSide(reader), tokenizer, image, preprocessor, rejected)
        self.pass_note = f"chosen answers: {self.chosen.pass_note}; rejected answers: {self.rejected.pass_note}"
        good = [self._whole(side) for side in (self.chosen, self.rejected)]
        rows = sorted(set(good[0]) & set(good[1]))
        self.pairs = np.asarray([(good[0][row], good[1][row]) for row in rows], dtype=np.int64).reshape(-1, 2)
        self.lengths = self.chosen.lengths[self.pairs[:, 0]] + self.rejected.lengths[self.pairs[:, 1]]
        self.bad_upfront = self._bad(good)

    def _whole(self, side: VLMDataset) -> dict[int, int]:
        """row -> index in `side` of its samples that kept their answer (max_seq_len cut nothing)."""
        full = np.asarray(side.encodings.arrays["full_len"])[side.samples]
        return {int(row): k for k, row in enumerate(side.indices) if side.lengths[k] == full[k]}

    def _bad(self, good: list[dict[int, int]]) -> list[BadSample]:
        """Each rejected pair once: the first reason either side's pass gave, else too long."""
        found: dict[str, BadSample] = {}
        for bad in self.chosen.bad_upfront + self.rejected.bad_upfront:
            found.setdefault(bad.source, bad)
        for side, whole in zip((self.chosen, self.rejected), good):
            for row in side.indices:
                source = self.reader.source(int(row))
                if int(row) not in whole and source not in found:
                    found[source] = BadSample("too_long", f"the prompt and its {type(side.reader).side} answer "
                                              f"exceed max_seq_len {self.settings.max_seq_len}", source)
        return sorted(found.values(), key=lambda b: b.source)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PreferencePair | BadSample:
        k_chosen, k_rejected = (int(k) for k in self.pairs[index])
        chosen = self.chosen[k_chosen]
        if isinstance(chosen, BadSample):
            return chosen
        rejected = self.rejected[k_rejected]
        if isinstance(rejected, BadSample):
            return rejected
        rejected = dataclasses.replace(rejected, pixel_values=chosen.pixel_values)
        return PreferencePair(answer_only(chosen), answer_only(rejected))

    def images(self, index: int) -> list[Any]:
        """The images pair `index` uses (both sides share them), e.g. to fill a feature cache."""
        return self.chosen.images(int(self.pairs[index, 0]))

    def tracker(self, max_bad_fraction: float) -> BadSampleTracker:
        """A tracker over every record of the file holding the rejected pairs; raises when there are too many."""
        tracker = BadSampleTracker(len(self.reader), max_bad_fraction)
        tracker.add(self.bad_upfront)
        tracker.check()
        return tracker


class PairCollate:
    """collate_fn for pairs: the inner collate (Collator, perhaps wrapped by the feature cache) over the chosen
    samples then the rejected ones, so rows [0, P) are the chosen answers and [P, 2P) the rejected, pair by pair."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, items: list[PreferencePair | BadSample]) -> dict[str, Any]:
        pairs = [item for item in items if isinstance(item, PreferencePair)]
        batch = self.collate([p.chosen for p in pairs] + [p.rejected for p in pairs])
        batch["bad"] = [item for item in items if isinstance(item, BadSample)] + batch["bad"]
        if batch["input_ids"] is not None:
            # The inner collate drops a sample whose cached features are broken; both sides share those images,
            # so it drops both, and the halves still pair up.
            sources = batch["sources"]
            half = len(sources) // 2
            if len(sources) % 2 or sources[:half] != sources[half:]:
                raise RuntimeError(f"a preference batch lost one side of a pair: {sources}")
        return batch


def open_pairs(path: str, images: str | None, tokenizer: Any, cfg: ImageTokens,
               preprocessor: ImagePreprocessor | None, max_seq_len: int, decode_images: bool,
               augment: ChatAugmentation | None = None, seed: int = 0, cache_dir: Path | None = None
               ) -> PreferenceDataset:
    """A preference data set as training reads it (the arguments of train/build.py's `open_data`)."""
    settings = DataSettings.for_training(preprocessor, max_seq_len, decode_images, augment, seed, cache_dir)
    dataset = PreferenceDataset(open_preferences(path, images), tokenizer, cfg, preprocessor, settings)
    if len(dataset) == 0:
        raise UserError(f"--data {path}: no usable preference pair ({len(dataset.bad_upfront)} bad)")
    return dataset
