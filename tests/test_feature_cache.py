"""The feature cache: each distinct image encoded once, read back equal, invalidated when the tower changes."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

from minimind_v.data.feature_cache import (BrokenImage, FeatureCache, NotCached, dequantize, disk_bytes, quantize,
                                           tower_fingerprint)

SIZE, PATCH, DIM = 32, 8, 32
N_PATCHES = (SIZE // PATCH) ** 2
PREPROCESS = {"size": SIZE, "mean": 0.5, "std": 0.5}


def _tower(seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=DIM, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=SIZE, patch_size=PATCH)
    return CLIPVisionModel(cfg).eval()


def _preprocess(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.resize((SIZE, SIZE)), dtype=np.float32) / 255.0
    return (torch.from_numpy(arr).permute(2, 0, 1) - PREPROCESS["mean"]) / PREPROCESS["std"]


class CountingEncoder:
    def __init__(self, tower: CLIPVisionModel) -> None:
        self.tower, self.images = tower, 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += len(pixels)
        return self.tower(pixel_values=pixels).last_hidden_state[:, 1:]  # drop CLS, as the original


def _jpeg(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path, "JPEG")
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [_jpeg(folder / f"{i}.jpg", i) for i in range(5)]
    shutil.copy(paths[0], folder / "copy_of_0.jpg")  # same content under another name
    return paths + [folder / "copy_of_0.jpg"]


def _cache(root: Path, tower: CLIPVisionModel, dtype: str = "int8") -> FeatureCache:
    return FeatureCache(root, tower_fingerprint(tower, PREPROCESS), N_PATCHES, DIM, dtype=dtype)


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_each_distinct_image_is_encoded_once_and_reads_back_equal(tmp_path: Path, images: list[Path],
                                                                  dtype: str) -> None:
    tower = _tower()
    encoder = CountingEncoder(tower)
    cache = _cache(tmp_path / "cache", tower, dtype)
    report = cache.build(images, _preprocess, encoder, batch_size=2, shard_rows=3, log=lambda _: None)
    assert encoder.images == 5 and report.encoded == 5 and len(cache) == 5
    per_value = {"int8": 1 + 2 / DIM, "float16": 2}[dtype]
    assert report.planned_bytes == disk_bytes(5, N_PATCHES, DIM, dtype) == round(5 * N_PATCHES * DIM * per_value)
    with torch.no_grad():
        expected = encoder(torch.stack([_preprocess(Image.open(p).convert("RGB")) for p in images]))
    for path, want in zip(images, expected):
        got = cache.features(path)
        assert got.dtype == torch.float16 and got.shape == (N_PATCHES, DIM)
        if dtype == "float16":
            torch.testing.assert_close(got.float(), want.half().float())
        else:  # within half a quantisation step of each patch (plus fp16 rounding of the result)
            step = want.abs().amax(dim=-1, keepdim=True) / 127
            assert ((got.float() - want).abs() <= 0.51 * step + 2e-3 * want.abs()).all()
    assert torch.equal(cache.features(images[0]), cache.features(images[-1]))


def test_int8_rows_round_trip_within_half_a_step() -> None:
    features = torch.randn(3, 7, 64) * torch.logspace(-2, 2, 64)  # channels of very different sizes
    values, scale = quantize(features)
    back = dequantize(values.numpy(), scale.numpy()).float()
    step = scale.float()[..., None]
    assert values.dtype == torch.int8 and scale.shape == (3, 7)
    assert ((back - features).abs() <= 0.5 * step + 1e-3 * features.abs()).all()
    assert quantize(torch.zeros(1, 2, 4))[0].abs().sum() == 0  # an all-zero patch has no division by zero


def test_the_index_is_appended_never_rewritten(tmp_path: Path, images: list[Path]) -> None:
    tower = _tower()
    cache = _cache(tmp_path, tower)
    report = cache.build(images[:4], _preprocess, CountingEncoder(tower), batch_size=1, shard_rows=1,
                         log=lambda _: None)
    (first,) = cache.dir.glob("index-*.jsonl")
    lines = first.read_text().splitlines()
    assert report.index_writes == 1 and len(lines) == 1 + 4  # the path index, then one line per shard
    before = first.read_bytes()
    again = _cache(tmp_path, tower).build(images, _preprocess, CountingEncoder(tower), log=lambda _: None)
    assert again.encoded == 1 and first.read_bytes() == before and len(list(cache.dir.glob("index-*"))) == 2


def _build_share(rank: int, world: int, root: str, folder: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    tower = _tower()
    encoder = CountingEncoder(tower)
    cache = _cache(Path(root), tower)
    cache.build(sorted(Path(folder).glob("*.jpg")), _preprocess, encoder, log=lambda _: None, share=(rank, world))
    dist.barrier()
    cache.reload()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"encoded": encoder.images, "cached": len(cache)}))
    dist.destroy_process_group()


def test_ranks_build_their_shares_together(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(9):
        _jpeg(folder / f"{i}.jpg", 100 + i)
    torch.multiprocessing.spawn(_build_share, args=(2, str(tmp_path / "cache"), str(folder), str(tmp_path)),
                                nprocs=2, join=True)
    done = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [d["encoded"] for d in done] == [5, 4] and all(d["cached"] == 9 for d in done)


def test_a_later_run_reuses_the_cache(tmp_path: Path, images: list[Path]) -> None:
    tower = _tower()
    first = _cache(tmp_path / "cache", tower)
    first.build(images, _preprocess, CountingEncoder(tower), log=lambda _: None)
    encoder = CountingEncoder(tower)
    again = _cache(tmp_path / "cache", tower)  # a new process: everything comes from disk
    report = again.build(images, _preprocess, encoder, log=lambda _: None)
    assert encoder.images == 0 and report.encoded == 0 and report.reused == len(images)
    assert torch.equal(again.features(images[3]), first.features(images[3]))


def test_disk_cost_is_announced_before_encoding(tmp_path: Path, images: list[Path]) -> None:
    tower = _tower()
    events: list[str] = []
    encoder = CountingEncoder(tower)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        events.append("encode")
        return encoder(pixels)

    _cache(tmp_path, tower).build(images, _preprocess, encode, log=events.append)
    assert "5 new images" in events[0] and "KB" in events[0]
    assert events.index("encode") > 0


def test_fingerprint_follows_weights_config_and_preprocessing() -> None:
    tower = _tower()
    same = tower_fingerprint(_tower(), PREPROCESS)
    assert tower_fingerprint(tower, PREPROCESS) == same
    assert tower_fingerprint(tower, {**PREPROCESS, "size": 64}) != same
    with torch.no_grad():
        next(iter(tower.parameters())).view(-1)[0] += 1e-3
    assert tower_fingerprint(tower, PREPROCESS) != same


def test_changed_tower_gets_its_own_directory(tmp_path: Path, images: list[Path]) -> None:
    old, new = _tower(0), _tower(1)
    _cache(tmp_path / "cache", old).build(images, _preprocess, CountingEncoder(old), log=lambda _: None)
    fresh = _cache(tmp_path / "cache", new)
    with pytest.raises(NotCached):
        fresh.features(images[0])
    encoder = CountingEncoder(new)
    fresh.build(images, _preprocess, encoder, log=lambda _: None)
    assert encoder.images == 5
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_broken_images_are_reported_not_raised(tmp_path: Path, images: list[Path]) -> None:
    broken = images[0].parent / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    missing = images[0].parent / "missing.jpg"
    tower = _tower()
    cache = _cache(tmp_path / "cache", tower)
    report = cache.build(images + [broken, missing], _preprocess, CountingEncoder(tower), log=lambda _: None)
    assert set(report.broken) == {str(broken), str(missing)} and report.encoded == 5
    with pytest.raises(BrokenImage, match="broken image"):
        cache.features(broken)
    encoder = CountingEncoder(tower)
    rerun = _cache(tmp_path / "cache", tower).build([broken], _preprocess, encoder, log=lambda _: None)
    assert encoder.images == 0 and str(broken) in rerun.broken  # known broken: not decoded again


def test_a_changed_file_is_not_served_stale_features(tmp_path: Path, images: list[Path]) -> None:
    tower = _tower()
    cache = _cache(tmp_path / "cache", tower)
    cache.build(images, _preprocess, CountingEncoder(tower), log=lambda _: None)
    _jpeg(images[1], seed=99)
    os.utime(images[1], ns=(1, 1))  # a different mtime even on coarse-clock file systems
    with pytest.raises(NotCached):
        _cache(tmp_path / "cache", tower).features(images[1])


def test_images_given_as_bytes(tmp_path: Path, images: list[Path]) -> None:
    tower = _tower()
    cache = _cache(tmp_path / "cache", tower)
    blobs = [p.read_bytes() for p in images[:3]]
    cache.build(blobs, _preprocess, CountingEncoder(tower), log=lambda _: None)
    assert torch.equal(cache.features(blobs[2]), cache.features(images[2]))
    buffer = io.BytesIO()
    Image.new("RGBA", (20, 20), (1, 2, 3, 4)).save(buffer, "PNG")
    assert buffer.getvalue() not in cache


def test_interrupted_build_keeps_finished_shards(tmp_path: Path, images: list[Path]) -> None:
    tower = _tower()
    encoder = CountingEncoder(tower)

    def fails_on_second_shard(pixels: torch.Tensor) -> torch.Tensor:
        if encoder.images >= 2:
            raise KeyboardInterrupt
        return encoder(pixels)

    with pytest.raises(KeyboardInterrupt):
        _cache(tmp_path, tower).build(images, _preprocess, fails_on_second_shard, batch_size=2, shard_rows=2,
                                      log=lambda _: None)
    resumed = CountingEncoder(tower)
    report = _cache(tmp_path, tower).build(images, _preprocess, resumed, log=lambda _: None)
    assert resumed.images == 3 and report.reused == 2 + 1  # two cached, plus the duplicate of image 0


def test_a_pickled_cache_maps_its_own_shards(tmp_path: Path, images: list[Path]) -> None:
    tower = _tower()
    cache = _cache(tmp_path / "cache", tower)
    cache.build(images, _preprocess, CountingEncoder(tower), log=lambda _: None)
    want = cache.features(images[2])  # opens a shard in this process
    payload = pickle.dumps(cache)
    assert len(payload) < disk_bytes(5, N_PATCHES, DIM)  # the index travels, the features do not
    assert torch.equal(pickle.loads(payload).features(images[2]), want)
