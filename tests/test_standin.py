"""`synth --like`: stand-ins of the original MiniMind-V data at its real sizes, in the original layout."""

import hashlib
import io
import json
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minimind_v import cli
from minimind_v.constants import IMAGE_MARKER
from minimind_v.data.formats import open_dataset
from minimind_v.data.synth import SynthOptions, write_dataset
from minimind_v.data.synth.standin import (CHARACTERS, PRETRAIN_PROMPTS, PROFILES, WORDS, TextStream, conversation,
                                           write_standin)
from minimind_v.data.synth.standin_images import Look, jpeg_bytes
from minimind_v.errors import UserError

TEXT = set(CHARACTERS) | set("".join(WORDS)) | set("，。？")


def _like(tmp_path: Path, like: str, n: int, seed: int = 0) -> Path:
    return write_dataset(SynthOptions(out=str(tmp_path), n=n, seed=seed, like=like))


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_image(path: Path) -> None:
    with Image.open(path) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (128, 128))


def test_the_choices_of_like_are_the_profiles():
    (like,) = [a for a in typing.get_args(typing.get_type_hints(SynthOptions)["like"]) if a is not type(None)]
    assert set(typing.get_args(like)) == set(PROFILES)


def test_pretrain_stand_in_reads_back_in_the_original_layout(tmp_path):
    path = _like(tmp_path, "minimind-v-pretrain", 40)
    assert path == tmp_path / "pretrain_data.jsonl"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrain_data.jsonl", "pretrain_images"]
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert all(list(r) == ["conversations", "image"] for r in records)
    reader = open_dataset(path, tmp_path / "pretrain_images")
    assert len(reader) == 40
    names = set()
    for i in range(len(reader)):
        raw = reader[i]
        (name,) = raw.images
        assert name == f"GCC_train_{i:09d}.jpg"
        _check_image(reader.images_dir / name)
        names.add(name)
        user, answer = raw.conversations
        assert (user["role"], answer["role"]) == ("user", "assistant")
        prompt, marker = user["content"].split("\n")
        assert prompt in PRETRAIN_PROMPTS and marker == IMAGE_MARKER
        assert IMAGE_MARKER not in answer["content"] and answer["content"].endswith("。")
        assert set(answer["content"]) <= TEXT
    assert len(names) == 40 == len(list((tmp_path / "pretrain_images").iterdir()))


def test_sft_stand_in_shows_each_image_twice_with_some_text_only_and_multi_turn(tmp_path):
    n = 200
    reader = open_dataset(_like(tmp_path, "minimind-v-sft", n), tmp_path / "sft_images")
    assert reader.path.name == "sft_data.jsonl" and len(reader) == n
    assert len(list((tmp_path / "sft_images").iterdir())) == n // 2
    text_only, multi_turn = 0, 0
    for i in range(n):
        raw = reader[i]
        turns = raw.conversations
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert 1 <= len(turns) // 2 <= len(PROFILES["minimind-v-sft"].turns)
        multi_turn += len(turns) > 2
        assert all(IMAGE_MARKER not in t["content"] for t in turns[1:])
        assert all(set(t["content"].replace(IMAGE_MARKER, "")) <= TEXT for t in turns)
        if not raw.images:
            assert i % 2 == 1 and turns[0]["content"].endswith("？")  # the first on an image always shows it
            text_only += 1
            continue
        assert raw.images == [f"train-00000-of-00001_image_{i // 2}_0.jpg"]
        assert turns[0]["content"].endswith("？" + IMAGE_MARKER) and turns[0]["content"].count(IMAGE_MARKER) == 1
        _check_image(reader.images_dir / raw.images[0])
    assert 0 < text_only < n // 5 and n // 5 < multi_turn < n * 3 // 5


def test_the_same_seed_writes_the_same_bytes_whatever_the_workers(tmp_path):
    serial = write_standin("minimind-v-sft", 50, 3, tmp_path / "serial", workers=1)
    pooled = write_standin("minimind-v-sft", 50, 3, tmp_path / "pooled", workers=2, chunk=7)
    assert (serial.images, pooled.images) == (25, 25) and serial.image_bytes == pooled.image_bytes
    assert _digest(tmp_path / "serial") == _digest(tmp_path / "pooled")
    _like(tmp_path / "again", "minimind-v-sft", 50, seed=3)
    assert _digest(tmp_path / "again") == _digest(tmp_path / "serial")
    _like(tmp_path / "fewer", "minimind-v-sft", 20, seed=3)  # fewer samples: the same first ones
    lines = (tmp_path / "serial" / "sft_data.jsonl").read_text(encoding="utf-8").splitlines()
    assert (tmp_path / "fewer" / "sft_data.jsonl").read_text(encoding="utf-8").splitlines() == lines[:20]
    _like(tmp_path / "other", "minimind-v-sft", 50, seed=4)
    other = _digest(tmp_path / "other")
    assert not set(other.values()) & set(_digest(tmp_path / "serial").values())


@pytest.mark.parametrize("like", sorted(PROFILES))
def test_lengths_follow_the_intended_distribution(like):
    profile, rng = PROFILES[like], np.random.default_rng(0)
    text = TextStream(rng)
    conversations = [conversation(rng, text, profile, with_image=True) for _ in range(3000)]
    answers = np.array([len(t["content"]) for c in conversations for t in c[1::2]])
    questions = np.array([len(t["content"]) for c in conversations for t in c[2::2]])  # drawn, not the first
    for lengths, drawn in ((profile.answer, answers), (profile.question, questions)):
        if not len(drawn):
            continue
        assert lengths.low <= drawn.min() and drawn.max() <= lengths.high
        assert abs(np.median(drawn) - lengths.median) <= 0.1 * lengths.median + 1
        log_spread = np.std(np.log(drawn[(drawn > lengths.low) & (drawn < lengths.high)]))
        assert abs(log_spread - lengths.spread) < 0.25 * lengths.spread
    shares = np.bincount([len(c) // 2 for c in conversations], minlength=len(profile.turns) + 1)[1:] / 3000
    assert np.allclose(shares, np.array(profile.turns) / sum(profile.turns), atol=0.03)


def test_jpegs_are_distinct_and_of_the_intended_mean_size():
    images = [jpeg_bytes(Look(), 0, 1, i) for i in range(400)]
    sizes = np.array([len(b) for b in images])
    assert 4000 <= sizes.mean() <= 6000 and sizes.std() > 300  # a photo folder's sizes spread
    assert len(set(images)) == len(images)
    with Image.open(io.BytesIO(images[0])) as image:
        assert np.asarray(image).std() > 10  # not a flat picture


@pytest.mark.parametrize("option", [{"kind": "caption"}, {"format": "parquet"}, {"lang": "zh"}, {"split": "test"},
                                    {"image_size": 128}, {"max_turns": 2}, {"type_weights": "count=2"},
                                    {"image_place": "after"}])
def test_options_without_meaning_for_a_stand_in_are_refused(tmp_path, option):
    opts = SynthOptions(out=str(tmp_path / "out"), n=4, like="minimind-v-pretrain", **option)
    with pytest.raises(UserError) as err:
        write_dataset(opts)
    (name,) = option
    message = str(err.value)
    assert message.startswith(f"--{name.replace('_', '-')} ") and "--like" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_the_command_line_writes_a_stand_in_and_refuses_bad_combinations(tmp_path, capsys):
    assert cli.main(["synth", "--like", "minimind-v-sft", "--n", "6", "--out", str(tmp_path), "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "6 samples like minimind-v-sft (3 images" in out and "images/s" in out
    assert len(list((tmp_path / "sft_images").iterdir())) == 3
    assert cli.main(["synth", "--like", "minimind-v-sft", "--n", "0", "--out", str(tmp_path)]) == 2
    assert cli.main(["synth", "--like", "minimind-v-pretrain", "--kind", "caption", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 2 and "--kind caption: has no meaning with --like" in err
