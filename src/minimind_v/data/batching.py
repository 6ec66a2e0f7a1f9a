"""Batches without wasted padding: dynamic padding, length-grouped batches, and sequence packing.

- `Collator(pad_id)`: right-pads to the longest row of the batch (not to max_seq_len).
- `Collator(pad_id, pack_len=L)`: packs samples into rows of at most L tokens (first-fit decreasing);
  `segment_ids` number the samples of a row 1..k (0 = padding) so attention stays within a sample,
  `position_ids` restart at 0 for every sample, and the first token of each sample gets no label, so
  the loss of a packed batch equals the token-mean over the same samples unpacked.
- `Collator(pad_id, widths=W, rows=R)`: for a compiled model, a handful of shapes: each batch right-padded to
  the narrowest of the widths W (`bucket_widths`) that holds it, and to R rows with empty rows (no labels);
  with a token budget T, to min(R, T // width) rows.
- `BatchPlan`: which sample indices form each batch of an epoch, a function of (seed, epoch) only
  (a DataLoader takes an epoch's list as its batch_sampler):
  "random" (shuffled), "grouped" (shuffled, then sorted by length within mega-batches, so a batch
  holds similar lengths) or "packed" (as many samples as fill `batch_size` rows of max_seq_len); with
  `tokens`, random and grouped batches hold as many samples as fit that many padded tokens.

A collated batch is a dict: input_ids, labels, attention_mask (padded) or segment_ids (packed),
position_ids, pixel_values ((N_images, 3, H, W) in placeholder order, row by row, or None),
images (the path or bytes behind each placeholder run, same order), sources, num_samples, and
`bad`: the BadSamples dropped from this batch, for the BadSampleTracker.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from minimind_v.data.dataset import Sample
from minimind_v.data.formats import BadSample
from minimind_v.constants import IGNORE_INDEX


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Positions of `lengths` grouped into bins of at most `capacity`; longest first, ties by position.

    Each length goes to the first bin (in opening order) with room for it. The bins, opened and not yet opened
    (an empty bin has the whole capacity), are the leaves of a max-tree of their free room, so finding that bin
    and updating its room take log(n) steps: O(n log n) in all, where scanning the open bins was O(n x bins).
    """
    if not lengths:
        return []
    too_long = max(lengths)
    if too_long > capacity:
        raise ValueError(f"a sample of {too_long} tokens does not fit a row of {capacity}")
    leaves = 1 << (len(lengths) - 1).bit_length()
    room = [capacity] * (2 * leaves)
    bins: list[list[int]] = []
    sizes = np.asarray(lengths)
    for i in np.lexsort((np.arange(len(sizes)), -sizes)).tolist():
        need, node = lengths[i], 1
        while node < leaves:  # down to the leftmost leaf with room for `need`
            node += node if room[node + node] >= need else node + 1
        slot = node - leaves
        if slot == len(bins):
            bins.append([i])
        else:
            bins[slot].append(i)
        room[node] -= need
        node >>= 1
        while node:  # the rooms above it, up to where they no longer change
            left, right = room[node + node], room[node + node + 1]
            best = left if left > right else right
            if room[node] == best:
                break
            room[node] = best
            node >>= 1
    return bins


def bucket_widths(lengths: np.ndarray, n: int, multiple: int = 8) -> tuple[int, ...]:
    """At most n padded widths for a data set's sample lengths: its n quantiles (the last one the longest sample),
    each rounded up to a multiple of `multiple`. Equal shares of the samples fall between neighbouring widths, so
    the padding they add is small where most samples are."""
    if n < 1:
        raise ValueError(f"length buckets: {n}, need at least 1")
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        return ()
    edges = np.quantile(lengths, np.arange(1, n + 1) / n, method="higher")
    return tuple(sorted({int(-(-int(e) // multiple) * multiple) for e in edges}))


def padded_width(length: int, widths: tuple[int, ...]) -> int:
    """The narrowest of the sorted `widths` that holds `length`; `length` itself when none does (or none given)."""
    return next((w for w in widths if w >= length), length)


class Collator:
    """Picklable collate_fn for DataLoader workers: drops BadSamples (returning them) and builds the batch."""

    def __init__(self, pad_id: int, pack_len: int | None = None, widths: tuple[int, ...] = (),
                 rows: int | None = None, tokens: int | None = None) -> None:
        """widths: pad each batch to the narrowest that holds it (wider batches: to their longest row);
        rows: add empty rows (padding, no labels) up to this many; tokens: batches planned by a token budget
        (BatchPlan's): up to min(rows, tokens // width) rows, so that each width has one shape."""
        self.pad_id, self.pack_len, self.widths, self.rows = pad_id, pack_len, tuple(sorted(widths)), rows
        self.tokens = tokens

    def __call__(self, items: list[Sample | BadSample]) -> dict[str, Any]:
        samples = [s for s in items if isinstance(s, Sample)]
        bad = [s for s in items if isinstance(s, BadSample)]
        if not samples:
            return {"input_ids": None, "bad": bad, "num_samples": 0}
        if self.pack_len is None:
            rows = [[s] for s in samples]
        else:
            bins = first_fit_decreasing([len(s.input_ids) for s in samples], self.pack_len)
            rows = [[samples[i] for i in sorted(b)] for b in bins]  # file order within a row
        batch = self._rows(rows)
        ordered = [s for row in rows for s in row]
        pixels = [s.pixel_values for s in ordered if s.pixel_values is not None]
        batch.update(pixel_values=torch.cat(pixels) if pixels else None,
                     images=[image for s in ordered for image in s.images],
                     sources=[s.source for s in ordered], bad=bad, num_samples=len(samples))
        return batch

    def _rows(self, rows: list[list[Sample]]) -> dict[str, torch.Tensor]:
        width = padded_width(max(sum(len(s.input_ids) for s in row) for row in rows), self.widths)
        target = self.rows or 0
        if target and self.tokens is not None:
            target = min(target, max(1, self.tokens // width))
        shape = (max(len(rows), target), width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        segment_ids = torch.zeros(shape, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for k, sample in enumerate(row, start=1):
                end = start + len(sample.input_ids)
                input_ids[r, start:end] = sample.input_ids
                labels[r, start:end] = sample.labels
                labels[r, start] = IGNORE_INDEX  # would be predicted from the previous sample's last token
                segment_ids[r, start:end] = k
                position_ids[r, start:end] = torch.arange(end - start)
                start = end
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.pack_len is None:
            batch["attention_mask"] = (segment_ids > 0).long()
        else:
            batch["segment_ids"] = segment_ids
        return batch


class BatchPlan:
    """The batches of each epoch (lists of sample indices), a function of (seed, epoch) only."""

    def __init__(self, lengths: np.ndarray, batch_size: int, mode: Literal["random", "grouped", "packed"] = "random",
                 max_seq_len: int | None = None, seed: int = 0, drop_last: bool = False,
                 group_factor: int = 50, tokens: int | None = None, widths: tuple[int, ...] = ()) -> None:
        """tokens: a token budget per batch instead of a fixed size: each batch holds as many samples (at most
        batch_size) as fit in `tokens` once padded, rows x the padded width (a sample longer than the budget is a
        batch of its own); widths: the padded widths the collator pads to (Collator's), else the longest row."""
        if mode == "packed" and max_seq_len is None:
            raise ValueError("packed batches need max_seq_len")
        if mode == "packed" and tokens is not None:
            raise ValueError("packed batches have their own budget: batch_size rows of max_seq_len")
        self.lengths, self.batch_size, self.mode = np.asarray(lengths), batch_size, mode
        self.max_seq_len, self.seed, self.drop_last, self.group_factor = max_seq_len, seed, drop_last, group_factor
        self.tokens, self.widths = tokens, tuple(sorted(widths))
        self._planned: tuple[int, list[list[int]]] | None = None

    def batches(self, epoch: int) -> list[list[int]]:
        if self._planned is None or self._planned[0] != epoch:  # only the current epoch is kept
            self._planned = (epoch, self._plan(epoch))
        return self._planned[1]

    def count(self, epoch: int) -> int:
        """How many batches epoch `epoch` has: arithmetic for random and grouped batches; a packed epoch is packed
        to know (and kept, so the epoch the run starts with is planned once)."""
        n = len(self.lengths)
        if self.mode == "packed" or self.tokens is not None:
            return len(self.batches(epoch))
        if self.mode == "random":
            full, tail = divmod(n, self.batch_size)
        else:
            mega = self.batch_size * self.group_factor
            full_megas, rest = divmod(n, mega)
            full = full_megas * self.group_factor + rest // self.batch_size
            tail = rest % self.batch_size
        return full + (1 if tail and not self.drop_last else 0)

    def _plan(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        if self.mode == "random":
            batches = self._cut(order)
        elif self.mode == "grouped":
            batches = self._grouped(order, rng)
        else:
            batches = self._packed(order, rng)
        if self.drop_last and self.mode != "packed" and self.tokens is None:  # the one short batch, wherever it is
            batches = [b for b in batches if len(b) == self.batch_size]
        return batches

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        mega = self.batch_size * self.group_factor
        batches = []
        for i in range(0, len(order), mega):
            chunk = order[i:i + mega]
            batches += self._cut(chunk[np.argsort(-self.lengths[chunk], kind="stable")])
        return [batches[k] for k in rng.permutation(len(batches))]

    def _cut(self, order: np.ndarray) -> list[list[int]]:
        """`order` cut into consecutive batches: batch_size each, or as many as fit the token budget."""
        if self.tokens is None:
            return [order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        batches: list[list[int]] = []
        batch: list[int] = []
        width = 0  # the current batch's padded width
        for i in order.tolist():
            length = int(self.lengths[i])
            grown = padded_width(max(width, length), self.widths)
            if batch and (len(batch) == self.batch_size or (len(batch) + 1) * grown > self.tokens):
                batches.append(batch)
                batch, grown = [], padded_width(length, self.widths)
            batch.append(i)
            width = grown
        return batches + ([batch] if batch else [])

    def _packed(self, order: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        """Bins from first-fit decreasing over windows of the shuffled order, batch_size bins per batch."""
        window = self.batch_size * self.group_factor * 4  # samples per packing window: several per row
        batches = []
        for i in range(0, len(order), window):
            chunk = order[i:i + window]
            bins = first_fit_decreasing(self.lengths[chunk].tolist(), self.max_seq_len)
            bins = [bins[k] for k in rng.permutation(len(bins))]
            batches += [[int(chunk[p]) for b in bins[j:j + self.batch_size] for p in b]
                        for j in range(0, len(bins), self.batch_size)]
        return [batches[k] for k in rng.permutation(len(batches))]
