"""`minimind-v download` without the network: hub calls are monkeypatched, archives are made here."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest

from minimind_v import cli, hub
from minimind_v.errors import UserError


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


class FakeHub:
    """Stands in for huggingface_hub: records each request and writes a small file where the real one would go."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []

    def hf_hub_download(self, repo_id: str, filename: str, *, repo_type: str | None = None,
                        local_dir: Path) -> str:
        self.calls.append((repo_id, filename, repo_type))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        if filename.endswith(".zip"):
            stem = filename[: -len(".zip")]
            _zip(target, {f"{stem}/a.jpg": b"jpeg-a", f"{stem}/b.jpg": b"jpeg-b"})
        else:
            target.write_bytes(b"x")
        return str(target)

    def snapshot_download(self, repo_id: str, *, local_dir: Path, allow_patterns: list[str]) -> str:
        self.calls.append((repo_id, "*", None))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
            (Path(local_dir) / name).write_bytes(b"{}")
        return str(local_dir)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(hub, "snapshot_download", fake.snapshot_download)
    return fake


def test_all_fetches_the_original_layout(fake_hub: FakeHub, tmp_path: Path) -> None:
    assert cli.main(["download", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "clip-vit-base-patch16" / "model.safetensors").exists()
    assert (tmp_path / "llm_512.pth").exists()
    assert sorted(p.name for p in (tmp_path / "tokenizer").iterdir() if p.is_file()) == [
        "tokenizer.json", "tokenizer_config.json"]
    for stage in ("pretrain", "sft"):
        assert (tmp_path / "dataset" / f"{stage}_data.jsonl").exists()
        images = tmp_path / "dataset" / f"{stage}_images"
        assert (images / "a.jpg").read_bytes() == b"jpeg-a"  # the archive's top folder is not doubled
        assert not (tmp_path / "dataset" / f"{stage}_images.zip").exists()
    data_calls = [c for c in fake_hub.calls if c[0] == hub.DATA_REPO]
    assert data_calls and all(repo_type == "dataset" for _, _, repo_type in data_calls)
    assert not any(name.startswith(("pretrain_vlm", "sft_vlm")) for _, name, _ in fake_hub.calls)


def test_selection_and_size(fake_hub: FakeHub, tmp_path: Path) -> None:
    assert cli.main(["download", "--what", "llm", "vlm", "--size", "768", "--out", str(tmp_path)]) == 0
    names = sorted(name for _, name, _ in fake_hub.calls)
    assert names == ["llm_768.pth", "pretrain_vlm_768.pth", "sft_vlm_768.pth"]


@pytest.mark.parametrize("size, suffix", [("3v", "768"), ("3v-moe", "768_moe")])
def test_minimind_3v_assets_by_name(fake_hub: FakeHub, tmp_path: Path, size: str, suffix: str) -> None:
    assert cli.main(["download", "--what", "all", "vlm", "--size", size, "--out", str(tmp_path)]) == 0
    weights = "jingyaogong/minimind-3v-pytorch"
    assert sorted(fake_hub.calls) == sorted([
        ("jingyaogong/siglip2-base-p32-256-ve", "*", None),
        (weights, f"llm_{suffix}.pth", None), (weights, f"pretrain_vlm_{suffix}.pth", None),
        (weights, f"sft_vlm_{suffix}.pth", None),
        ("jingyaogong/minimind-3v", "tokenizer.json", None), ("jingyaogong/minimind-3v", "tokenizer_config.json", None),
        (hub.DATA_REPO, "pretrain_i2t.parquet", "dataset"), (hub.DATA_REPO, "sft_i2t.parquet", "dataset")])
    assert (tmp_path / "siglip2-base-p32-256-ve" / "model.safetensors").exists()
    assert (tmp_path / "dataset" / "sft_i2t.parquet").exists() and (tmp_path / "tokenizer" / "tokenizer.json").exists()


def test_the_3v_tower_is_the_one_its_presets_name() -> None:
    from minimind_v.presets import get_preset

    for size, preset in (("3v", "minimind-3v"), ("3v-moe", "minimind-3v-moe"), ("512", "minimind2-small-v")):
        assert hub.RELEASES[size].vision_repo == get_preset(preset).vision.name_or_path


def test_rerun_skips_unpacked_images(fake_hub: FakeHub, tmp_path: Path) -> None:
    cli.main(["download", "--what", "data-sft", "--out", str(tmp_path)])
    fake_hub.calls.clear()
    cli.main(["download", "--what", "data-sft", "--out", str(tmp_path)])
    assert [name for _, name, _ in fake_hub.calls] == ["sft_data.jsonl"]


def test_bad_choices_exit_2(fake_hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["download", "--what", "weights", "--out", str(tmp_path)]) == 2
    assert cli.main(["download", "--size", "1024", "--out", str(tmp_path)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert fake_hub.calls == []


def test_offline_is_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    # The real huggingface_hub, with HF_HUB_OFFLINE=1 (set by conftest) and an empty cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    assert cli.main(["download", "--what", "llm", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "HF_HUB_OFFLINE" in err and "llm_512.pth" in err


def test_offline_3v_is_one_line_error_naming_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    assert cli.main(["download", "--what", "vlm", "--size", "3v-moe", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "HF_HUB_OFFLINE" in err and "jingyaogong/minimind-3v-pytorch/pretrain_vlm_768_moe.pth" in err


def test_unpack_strips_matching_top_folder_only(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "x.zip", {"imgs/sub/a.jpg": b"a", "imgs/b.jpg": b"b"})
    assert hub.unpack_zip(archive, tmp_path / "imgs") == 2
    assert (tmp_path / "imgs" / "sub" / "a.jpg").read_bytes() == b"a"
    other = _zip(tmp_path / "y.zip", {"c.jpg": b"c", "d/e.jpg": b"e"})
    hub.unpack_zip(other, tmp_path / "flat")
    assert (tmp_path / "flat" / "d" / "e.jpg").read_bytes() == b"e"
    assert (tmp_path / "flat" / hub.UNPACKED_MARKER).exists()


@pytest.mark.parametrize("name", ["../evil.jpg", "imgs/../../evil.jpg", "/tmp/evil.jpg", "ok/../../evil.jpg"])
def test_unpack_refuses_path_traversal(tmp_path: Path, name: str) -> None:
    archive = _zip(tmp_path / "bad.zip", {"imgs/fine.jpg": b"f", name: b"evil"})
    dest = tmp_path / "out" / "imgs"
    with pytest.raises(UserError, match="outside"):
        hub.unpack_zip(archive, dest)
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "out" / "evil.jpg").exists()
    assert not (dest / hub.UNPACKED_MARKER).exists()


def test_unpack_refuses_symlinks(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        info = zipfile.ZipInfo("link.jpg")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    (tmp_path / "l.zip").write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match="symbolic link"):
        hub.unpack_zip(tmp_path / "l.zip", tmp_path / "out")


def test_broken_archive_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a valid zip"):
        hub.unpack_zip(tmp_path / "broken.zip", tmp_path / "out")
