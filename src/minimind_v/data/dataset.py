"""The training dataset: raw records -> token ids, labels and pixels, with bad samples skipped and counted.

Up front, one pass (data/encoded.py: in worker processes, kept on disk for the next run) reads and tokenises every
record and checks that its image files exist inside the image folder (images are not decoded). That pass fails
fast on a file that is mostly broken, gives the exact count of bad records before training starts, and yields the
exact length of every good sample, which the length-grouped and packing batch plans need; items are read from its
arrays, so nothing is tokenised twice. Images are decoded lazily in `__getitem__`; one that turns out corrupt
makes the item a `BadSample` (returned, not raised, so it crosses DataLoader workers), which the collate drops and
hands back to the training loop for its `BadSampleTracker`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minimind_v.data import encoded, encodings
from minimind_v.data.formats import BadSample, ImageRef, Reader
from minimind_v.data.images import DEFAULT_MAX_PIXELS, ImageFolder, ImagePreprocessor, load_image
from minimind_v.data.augment import ChatAugmentation
from minimind_v.data.template import ImageTokens
from minimind_v.errors import UserError


@dataclass
class Sample:
    input_ids: torch.Tensor
    """(T,) long."""
    labels: torch.Tensor
    """(T,) long, -100 where no loss."""
    pixel_values: torch.Tensor | None
    """(n_images, 3, H, W) in placeholder order, or None (no images, or decoding left to a feature cache)."""
    images: list[ImageRef]
    """The images themselves (absolute file path, or the encoded bytes), e.g. to look up a feature cache."""
    source: str


class BadSampleTracker:
    """Counts unusable samples by reason; stops the run when they exceed `max_bad_fraction` of the data set.

    The fraction is taken over the whole data set (`total` records), each bad record counted once however
    many epochs meet it: the up-front pass gives the exact count before training, and images that fail to
    decode later only add to it. So the check never fires early on a few unlucky first batches, yet a
    folder of corrupt images stops the run once they reach the limit. The error names the counts per
    reason and the first example.
    """

    def __init__(self, total: int, max_bad_fraction: float, keep_examples: int = 5) -> None:
        self.total, self.max_bad_fraction, self.keep_examples = total, max_bad_fraction, keep_examples
        self.reasons: Counter[str] = Counter()
        self.examples: list[str] = []
        self._seen: set[str] = set()

    @property
    def bad(self) -> int:
        return len(self._seen)

    def add(self, bad: list[BadSample]) -> None:
        for sample in bad:
            if sample.source in self._seen:
                continue
            self._seen.add(sample.source)
            self.reasons[sample.reason] += 1
            if len(self.examples) < self.keep_examples:
                self.examples.append(str(sample))

    def check(self) -> None:
        if self.total and self.bad / self.total > self.max_bad_fraction:
            raise UserError(f"{self.bad} of {self.total} samples unusable ({self.bad / self.total:.1%} > "
                            f"--max-bad-fraction {self.max_bad_fraction}): {self.counts_text()}; "
                            f"first: {self.examples[0]}")

    def counts_text(self) -> str:
        return ", ".join(f"{reason} {n}" for reason, n in self.reasons.most_common())

    def summary(self) -> dict[str, Any]:
        """For the run log: counts per reason and a few examples (file:line: reason: detail)."""
        return {"total": self.total, "bad": self.bad, "reasons": dict(self.reasons), "examples": list(self.examples)}


@dataclass
class DataSettings:
    """How records become training samples."""

    max_seq_len: int = 640
    """Longest sample in tokens; longer ones lose trailing turns, or are skipped as too_long."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images announcing more pixels than this are refused (decompression bombs)."""
    decode_images: bool = True
    """False: leave pixel_values out and give only image_keys (a feature cache supplies the features)."""
    text_only: bool = False
    """Drop images and their markers (language-model stage on conversation data)."""
    scan_images: bool = True
    """In the up-front pass, check that every image file exists (one stat per image)."""
    cache_dir: Path | None = None
    """Where the up-front pass's encodings are kept for the next run (data/encoded.py); None: in memory only."""
    workers: int | None = None
    """Processes for the up-front pass (default: the CPUs this process may use, at most 8)."""
    augment: ChatAugmentation = field(default_factory=ChatAugmentation)
    """The 3v recipe's random system turn and empty-think drop, drawn once per record (off by default)."""
    seed: int = 0
    """Seeds those draws, with each record's line (train passes its --seed)."""

    @classmethod
    def for_training(cls, preprocessor: ImagePreprocessor | None, max_seq_len: int, decode_images: bool,
                     augment: ChatAugmentation | None, seed: int, cache_dir: Path | None) -> "DataSettings":
        """What `train` reads a data file with: images only where there is a preprocessor (none: the lm stage,
        text only), decoded unless a feature cache supplies them; `augment` for training data only."""
        return cls(max_seq_len=max_seq_len, decode_images=decode_images and preprocessor is not None,
                   text_only=preprocessor is None, augment=augment or ChatAugmentation(), seed=seed,
                   cache_dir=cache_dir)


class VLMDataset(torch.utils.data.Dataset):
    """Good samples of a reader, in file order; `bad_upfront` lists those the up-front pass rejected."""

    def __init__(self, reader: Reader, tokenizer: Any, image: ImageTokens, preprocessor: ImagePreprocessor | None,
                 settings: DataSettings | None = None) -> None:
        self.reader, self.tokenizer, self.image, self.preprocessor = reader, tokenizer, image, preprocessor
        self.settings = settings = settings or DataSettings()
        if settings.decode_images and preprocessor is None and not settings.text_only:
            raise ValueError("decode_images needs an ImagePreprocessor")
        settings.augment.check(tokenizer)
        self.folder = ImageFolder(reader.images_dir or Path("."))
        job = encoded.PassJob(reader, tokenizer, image, settings.text_only, settings.augment, settings.seed,
                              settings.scan_images)
        self.encodings, self.pass_note = encodings.open_encodings(job, settings.cache_dir, settings.workers)
        self.samples, self.lengths, self.n_images, bad = self.encodings.select(settings.max_seq_len)
        self.indices = np.asarray(self.encodings.arrays["rows"])[self.samples]
        rejected = sorted(self.encodings.bad_rows + bad)
        self.bad_upfront = [BadSample(reason, detail, reader.source(row)) for row, reason, detail in rejected]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample | BadSample:
        row = int(self.indices[index])
        try:
            ids, labels = self.encodings.tokens(int(self.samples[index]), int(self.lengths[index]),
                                                int(self.n_images[index]))
            refs = self._refs(index)
            pixels = self._pixels(refs) if self.settings.decode_images and refs else None
        except BadSample as err:
            err.source = err.source or self.reader.source(row)
            return err
        return Sample(torch.from_numpy(ids), torch.from_numpy(labels), pixels, refs, self.reader.source(row))

    def _refs(self, index: int) -> list[ImageRef]:
        """The sample's images: stored names resolved in the image folder, bytes read from the record."""
        n_images = int(self.n_images[index])
        names = self.encodings.names(int(self.samples[index]), n_images)
        if any(isinstance(name, bytes) for name in names):
            names = self.reader[int(self.indices[index])].images[:n_images]
        return [str(self.folder.resolve(ref)) if isinstance(ref, str) else ref for ref in names]

    def _pixels(self, refs: list[ImageRef]) -> torch.Tensor:
        images = [load_image(ref, self.settings.max_pixels) for ref in refs]
        return torch.from_numpy(np.stack([self.preprocessor.array(image) for image in images]))

    def images(self, index: int) -> list[ImageRef]:
        """The images sample `index` uses, resolved; [] when its record has turned bad (e.g. to fill a feature cache)."""
        try:
            return self._refs(index)
        except BadSample:
            return []

    def tracker(self, max_bad_fraction: float) -> BadSampleTracker:
        """A tracker holding the up-front pass's findings; raises at once when the file is already too broken."""
        tracker = BadSampleTracker(len(self) + len(self.bad_upfront), max_bad_fraction)
        tracker.add(self.bad_upfront)
        tracker.check()
        return tracker
