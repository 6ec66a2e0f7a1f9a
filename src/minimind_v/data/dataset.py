"""The training dataset: raw records -> token ids, labels and pixels, with bad samples skipped and counted.

Up front, one pass over the file reads and tokenises every record and checks that its image files
exist inside the image folder (images are not decoded). That pass fails fast on a file that is
mostly broken, gives the exact count of bad records before training starts, and yields the exact
length of every good sample, which the length-grouped and packing batch plans need. The pass keeps
what it encoded (ids, loss mask, images kept) in flat arrays while they fit `keep_tokens`, so an
epoch does not render the chat template again: on the synthetic world that rendering was a quarter
of a CPU training step. A data set too large for the budget is encoded again in `__getitem__`.
Images are decoded lazily in `__getitem__`; one that turns out corrupt makes the item a
`BadSample` (returned, not raised, so it crosses DataLoader workers), which the collate drops and
hands back to the training loop for its `BadSampleTracker`.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minimind_v.data.formats import BadSample, ImageRef, RawSample, Reader
from minimind_v.data.images import DEFAULT_MAX_PIXELS, ImageFolder, ImagePreprocessor, load_image
from minimind_v.constants import IGNORE_INDEX, IMAGE_MARKER
from minimind_v.data.template import ChatAugmentation, EncodedSample, ImageTokens, encode_conversation, encode_text
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
    keep_tokens: int = 64_000_000
    """Keep the up-front pass's encodings while they total at most this many tokens (5 bytes each)."""
    augment: ChatAugmentation = field(default_factory=ChatAugmentation)
    """The 3v recipe's random system turn and empty-think drop, drawn once per record (off by default)."""
    seed: int = 0
    """Seeds those draws, with each record's line (train passes its --seed)."""


class EncodingStore:
    """Encoded samples back to back: ids (int32), loss mask (uint8), and how many images each kept.

    Labels are the ids where the mask is set and IGNORE_INDEX elsewhere, which is how every encoder in
    data/template.py builds them; `add` checks it, so a future encoder that differs fails loudly here.
    """

    def __init__(self) -> None:
        self.ids, self.mask, self.n_images = array("i"), array("B"), array("H")
        self.offsets = array("q", [0])

    def __len__(self) -> int:
        return len(self.n_images)

    @property
    def tokens(self) -> int:
        return len(self.ids)

    def add(self, encoded: EncodedSample) -> None:
        mask = [label != IGNORE_INDEX for label in encoded.labels]
        if any(keep and label != i for keep, label, i in zip(mask, encoded.labels, encoded.input_ids)):
            raise ValueError("EncodingStore: a label differs from its input id")
        self.ids.extend(encoded.input_ids)
        self.mask.extend(mask)
        self.n_images.append(encoded.n_images)
        self.offsets.append(len(self.ids))

    def get(self, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(input_ids, labels, n_images) of the k-th sample added."""
        start, end = self.offsets[k], self.offsets[k + 1]
        ids = torch.frombuffer(self.ids, dtype=torch.int32, offset=4 * start, count=end - start).long()
        mask = torch.frombuffer(self.mask, dtype=torch.uint8, offset=start, count=end - start).bool()
        return ids, ids.masked_fill(~mask, IGNORE_INDEX), self.n_images[k]


class VLMDataset(torch.utils.data.Dataset):
    """Good samples of a reader, in file order; `bad_upfront` lists those the up-front pass rejected."""

    def __init__(self, reader: Reader, tokenizer: Any, image: ImageTokens, preprocessor: ImagePreprocessor | None,
                 settings: DataSettings | None = None) -> None:
        self.reader, self.tokenizer, self.image, self.preprocessor = reader, tokenizer, image, preprocessor
        self.settings = settings or DataSettings()
        if self.settings.decode_images and preprocessor is None and not self.settings.text_only:
            raise ValueError("decode_images needs an ImagePreprocessor")
        self.settings.augment.check(tokenizer)
        self.store: EncodingStore | None = EncodingStore()
        self.folder = ImageFolder(reader.images_dir or Path("."))
        self.indices, self.lengths, self.bad_upfront = self._scan()

    def _scan(self) -> tuple[np.ndarray, np.ndarray, list[BadSample]]:
        indices, lengths, bad = [], [], []
        store = self.store
        for i in range(len(self.reader)):
            try:
                raw = self.reader[i]
                encoded = self._encode(raw)
                if self.settings.scan_images:
                    self._resolve(raw.images[:encoded.n_images])
            except BadSample as err:
                err.source = err.source or self.reader.source(i)
                bad.append(err)
                continue
            indices.append(i)
            lengths.append(len(encoded.input_ids))
            if store is not None:
                if store.tokens + len(encoded.input_ids) > self.settings.keep_tokens:
                    store = self.store = None  # too large to keep: __getitem__ encodes again
                else:
                    store.add(encoded)
        return np.asarray(indices, dtype=np.int64), np.asarray(lengths, dtype=np.int64), bad

    def _encode(self, raw: RawSample) -> EncodedSample:
        """A record encoded. Its augmentation draws are keyed by its place in its file (the line of its "file:line"
        source), so every pass gives the same sample, wherever the file is."""
        settings = self.settings
        if raw.text is not None:
            return encode_text(self.tokenizer, raw.text, settings.max_seq_len)
        messages, n_images = raw.conversations, len(raw.images)
        if settings.text_only:
            messages = [{**m, "content": m["content"].replace(IMAGE_MARKER, "")} for m in messages]
            n_images = 0
        place = raw.source.rpartition(":")[2]
        messages, drop_empty_think = settings.augment.draw(messages, settings.seed, place)
        return encode_conversation(self.tokenizer, messages, self.image, n_images, settings.max_seq_len,
                                   drop_empty_think=drop_empty_think)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample | BadSample:
        row = int(self.indices[index])
        try:
            raw = self.reader[row]
            if self.store is not None:
                ids, labels, n_images = self.store.get(index)
            else:
                encoded = self._encode(raw)
                ids, labels, n_images = torch.tensor(encoded.input_ids), torch.tensor(encoded.labels), encoded.n_images
            refs = self._resolve(raw.images[:n_images])
            pixels = self._pixels(refs) if self.settings.decode_images and refs else None
        except BadSample as err:
            err.source = err.source or self.reader.source(row)
            return err
        return Sample(ids, labels, pixels, refs, raw.source)

    def _resolve(self, refs: list[ImageRef]) -> list[ImageRef]:
        return [str(self.folder.resolve(ref)) if isinstance(ref, str) else ref for ref in refs]

    def _pixels(self, refs: list[ImageRef]) -> torch.Tensor:
        images = [load_image(ref, self.settings.max_pixels) for ref in refs]
        return torch.from_numpy(np.stack([self.preprocessor.array(image) for image in images]))

    def images(self, index: int) -> list[ImageRef]:
        """The images sample `index` uses, resolved; [] when its record has turned bad (e.g. to fill a feature cache)."""
        row = int(self.indices[index])
        try:
            raw = self.reader[row]
            n_images = self.store.n_images[index] if self.store is not None else self._encode(raw).n_images
            return self._resolve(raw.images[:n_images])
        except BadSample:
            return []

    def tracker(self, max_bad_fraction: float) -> BadSampleTracker:
        """A tracker holding the up-front pass's findings; raises at once when the file is already too broken."""
        tracker = BadSampleTracker(len(self) + len(self.bad_upfront), max_bad_fraction)
        tracker.add(self.bad_upfront)
        tracker.check()
        return tracker
