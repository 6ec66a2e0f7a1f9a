"""The dataset: bad records skipped and counted (up front and lazily, across workers), the run stopped when too many."""

import io
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from minimind_v.data.batching import BatchPlan, Collator
from minimind_v.data import encoded
from minimind_v.data.dataset import DataSettings, Sample, VLMDataset
from minimind_v.data.formats import BadSample, open_dataset
from minimind_v.data.images import ImagePreprocessor
from minimind_v.data.chatml import CHAT_TEMPLATE, renders_as_chatml
from minimind_v.data.template import IGNORE_INDEX, encode_conversation, encode_text
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
    settings = {"max_seq_len": 64, **settings}
    return VLMDataset(open_dataset(folder / "train.jsonl"), load_tokenizer(tokenizer_dir), IMAGE,
                      ImagePreprocessor.for_image_size(16), DataSettings(**settings))


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


def _fresh(ds, index):
    """What encoding the record again, one at a time through data/template.py, gives."""
    raw = ds.reader[int(ds.indices[index])]
    if raw.text is not None:
        return encode_text(ds.tokenizer, raw.text, ds.settings.max_seq_len)
    return encode_conversation(ds.tokenizer, raw.conversations, ds.image, len(raw.images), ds.settings.max_seq_len)


def _items(ds):
    return [(s.input_ids.tolist(), s.labels.tolist(), s.images) if isinstance(s, Sample) else str(s) for s in
            (ds[i] for i in range(len(ds)))]


@pytest.mark.parametrize("max_seq_len", [64, 57, 110, None])
def test_items_equal_encoding_each_record_again(folder, tokenizer_dir, max_seq_len):
    turns = _turns("<image>\nwhat?", "a") + _turns("and?", "b") + _turns("<image>\nthis?", "c")
    with open(folder / "train.jsonl", "a") as fh:  # three turns, two images: cut between them by 110
        fh.write(json.dumps({"conversations": turns, "image": "0.png, 1.png"}) + "\n")
        fh.write(json.dumps({"text": "plain text " * 9}) + "\n")
    ds = _dataset(folder, tokenizer_dir, max_seq_len=max_seq_len) if max_seq_len else \
        VLMDataset(open_dataset(folder / "train.jsonl"), load_tokenizer(tokenizer_dir), IMAGE,
                   ImagePreprocessor.for_image_size(16), DataSettings(max_seq_len=None))
    assert len(ds) >= 4
    for index in range(len(ds)):
        item, fresh = ds[index], _fresh(ds, index)
        assert int(ds.lengths[index]) == len(fresh.input_ids)
        if isinstance(item, BadSample):
            continue
        assert item.input_ids.tolist() == fresh.input_ids and item.labels.tolist() == fresh.labels
        assert item.input_ids.dtype == torch.long and len(item.images) == fresh.n_images


def test_the_pass_is_kept_on_disk_and_read_back_by_the_next_run(folder, tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(encoded, "CHUNK", 3)  # several chunks: the worker processes and the merge are exercised
    cache = tmp_path / "cache"
    built = _dataset(folder, tokenizer_dir, cache_dir=cache, workers=2)
    assert "encoded 10 records" in built.pass_note and "kept in" in built.pass_note
    again = _dataset(folder, tokenizer_dir, cache_dir=cache, max_seq_len=36)  # another stage's length: same key
    assert "read from" in again.pass_note and len(list(cache.iterdir())) == 1
    assert _items(again) == _items(_dataset(folder, tokenizer_dir, max_seq_len=36))  # in memory, one process
    assert _items(_dataset(folder, tokenizer_dir, cache_dir=cache)) == _items(built)
    assert [str(b) for b in built.bad_upfront] == [str(b) for b in _dataset(folder, tokenizer_dir).bad_upfront]
    restored = pickle.loads(pickle.dumps(again))  # a spawned DataLoader worker maps the files itself
    assert restored.encodings.arrays["ids"].size and _items(restored) == _items(again)
    with open(folder / "train.jsonl", "a") as fh:  # the file changed: encoded again under a new key
        fh.write(json.dumps({"conversations": _turns("hi", "there")}) + "\n")
    changed = _dataset(folder, tokenizer_dir, cache_dir=cache)
    assert "encoded 11 records" in changed.pass_note and len(list(cache.iterdir())) == 2


def test_an_image_found_missing_is_looked_for_again(folder, tokenizer_dir, tmp_path):
    cache = tmp_path / "cache"
    before = _dataset(folder, tokenizer_dir, cache_dir=cache)
    assert "missing_image" in [b.reason for b in before.bad_upfront]
    (folder / "images" / "missing.png").write_bytes(_png(5))
    after = _dataset(folder, tokenizer_dir, cache_dir=cache)
    assert "read from" in after.pass_note and "missing_image" not in [b.reason for b in after.bad_upfront]
    assert len(after) == len(before) + 1


def test_an_unwritable_cache_is_said_and_the_run_goes_on(folder, tokenizer_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    ds = _dataset(folder, tokenizer_dir, cache_dir=blocker / "cache")
    assert "not kept on disk" in ds.pass_note and len(ds) == 6


def test_a_template_the_probes_took_for_chatml_is_checked_on_real_records(folder, tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.chat_template = CHAT_TEMPLATE.replace("message['content']", "message['content'].replace('hello', 'HI')")
    lines = [{"conversations": _turns("hello", "hi")}] + [{"conversations": _turns(f"q{k}", "a")} for k in range(3)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert renders_as_chatml(tokenizer)  # the probes never say hello
    ds = VLMDataset(open_dataset(tmp_path / "d.jsonl"), tokenizer, IMAGE, None, DataSettings(text_only=True))
    assert not renders_as_chatml(tokenizer)  # the spot check of row 0 withdrew the fast path
    assert tokenizer.decode(ds[0].input_ids).count("HI") == 1


