"""The dataset: bad records skipped and counted (up front and lazily, across workers), the run stopped when too many."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from minimind_v.data.batching import BatchPlan, Collator
from minimind_v.data.dataset import DataSettings, Sample, VLMDataset
from minimind_v.data.formats import BadSample, open_dataset
from minimind_v.data.images import ImagePreprocessor
from minimind_v.data.template import IGNORE_INDEX
from minimind_v.data.tokenizer import load_tokenizer
from minimind_v.errors import UserError
from minimind_v.model.config import VLMConfig

IMAGE = VLMConfig(image_token_id=3, image_token_len=4)


def _png(seed):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _turns(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture()
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for k in range(4):
        (images / f"{k}.png").write_bytes(_png(k))
    (images / "corrupt.png").write_bytes(_png(9)[:40])
    lines = [{"conversations": _turns("<image>\nwhat?", f"square {k}"), "image": f"{k}.png"} for k in range(4)]
    lines += [{"conversations": _turns("hello", "hi")},                                       # text only: fine
              {"conversations": _turns("<image>\nwhat?", "x"), "image": "corrupt.png"},     # fails when decoded
              {"conversations": _turns("<image>\nwhat?", "x"), "image": "missing.png"},
              {"conversations": _turns("<image>\nwhat?", "x"), "image": "0.png, 1.png"},    # 1 marker, 2 images
              {"conversations": _turns("what?", "the red " * 40)}]                          # too long
    text = "\n".join(json.dumps(line) for line in lines) + "\n{broken\n"
    (tmp_path / "train.jsonl").write_text(text)
    return tmp_path


def _dataset(folder, tokenizer_dir, **settings):
    return VLMDataset(open_dataset(folder / "train.jsonl"), load_tokenizer(tokenizer_dir), IMAGE,
                      ImagePreprocessor.for_image_size(16), DataSettings(max_seq_len=64, **settings))


def test_up_front_pass_counts_bad_records(folder, tokenizer_dir):
    ds = _dataset(folder, tokenizer_dir)
    assert len(ds) == 6 and ds.lengths[:5].tolist() == [len(ds[i].input_ids) for i in range(5)]
    reasons = sorted((b.reason, b.source.rsplit(":", 1)[1]) for b in ds.bad_upfront)
    assert reasons == [("bad_json", "10"), ("marker_mismatch", "8"), ("missing_image", "7"), ("too_long", "9")]
    sample = ds[0]
    assert isinstance(sample, Sample) and sample.pixel_values.shape == (1, 3, 16, 16)
    assert sample.images == [str((folder / "images" / "0.png").resolve())]
    assert sample.input_ids.tolist().count(3) == 4 and (sample.labels != IGNORE_INDEX).any()
    assert ds[4].pixel_values is None and ds[4].images == []
    corrupt = ds[5]
    assert isinstance(corrupt, BadSample) and corrupt.reason == "bad_image"
    assert corrupt.source == f"{folder / 'train.jsonl'}:6"


def test_tracker_stops_the_run_with_counts_and_an_example(folder, tokenizer_dir):
    ds = _dataset(folder, tokenizer_dir)
    with pytest.raises(UserError, match=r"4 of 10 samples unusable .*bad_json 1.*first: .*train.jsonl:\d+"):
        ds.tracker(max_bad_fraction=0.3)
    tracker = ds.tracker(max_bad_fraction=0.45)
    tracker.add([ds[5], ds[5]])  # the same broken image met twice (two epochs) counts once
    assert tracker.summary()["reasons"]["bad_image"] == 1 and tracker.bad == 5
    with pytest.raises(UserError, match="5 of 10"):
        tracker.check()


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_drops_bad_samples_and_reports_them(folder, tokenizer_dir, workers):
    ds = _dataset(folder, tokenizer_dir)
    loader = DataLoader(ds, batch_sampler=BatchPlan(ds.lengths, 2, "packed", 64, seed=0).batches(0),
                        collate_fn=Collator(0, pack_len=64), num_workers=workers)
    served, bad = [], []
    for batch in loader:
        bad += batch["bad"]
        if batch["input_ids"] is not None:
            served += batch["sources"]
            assert batch["input_ids"].shape[1] <= 64
            n_images = 0 if batch["pixel_values"] is None else batch["pixel_values"].shape[0]
            assert n_images == len(batch["images"]) == int((batch["input_ids"] == 3).sum()) // 4
    assert len(served) == 5 and [b.reason for b in bad] == ["bad_image"]


def test_parquet_with_image_bytes_and_feature_cache_mode(tmp_path, tokenizer_dir):
    convs = [json.dumps(_turns("<image>\n<image>\nsame?", "no")), json.dumps(_turns("<image>\nok?", "yes"))]
    pq.write_table(pa.table({"conversations": convs, "image_bytes": [[_png(1), _png(2)], [b"junk"]]}),
                   tmp_path / "d.parquet")
    tok = load_tokenizer(tokenizer_dir)
    ds = VLMDataset(open_dataset(tmp_path / "d.parquet"), tok, IMAGE, ImagePreprocessor.for_image_size(16))
    assert ds[0].pixel_values.shape == (2, 3, 16, 16) and ds[0].images == [_png(1), _png(2)]
    assert isinstance(ds[1], BadSample) and ds[1].source.endswith("d.parquet:row 1")
    lazy = VLMDataset(open_dataset(tmp_path / "d.parquet"), tok, IMAGE, None, DataSettings(decode_images=False))
    assert lazy[1].pixel_values is None and lazy[1].images == [b"junk"] and lazy.images(0) == [_png(1), _png(2)]


def test_text_only_mode_drops_images(folder, tokenizer_dir):
    ds = _dataset(folder, tokenizer_dir, text_only=True)
    assert len(ds) == 8  # the image faults no longer matter; bad JSON and too long remain
    assert all(3 not in ds[i].input_ids.tolist() and ds[i].pixel_values is None for i in range(len(ds)))
    assert torch.is_tensor(ds[0].labels)


@pytest.mark.parametrize("keep_tokens", [0, 10**6])
def test_kept_encodings_equal_fresh_ones(folder, tokenizer_dir, keep_tokens):
    # The up-front pass keeps what it encoded when it fits the budget; either way an item is what encoding
    # the record again gives (ids, labels, images kept).
    ds = _dataset(folder, tokenizer_dir, keep_tokens=keep_tokens)
    assert (ds.store is not None) == (keep_tokens > 0)
    for index in range(len(ds)):
        item = ds[index]
        if isinstance(item, BadSample):
            continue
        fresh = ds._encode(ds.reader[int(ds.indices[index])])
        assert item.input_ids.tolist() == fresh.input_ids and item.labels.tolist() == fresh.labels
        assert item.input_ids.dtype == torch.long and len(item.images) == fresh.n_images


def test_encodings_over_budget_are_dropped(folder, tokenizer_dir):
    ds = _dataset(folder, tokenizer_dir, keep_tokens=12)  # not even the first sample fits
    assert ds.store is None and len(ds) == 6
