"""The synthetic world's preference pairs (--kind pairs) and two-image questions (--kind multi).

Checked as test_synth.py checks the single-image world: against the scene records alone, through the oracle
and the description parser written there from their own word tables, and read back through the project's
own reader and chat template.
"""

import json
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image
from test_synth import CELLS, RGB, ZH, _cell, _keyed, _oracle, _parse_description, _read_jsonl, _write

from minimind_v.data.formats import open_dataset
from minimind_v.data.synth import CORRUPTIONS, scene_from_record
from minimind_v.data.synth.world import split_of
from minimind_v.data.template import encode_conversation
from minimind_v.data.tokenizer import load_tokenizer
from minimind_v.errors import UserError
from minimind_v.evaluate import long_types, read_items

EN_ZH = {"first": "第一张", "second": "第二张", "neither": "一样多", "same": "相同", "yes": "是", "no": "否", **ZH}
SHORT_TYPE = {"color": "color", "position": "position", "absent": "exist"}


@dataclass
class Placeholder:
    image_token_id: int
    image_token_len: int
    images_first: bool = False


def _w(lang, english):
    return english if lang == "en" else EN_ZH[english]


def _join(lang, parts):
    return ("、" if lang == "zh" else ", ").join(parts)


def _value(lang, answer):
    return answer.split("：" if lang == "zh" else ": ")[-1]


def _facts(scene):
    return sorted((_cell(o), o["size"], o["color"], o["shape"]) for o in scene)


def _one_fact_wrong(truth, claimed, corruption):
    """`claimed` (a description read back) is `truth` with exactly one fact of the kind `corruption` wrong."""
    assert claimed == sorted(claimed)  # still in reading order: the canonical form of some other scene
    gone, extra = [t for t in truth if t not in claimed], [t for t in claimed if t not in truth]
    cells = {t[0] for t in truth}
    if corruption == "color":  # same cell, size and shape; another colour
        assert len(gone) == len(extra) == 1 and gone[0][:2] + gone[0][3:] == extra[0][:2] + extra[0][3:]
    elif corruption == "position":  # the same object in a cell the scene leaves empty
        assert len(gone) == len(extra) == 1 and gone[0][1:] == extra[0][1:] and extra[0][0] not in cells
    else:  # one more object, of a colour and shape the scene does not have, in an empty cell
        assert not gone and len(extra) == 1 and extra[0][0] not in cells
        assert extra[0][2:] not in {t[2:] for t in truth}


def _check_pair(record):
    lang, scene = record["lang"], record["scene"]
    (turn,) = record["conversations"]
    assert turn["role"] == "user" and turn["content"].startswith("<image>\n")
    question, chosen, rejected = turn["content"].removeprefix("<image>\n"), record["chosen"], record["rejected"]
    assert rejected != chosen
    if record["type"] == "describe":
        assert _parse_description(chosen, record["lang"]) == _facts(scene)
        _one_fact_wrong(_facts(scene), _parse_description(rejected, lang), record["corruption"])
        return
    assert record["type"] == SHORT_TYPE[record["corruption"]]
    assert _oracle(question, scene, lang) == chosen != rejected  # right, and wrong, about the scene
    key = chosen[: -len(_value(lang, chosen))]
    assert rejected.startswith(key)  # what was asked stays; only the fact found changes
    wrong = _value(lang, rejected)
    if record["type"] == "color":
        assert wrong in [_w(lang, c) for c in ("red", "green", "blue", "yellow", "purple")]
    elif record["type"] == "position":
        assert CELLS[lang].index(wrong) not in {_cell(o) for o in scene}
    else:
        assert (_value(lang, chosen), wrong) == (_w(lang, "no"), _w(lang, "yes"))


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_a_pair_is_the_right_answer_and_the_same_answer_one_fact_wrong(tmp_path, lang):
    records = _read_jsonl(_write(tmp_path, lang, n=240, seed=4, lang=lang, kind="pairs"))
    for record in records:
        assert record["lang"] == lang
        _check_pair(record)
    seen = Counter((r["type"], r["corruption"]) for r in records)
    assert set(seen) == {(t, c) for c in CORRUPTIONS for t in ("describe", SHORT_TYPE[c])}
    assert min(seen.values()) > 15


def _multi_oracle(question, scenes, lang):
    """The answer to a two-image question from the two scene records; None for a question it does not know."""
    en = lang == "en"
    english = {v: k for k, v in EN_ZH.items()}
    pattern = r"Which image has more (\w+) objects\?" if en else r"哪张图片里的(..)物体更多？"
    shape_pattern = r"Which image has more (\w+)s\?" if en else r"哪张图片里的(.+)更多？"
    for attribute, match in (("color", re.fullmatch(pattern, question)),
                             ("shape", re.fullmatch(shape_pattern, question))):
        if match:
            value = match[1] if en else english[match[1]]
            a, b = (sum(o[attribute] == value for o in scene) for scene in scenes)
            return _keyed(lang, _join(lang, [str(a), str(b)]),
                          _w(lang, "first" if a > b else "second" if b > a else "neither"))
    both = r"Is the (\w+) (\w+) in both images\?" if en else r"两张图片里都有(..)(.+)吗？"
    match = re.fullmatch(both, question)
    if match:
        color, shape = (match[1], match[2]) if en else (english[match[1]], english[match[2]])
        found = [any((o["color"], o["shape"]) == (color, shape) for o in scene) for scene in scenes]
        return _keyed(lang, _join(lang, [_w(lang, "yes" if f else "no") for f in found]),
                      _w(lang, "yes" if all(found) else "no"))
    if question == ("What changed between the images?" if en else "两张图片之间有什么变化？"):
        cell, what = _the_change(scenes, lang)  # after every cell before it, in reading order, said the same
        steps = [_keyed(lang, CELLS[lang][c], _w(lang, "same")) for c in range(cell)]
        return ("；" if lang == "zh" else "; ").join([*steps, _keyed(lang, CELLS[lang][cell], what)])
    return None


def _the_change(scenes, lang):
    """(the cell, what) of the one cell in which the two scenes differ."""
    a, b = ({_cell(o): o for o in scene} for scene in scenes)
    (cell,) = [c for c in range(9) if a.get(c) != b.get(c)]
    name = lambda o: f"{o['color']} {o['shape']}" if lang == "en" else ZH[o["color"]] + ZH[o["shape"]]  # noqa: E731
    if cell not in a:
        what = f"added {name(b[cell])}" if lang == "en" else f"新增{name(b[cell])}"
    elif cell not in b:
        what = f"removed {name(a[cell])}" if lang == "en" else f"移除{name(a[cell])}"
    else:
        assert {k for k in a[cell] if a[cell][k] != b[cell][k]} == {"color"}
        new = _w(lang, b[cell]["color"])
        what = f"{name(a[cell])} turned {new}" if lang == "en" else f"{name(a[cell])}变成{new}"
    return cell, what


def _verdict(lang, qtype, answer):
    """What a two-image answer concludes: its verdict word, or the kind of change it names."""
    value = _value(lang, answer)
    if qtype != "change":
        return value
    return next(kind for kind, words in (("added", ("added ", "新增")), ("removed", ("removed ", "移除")),
                                         ("recolored", (" turned ", "变成"))) if any(w in value for w in words))


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_every_two_image_answer_is_true_of_both_scenes(tmp_path, lang):
    path = _write(tmp_path, lang, n=240, seed=6, lang=lang, kind="multi")
    records = _read_jsonl(path)
    verdicts = Counter()
    for record in records:
        user, assistant = record["conversations"]
        assert user["content"].startswith("<image>\n<image>\n") and user["content"].count("<image>") == 2
        assert len(record["image"].split(", ")) == 2 and record["types"] == [record["type"]]
        question, answer = user["content"].removeprefix("<image>\n<image>\n"), assistant["content"]
        assert _multi_oracle(question, record["scenes"], lang) == answer, record
        if record["type"] != "more":  # the second scene is the first with one change
            _the_change(record["scenes"], lang)
        last_step = answer.split("；" if lang == "zh" else "; ")[-1]
        assert not answer.endswith((".", "。")) and len(last_step.split()) <= 6
        verdicts[record["type"], _verdict(lang, record["type"], answer)] += 1
    assert set(verdicts) == {("more", _w(lang, v)) for v in ("first", "second", "neither")} | \
        {("both", _w(lang, v)) for v in ("yes", "no")} | {("change", k) for k in ("added", "removed", "recolored")}
    assert min(verdicts.values()) >= 5
    items = read_items(open_dataset(path))  # what eval asks: the question, both images, the answer, by type
    assert [(it.type, it.reference, len(it.images)) for it in items] == \
        [(r["type"], r["conversations"][1]["content"], 2) for r in records]
    assert long_types(items) == set()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_records_read_back_through_the_reader_and_the_template(tmp_path, tokenizer_dir, fmt):
    tokenizer, image = load_tokenizer(tokenizer_dir), Placeholder(3, 5)
    for kind, n_images in (("pairs", 1), ("multi", 2)):
        path = _write(tmp_path, f"{kind}-{fmt}", n=12, seed=2, lang="mix", kind=kind, format=fmt)
        jsonl = _read_jsonl(_write(tmp_path, f"{kind}-ref", n=12, seed=2, lang="mix", kind=kind))
        reader = open_dataset(path)
        assert len(reader) == 12
        for i, record in enumerate(jsonl):
            raw = reader[i]
            assert len(raw.images) == n_images and raw.conversations == record["conversations"]
            if fmt == "parquet":
                names = record["image"].split(", ")
                assert raw.images == [(tmp_path / f"{kind}-ref" / "images" / n).read_bytes() for n in names]
            answers = [record["chosen"], record["rejected"]] if kind == "pairs" else [None]
            for answer in answers:
                turns = raw.conversations + ([{"role": "assistant", "content": answer}] if answer else [])
                sample = encode_conversation(tokenizer, turns, image, n_images=len(raw.images))
                assert sample.n_images == n_images
                assert sample.input_ids.count(image.image_token_id) == n_images * image.image_token_len
    if fmt == "parquet":
        import pyarrow.parquet as pq

        columns = pq.read_table(tmp_path / "pairs-parquet" / "train.parquet").column_names
        assert columns == ["conversations", "image_bytes", "chosen", "rejected", "type", "corruption", "lang",
                           "scene"]


def test_each_image_shows_its_scene_in_marker_order(tmp_path):
    for kind in ("pairs", "multi"):
        path = _write(tmp_path, kind, n=15, seed=8, kind=kind, image_size=96)
        for record in _read_jsonl(path):
            scenes = record["scenes"] if kind == "multi" else [record["scene"]]
            for name, scene in zip(record["image"].split(", "), scenes, strict=True):
                pixels = np.asarray(Image.open(path.parent / "images" / name).convert("RGB"), dtype=int)
                for obj in scene:
                    centre = pixels[obj["row"] * 32 + 16, obj["col"] * 32 + 16]
                    assert np.abs(centre - RGB[obj["color"]]).max() <= 2


def test_train_and_test_never_share_a_scene(tmp_path):
    for kind in ("pairs", "multi"):
        scenes = {}
        for split, seed in (("train", 1), ("test", 2)):
            records = _read_jsonl(_write(tmp_path, f"{kind}-{split}", n=300, seed=seed, split=split, kind=kind))
            found = [s for r in records for s in (r["scenes"] if kind == "multi" else [r["scene"]])]
            assert all(split_of(scene_from_record(s)) == split for s in found)  # both scenes of a multi record
            scenes[split] = {json.dumps(s, sort_keys=True) for s in found}
        assert len(scenes["test"]) > 200 and not scenes["train"] & scenes["test"]


def test_same_seed_same_bytes_and_a_longer_run_starts_the_same(tmp_path):
    for kind in ("pairs", "multi"):
        a = _write(tmp_path, f"{kind}-a", n=10, seed=3, lang="mix", kind=kind, image_place="mixed")
        b = _write(tmp_path, f"{kind}-b", n=10, seed=3, lang="mix", kind=kind, image_place="mixed")
        c = _write(tmp_path, f"{kind}-c", n=10, seed=4, lang="mix", kind=kind, image_place="mixed")
        longer = _write(tmp_path, f"{kind}-l", n=14, seed=3, lang="mix", kind=kind, image_place="mixed")
        assert a.read_bytes() == b.read_bytes() != c.read_bytes()
        assert longer.read_text(encoding="utf-8").startswith(a.read_text(encoding="utf-8"))
        images = sorted(p.name for p in (a.parent / "images").iterdir())
        assert len(images) == 10 * (2 if kind == "multi" else 1)
        for name in images:
            assert (a.parent / "images" / name).read_bytes() == (b.parent / "images" / name).read_bytes()
        pa, pb = (_write(tmp_path, f"{kind}-p{x}", n=5, seed=3, kind=kind, format="parquet") for x in "ab")
        assert pa.read_bytes() == pb.read_bytes()


def test_mix_writes_both_languages(tmp_path):
    for kind in ("pairs", "multi"):
        records = _read_jsonl(_write(tmp_path, kind, n=40, seed=0, lang="mix", kind=kind))
        assert {r["lang"] for r in records} == {"en", "zh"}
        for r in records:
            chinese = re.search(r"[\u4e00-\u9fff]", r["conversations"][0]["content"]) is not None
            assert chinese == (r["lang"] == "zh")


def test_options_of_the_new_kinds(tmp_path):
    after = _read_jsonl(_write(tmp_path, "after", n=30, seed=5, kind="multi", image_place="after",
                               type_weights="change=0,both=2"))
    assert all(r["conversations"][0]["content"].endswith("?\n<image>\n<image>") for r in after)
    assert {r["type"] for r in after} == {"more", "both"}
    pairs_after = _read_jsonl(_write(tmp_path, "pa", n=10, seed=5, kind="pairs", image_place="after"))
    assert all(re.fullmatch(r"[^\n]+\n<image>", r["conversations"][0]["content"]) for r in pairs_after)
    with pytest.raises(UserError, match="--type-weights"):
        _write(tmp_path, "bad", n=3, kind="multi", type_weights="count=2")
    with pytest.raises(UserError, match="--type-weights"):
        _write(tmp_path, "bad", n=3, kind="pairs", type_weights="color=2")
