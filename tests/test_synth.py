"""The synthetic world: deterministic, split-disjoint, and every answer true of the drawn scene.

The answers are checked against an oracle written here from the question text and the scene
record alone (its own word tables), not by calling the generator's question code again.
"""

import json
import re

import numpy as np
import pytest
from PIL import Image

from minimind_v.data import synth
from minimind_v.data.synth import QUESTION_TYPES, SynthOptions, write_dataset
from minimind_v.errors import UserError

CELLS = {
    "en": ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"],
    "zh": ["左上", "上方", "右上", "左侧", "中间", "右侧", "左下", "下方", "右下"],
}
ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "circle": "圆形",
      "square": "正方形", "triangle": "三角形", "diamond": "菱形", "small": "小", "big": "大"}
RGB = {"red": (220, 45, 45), "green": (40, 160, 60), "blue": (45, 85, 225), "yellow": (235, 200, 30),
       "purple": (145, 60, 185)}


def _read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _write(tmp_path, name, **kw):
    opts = SynthOptions(out=str(tmp_path / name), **kw)
    return write_dataset(opts)


def _word(lang, english):
    return english if lang == "en" else ZH[english]


def _cell(obj):
    return obj["row"] * 3 + obj["col"]


def _find(scene, lang, phrase):
    """The object a referring phrase such as "red circle" / "红色圆形" names (unique by construction)."""
    hits = [o for o in scene if phrase == (f"{o['color']} {o['shape']}" if lang == "en"
                                            else ZH[o["color"]] + ZH[o["shape"]])]
    assert len(hits) == 1, (phrase, scene)
    return hits[0]


def _keyed(lang, key, value):
    return f"{key}：{value}" if lang == "zh" else f"{key}: {value}"


LINES = {"en": {"col": ["left", "middle", "right"], "row": ["top", "middle", "bottom"]},
         "zh": {"col": ["左列", "中列", "右列"], "row": ["上行", "中行", "下行"]}}


def _relation(lang, axis, a, b):
    """"left, right: yes": the column (row) each object is in, then whether the first comes before the second."""
    names = LINES[lang][axis]
    found = f"{names[a[axis]]}、{names[b[axis]]}" if lang == "zh" else f"{names[a[axis]]}, {names[b[axis]]}"
    yes, no = ("yes", "no") if lang == "en" else ("是", "否")
    return _keyed(lang, found, yes if a[axis] < b[axis] else no)


def _oracle(question, scene, lang):
    """The answer to one question, derived from the scene record; lookups answer "what was asked: what is there"."""
    yes, no = ("yes", "no") if lang == "en" else ("是", "否")
    at = {name: i for i, name in enumerate(CELLS[lang])}
    by_cell = {_cell(o): o for o in scene}
    en = lang == "en"
    attribute = {"color": "color", "shape": "shape", "颜色": "color", "形状": "shape"}
    patterns = [
        (r"What (color|shape) is the object at the (.+)\?" if en else r"(.+)的物体是什么(颜色|形状)？",
         lambda m: _keyed(lang, m[2] if en else m[1],
                          _word(lang, by_cell[at[m[2] if en else m[1]]][attribute[m[1] if en else m[2]]]))),
        (r"Is the object at the (.+) big or small\?" if en else r"(.+)的物体是大还是小？",
         lambda m: _keyed(lang, m[1], _word(lang, by_cell[at[m[1]]]["size"]))),
        (r"How many objects are there\?" if en else r"图中有几个物体？", lambda m: str(len(scene))),
        (r"How many (\w+) objects are there\?" if en else r"图中有几个(.+)物体？",
         lambda m: _keyed(lang, m[1], str(sum(_word(lang, o["color"]) == m[1] for o in scene)))),
        (r"Where is the (.+)\?" if en else r"(.+)在哪里？",
         lambda m: _keyed(lang, m[1], CELLS[lang][_cell(_find(scene, lang, m[1]))])),
        (r"Is there a (\w+) (\w+)\?" if en else r"图中有(..)(.+)吗？",
         lambda m: _keyed(lang, f"{m[1]} {m[2]}" if en else m[1] + m[2],
                          yes if any(_word(lang, o["color"]) == m[1] and _word(lang, o["shape"]) == m[2]
                                     for o in scene) else no)),
        (r"Is the (.+) to the left of the (.+)\?" if en else r"(.+)在(.+)的左边吗？",
         lambda m: _relation(lang, "col", _find(scene, lang, m[1]), _find(scene, lang, m[2]))),
        (r"Is the (.+) above the (.+)\?" if en else r"(.+)在(.+)的上面吗？",
         lambda m: _relation(lang, "row", _find(scene, lang, m[1]), _find(scene, lang, m[2]))),
    ]
    for pattern, answer in patterns:
        match = re.fullmatch(pattern, question)
        if match:
            return answer(match)
    return None


def _parse_description(text, lang):
    """A description back into (cell, size, colour, shape) tuples, in the order written."""
    if lang == "en":
        assert text.endswith(".")
        found = [re.fullmatch(r"([a-z ]+): (small|big) (\w+) (\w+)", part).groups() for part in text[:-1].split("; ")]
        return [(CELLS["en"].index(p), s, c, sh) for p, s, c, sh in found]
    inverse = {v: k for k, v in ZH.items()}
    found = re.findall(r"(..)：(大|小)(..)(三角形|正方形|..)[；。]", text)
    return [(CELLS["zh"].index(p), inverse[s], inverse[c], inverse[sh]) for p, s, c, sh in found]


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    a = _write(tmp_path, "a", n=12, seed=3, lang="mix")
    b = _write(tmp_path, "b", n=12, seed=3, lang="mix")
    c = _write(tmp_path, "c", n=12, seed=4, lang="mix")
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    for name in sorted(p.name for p in (tmp_path / "a" / "images").iterdir()):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    pa = _write(tmp_path, "pa", n=6, seed=3, format="parquet")
    pb = _write(tmp_path, "pb", n=6, seed=3, format="parquet")
    assert pa.read_bytes() == pb.read_bytes()


def test_train_and_test_never_share_a_scene(tmp_path):
    # One-object scenes are few (360), so without the hash split these draws would collide (~8 expected).
    train = _read_jsonl(_write(tmp_path, "d", n=400, seed=1, split="train", kind="caption"))
    test = _read_jsonl(_write(tmp_path, "d", n=400, seed=2, split="test", kind="caption"))
    key = lambda r: json.dumps(r["scene"], sort_keys=True)  # noqa: E731
    small_train = {key(r) for r in train if len(r["scene"]) == 1}
    small_test = {key(r) for r in test if len(r["scene"]) == 1}
    assert len(small_train) > 50 and len(small_test) > 20
    assert not {key(r) for r in train} & {key(r) for r in test}


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_every_answer_is_true_of_the_scene(tmp_path, lang):
    records = _read_jsonl(_write(tmp_path, lang, n=250, seed=7, lang=lang, kind="qa", image_place="before"))
    seen = set()
    for record in records:
        turns = record["conversations"]
        assert turns[0]["content"].startswith("<image>\n")
        assert all("<image>" not in t["content"] for t in turns[1:])
        for qtype, (user, assistant) in zip(record["types"], zip(turns[::2], turns[1::2])):
            seen.add(qtype)
            question = user["content"].removeprefix("<image>\n")
            if qtype == "describe":
                expected = sorted((_cell(o), o["size"], o["color"], o["shape"]) for o in record["scene"])
                assert _parse_description(assistant["content"], lang) == expected
            else:
                assert _oracle(question, record["scene"], lang) == assistant["content"], (question, record)
                assert 1 <= len(assistant["content"].split()) <= 4
    assert seen == set(QUESTION_TYPES)


def test_image_place_moves_only_the_marker(tmp_path):
    runs = {place: _read_jsonl(_write(tmp_path, place, n=60, seed=3, lang="mix", image_place=place))
            for place in ("before", "after", "mixed")}
    seen = set()
    for before, after, mixed in zip(*runs.values()):
        question = before["conversations"][0]["content"].removeprefix("<image>\n")
        assert after["conversations"][0]["content"] == f"{question}\n<image>"
        for record in (after, mixed):
            assert record["conversations"][1:] == before["conversations"][1:]
            assert {k: v for k, v in record.items() if k != "conversations"} == \
                {k: v for k, v in before.items() if k != "conversations"}
        seen.add(mixed["conversations"][0]["content"].startswith("<image>"))
    assert seen == {True, False}  # mixed has both orders
    for place in ("after", "mixed"):
        for name in ("test_000000.png", "train_000059.png"):
            if (tmp_path / "before" / "images" / name).exists():
                assert (tmp_path / place / "images" / name).read_bytes() == \
                    (tmp_path / "before" / "images" / name).read_bytes()


def test_the_image_shows_the_scene(tmp_path):
    path = _write(tmp_path, "img", n=40, seed=5, kind="caption", image_size=96)
    for record in _read_jsonl(path):
        pixels = np.asarray(Image.open(path.parent / "images" / record["image"]).convert("RGB"), dtype=int)
        assert pixels.shape == (96, 96, 3)
        objects = {_cell(o): o for o in record["scene"]}
        for cell in range(9):
            centre = pixels[(cell // 3) * 32 + 16, (cell % 3) * 32 + 16]
            if cell in objects:
                assert np.abs(centre - RGB[objects[cell]["color"]]).max() <= 2
            else:  # background or a faint line: grey-ish and light, never an object's colour
                assert centre.min() >= 135 and centre.max() - centre.min() <= 60


def test_mix_writes_both_languages_and_captions_describe(tmp_path):
    records = _read_jsonl(_write(tmp_path, "mix", n=60, seed=0, lang="mix", kind="mixed"))
    assert {r["lang"] for r in records} == {"en", "zh"}
    assert {r["type"] for r in records} >= {"caption"}
    for r in records:
        if r["type"] == "caption":
            expected = sorted((_cell(o), o["size"], o["color"], o["shape"]) for o in r["scene"])
            assert _parse_description(r["conversations"][1]["content"], r["lang"]) == expected
        if r["lang"] == "zh":
            assert re.search(r"[\u4e00-\u9fff]", r["conversations"][0]["content"])


def test_bad_counts_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--n"):
        _write(tmp_path, "bad", n=0)


def test_type_weights_change_the_mix_and_only_when_given(tmp_path):
    plain = _read_jsonl(_write(tmp_path, "p", n=300, seed=5))
    weighted = _read_jsonl(_write(tmp_path, "w", n=300, seed=5, type_weights="left_of=4,above=4,describe=0"))
    assert (tmp_path / "p" / "train.jsonl").read_bytes() == _write(tmp_path, "q", n=300, seed=5).read_bytes()
    count = lambda rows, t: sum(r["types"].count(t) for r in rows)  # noqa: E731
    assert count(weighted, "describe") == 0 < count(plain, "describe")
    assert count(weighted, "left_of") > 2 * count(plain, "left_of")
    for bad in ("left_of", "nope=2", "color=-1", "describe=0,count=0,color=0,shape=0,size=0,position=0,exist=0,"
                                                 "left_of=0,above=0"):
        with pytest.raises(UserError, match="--type-weights"):
            synth.weighted_types(bad)


def test_cell_labels_read_back_from_the_record(tmp_path):
    record = _read_jsonl(_write(tmp_path, "c", n=5, seed=1, kind="caption"))[3]
    scene = synth.scene_from_record(record["scene"])
    labels = synth.cell_labels(scene)
    assert [sum(1 for v in row if v) for row in labels] == [len(scene)] * 4
    for obj in scene:
        assert [labels[k][obj.cell] - 1 for k in range(4)] == [
            list(synth.COLORS).index(obj.color), synth.SHAPES.index(obj.shape), synth.SIZES.index(obj.size),
            list(synth.COLORS).index(obj.color) * len(synth.SHAPES) + synth.SHAPES.index(obj.shape)]


def test_a_conversation_never_repeats_a_question(tmp_path):
    # Drawn independently, 13% of the quickstart's turns repeated an earlier question of their conversation.
    records = _read_jsonl(_write(tmp_path, "turns", n=300, seed=11, lang="mix", max_turns=8,
                                 type_weights="count=2,position=3,exist=3,left_of=5,above=5"))
    turns = [[t["content"].removeprefix("<image>\n") for t in r["conversations"][::2]] for r in records]
    assert all(len(set(questions)) == len(questions) for questions in turns)
    assert sum(map(len, turns)) / len(turns) > 4  # most draw 1-8 turns and still get them
    assert max(map(len, turns)) == 8
