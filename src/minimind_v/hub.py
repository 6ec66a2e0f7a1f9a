"""`minimind-v download`: the real assets from the Hugging Face Hub, laid out as the original project expects.

    OUT/clip-vit-base-patch16/      vision encoder (save_pretrained layout, preprocessor_config.json included)
    OUT/llm_512.pth                 MiniMind LLM weights a VLM starts from (original .pth format)
    OUT/sft_vlm_512.pth             the original's finished VLM (and pretrain_vlm_512.pth), for `convert import-upstream`
    OUT/tokenizer/                  tokenizer.json, tokenizer_config.json (vocab 6400, ChatML template)
    OUT/dataset/pretrain_data.jsonl + OUT/dataset/pretrain_images/
    OUT/dataset/sft_data.jsonl      + OUT/dataset/sft_images/

minimind-3v (--size 3v, 3v-moe) the same way, from its own repos: OUT/siglip2-base-p32-256-ve/,
OUT/llm_768.pth (llm_768_moe.pth, ...), its tokenizer in OUT/tokenizer/, and
OUT/dataset/pretrain_i2t.parquet, OUT/dataset/sft_i2t.parquet with the images inside.

Every download resumes where it stopped (huggingface_hub keeps partial files under .cache/ in the
folder it writes to), and an image archive is deleted once unpacked, so a rerun fetches only what is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from minimind_v.errors import UserError, first_line
from minimind_v.model.config import CLIP_B16, SIGLIP2_B32_256

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DATA_REPO = "jingyaogong/minimind-v_dataset"  # both generations' data
WHAT = ("vision", "llm", "vlm", "tokenizer", "data-pretrain", "data-sft")
# What `all` means: everything a user needs to train pretrain then SFT (the finished VLM only on request).
ALL = ("vision", "llm", "tokenizer", "data-pretrain", "data-sft")
# Rough download sizes, so the user knows what they are starting.
SIZES = {"vision": "0.6 GB", "llm": "0.05-0.2 GB", "vlm": "0.1-0.4 GB", "tokenizer": "0.5 MB",
         "data-pretrain": "2.7 GB (+ unpacked images)", "data-sft": "1.2 GB (+ unpacked images)"}
SIZES_3V = {**SIZES, "vision": "0.4 GB", "llm": "0.1-0.4 GB", "vlm": "0.2-0.8 GB", "data-pretrain": "4.3 GB",
            "data-sft": "4.9 GB"}


@dataclass(frozen=True)
class Release:
    """One original release: the Hub repos of its assets and what they are called there."""

    vision_repo: str
    """The frozen vision tower its presets name."""
    weights_repo: str
    """The .pth files (weights only)."""
    weights_suffix: str
    """The original names weights `{stage}_{suffix}.pth`, suffix = `{hidden}{_moe}`."""
    tokenizer_repo: str
    """The transformers-format release, which carries the tokenizer."""
    parquet: bool
    """Data as parquet with the images inside (minimind-3v), else jsonl + image archives."""
    sizes: dict[str, str]
    """Rough download size of each part."""


_MINIMIND2 = dict(vision_repo=CLIP_B16, weights_repo="jingyaogong/MiniMind2-V-PyTorch",
                  tokenizer_repo="jingyaogong/MiniMind2-V", parquet=False, sizes=SIZES)
_MINIMIND_3V = dict(vision_repo=SIGLIP2_B32_256, weights_repo="jingyaogong/minimind-3v-pytorch",
                    tokenizer_repo="jingyaogong/minimind-3v", parquet=True, sizes=SIZES_3V)
RELEASES = {
    "512": Release(weights_suffix="512", **_MINIMIND2),
    "768": Release(weights_suffix="768", **_MINIMIND2),
    "moe": Release(weights_suffix="512_moe", **_MINIMIND2),
    "3v": Release(weights_suffix="768", **_MINIMIND_3V),
    "3v-moe": Release(weights_suffix="768_moe", **_MINIMIND_3V),
}


@dataclass
class DownloadOptions:
    what: list[str] = field(default_factory=lambda: ["all"], metadata={"nargs": "+"})
    """What to fetch: any of vision, llm, vlm (the original's finished weights), tokenizer, data-pretrain, data-sft, all."""
    out: str = "downloads"
    """Directory to write into (the original layout: weights at the top, data under dataset/)."""
    size: Literal["512", "768", "moe", "3v", "3v-moe"] = "512"
    """Which original: 512, 768, moe (minimind2-small-v, minimind2-v, -small-v-moe); 3v, 3v-moe (minimind-3v)."""
    keep_archives: bool = False
    """Keep the image .zip archives after unpacking them (they are 3.7 GB together)."""


def main(opts: DownloadOptions) -> int:
    parts = _selection(opts.what)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = RELEASES[opts.size].sizes
    print(f"downloading {', '.join(f'{p} (~{sizes[p]})' for p in parts)} into {out}")
    with _offline_when_unreachable():
        for part in parts:
            for path in FETCHERS[part](out, opts):
                print(f"  {part}: {path}")
    return 0


_unreachable: list[str] = []
"""Why the Hub could not be reached, while `download` runs without it (empty: it could, or HF_HUB_OFFLINE)."""


@contextlib.contextmanager
def _offline_when_unreachable() -> Iterator[None]:
    """One quick connection to the Hub first: without one, huggingface_hub would retry each file for half a
    minute. Unreachable, the run goes on offline, so files already in the folder still count."""
    from huggingface_hub import constants

    # Behind a proxy a direct connection proves nothing: there huggingface_hub's own handling stands.
    proxied = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    why = None if _offline() or proxied else _connect_error(constants.ENDPOINT)
    if why is None:
        yield
        return
    was, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    _unreachable.append(f"{constants.ENDPOINT} cannot be reached ({why})")
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was
        _unreachable.clear()


def _connect_error(endpoint: str, timeout: float = 5.0) -> str | None:
    url = urllib.parse.urlparse(endpoint)
    try:
        socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__
    return None


def _selection(what: list[str]) -> list[str]:
    unknown = [w for w in what if w not in WHAT and w != "all"]
    if unknown:
        raise UserError(f"--what {unknown[0]!r}: expected any of {', '.join(WHAT)}, all")
    chosen = set(ALL) if "all" in what else set()
    chosen.update(w for w in what if w != "all")
    return [w for w in WHAT if w in chosen]


def _hub_call(description: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one huggingface_hub call; network and hub failures become one-line UserErrors."""
    try:
        return fn(*args, **kwargs)
    except LocalEntryNotFoundError:
        if _offline():
            raise UserError(f"cannot download {description}: HF_HUB_OFFLINE is set and it is not in the download "
                            "folder yet (unset HF_HUB_OFFLINE, then run again: downloads resume)") from None
        reason = _unreachable[0] if _unreachable else "the Hub cannot be reached"
        raise UserError(f"cannot download {description}: {reason}, and it is not in the download folder yet "
                        "(connect to the internet, then run again: downloads resume)") from None
    except HfHubHTTPError as err:
        raise UserError(f"cannot download {description}: {first_line(err)}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _file(repo: str, filename: str, local_dir: Path, repo_type: str | None = None) -> Path:
    path = _hub_call(f"{repo}/{filename}", hf_hub_download, repo, filename, repo_type=repo_type,
                     local_dir=local_dir)
    return Path(path)


def fetch_vision(out: Path, opts: DownloadOptions) -> list[Path]:
    repo = RELEASES[opts.size].vision_repo
    target = out / repo.split("/")[1]
    _hub_call(repo, snapshot_download, repo, local_dir=target, allow_patterns=["*.json", "*.txt", "model.safetensors"])
    if not (target / "model.safetensors").exists():
        # Older snapshots carry only the pickle; transformers reads it with weights_only loading.
        _file(repo, "pytorch_model.bin", target)
    return [target]


def fetch_llm(out: Path, opts: DownloadOptions) -> list[Path]:
    release = RELEASES[opts.size]
    return [_file(release.weights_repo, f"llm_{release.weights_suffix}.pth", out)]


def fetch_vlm(out: Path, opts: DownloadOptions) -> list[Path]:
    release = RELEASES[opts.size]
    return [_file(release.weights_repo, f"{stage}_vlm_{release.weights_suffix}.pth", out)
            for stage in ("pretrain", "sft")]


def fetch_tokenizer(out: Path, opts: DownloadOptions) -> list[Path]:
    target = out / "tokenizer"
    for name in TOKENIZER_FILES:
        _file(RELEASES[opts.size].tokenizer_repo, name, target)
    return [target]


def _fetch_data(out: Path, stage: str, opts: DownloadOptions) -> list[Path]:
    dataset = out / "dataset"
    if RELEASES[opts.size].parquet:
        return [_file(DATA_REPO, f"{stage}_i2t.parquet", dataset, repo_type="dataset")]
    jsonl = _file(DATA_REPO, f"{stage}_data.jsonl", dataset, repo_type="dataset")
    images = dataset / f"{stage}_images"
    if not (images / UNPACKED_MARKER).exists():
        archive = _file(DATA_REPO, f"{stage}_images.zip", dataset, repo_type="dataset")
        unpack_zip(archive, images)
        if not opts.keep_archives:
            archive.unlink()
    return [jsonl, images]


def fetch_data_pretrain(out: Path, opts: DownloadOptions) -> list[Path]:
    return _fetch_data(out, "pretrain", opts)


def fetch_data_sft(out: Path, opts: DownloadOptions) -> list[Path]:
    return _fetch_data(out, "sft", opts)


FETCHERS = {"vision": fetch_vision, "llm": fetch_llm, "vlm": fetch_vlm, "tokenizer": fetch_tokenizer,
            "data-pretrain": fetch_data_pretrain, "data-sft": fetch_data_sft}

UNPACKED_MARKER = ".unpacked"


def unpack_zip(archive: Path, dest: Path) -> int:
    """Unpack `archive` into `dest`, refusing any member that would land outside it; returns files written.

    When every member sits under one top folder named like `dest` (pretrain_images.zip holds
    pretrain_images/...), that folder is dropped so the files land in `dest` itself, not dest/dest/.
    A marker file written last lets a rerun skip an archive that was fully unpacked.
    """
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            strip = _common_top(members, dest.name)
            for member in members:
                target = _safe_target(root, member, strip, archive)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as err:
        raise UserError(f"{archive}: not a valid zip archive ({err}); delete it and download again")
    (dest / UNPACKED_MARKER).write_text(f"{archive.name}\n")
    return len(members)


def _common_top(members: list[zipfile.ZipInfo], name: str) -> str:
    prefix = name + "/"
    if members and all(m.filename.replace("\\", "/").startswith(prefix) for m in members):
        return prefix
    return ""


def _safe_target(root: Path, member: zipfile.ZipInfo, strip: str, archive: Path) -> Path:
    name = member.filename.replace("\\", "/")
    if stat.S_ISLNK(member.external_attr >> 16):
        raise UserError(f"{archive}: member {member.filename!r} is a symbolic link; refusing to unpack")
    relative = name[len(strip):] if strip else name
    target = (root / relative).resolve()
    if name.startswith("/") or ".." in Path(name).parts or not target.is_relative_to(root) or target == root:
        raise UserError(f"{archive}: member {member.filename!r} would be written outside {root}; refusing to unpack")
    return target
