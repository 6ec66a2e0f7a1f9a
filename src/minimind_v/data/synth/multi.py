"""Questions over two images (`--kind multi`): one question per record, and its answer needs both scenes.

    more    "Which image has more circles?" / "Which image has more red objects?" -> "2, 1: first": the count
            in each image, then the verdict (first, second or neither; 第一张, 第二张 or 一样多), about a shape
            or colour at least one of the images has
    both    "Is the blue square in both images?" -> "yes, no: no": in the first?, in the second?, the verdict
    change  "What changed between the images?" -> the cells in reading order, each "same" until the one that
            changed, then what: "top left: same; top: added red circle", "top left: removed red circle" or
            "top left: same; top: same; top right: red circle turned blue"
            (左上：相同；上方：新增红色圆形, 左上：移除红色圆形, 左上：红色圆形变成蓝色)

Like the relations, each answer says what it found in each image before the verdict (docs/experiments.md: a
bare verdict needs both lookups and the comparison inside one token); the change's scan makes each step one
cell's two lookups ("where" in one token was right a third of the time: docs/experiments.md, "A two-image skill
by LoRA"). For `more` the second scene is drawn on its own, so the counts compared are any two; for `both` and
`change` it is the first scene with one change: an object added (to a scene of fewer than MAX_OBJECTS), removed (from one of two or more) or
recoloured. Both scenes belong to the split asked for.

A jsonl record (two images in OUT/images/, in the order of the markers):

    {"conversations": [{"role": "user", "content": "<image>\\n<image>\\nWhat changed between the images?"},
                       {"role": "assistant", "content": "top left: same; top: added red circle"}],
     "type": "change", "types": ["change"], "lang": "en", "scenes": [[...first...], [...second...]],
     "image": "train_000000_0.png, train_000000_1.png"}

"image" lists both files as the original MiniMind-V format does ("a.png, b.png"); parquet has the same
columns with `image_bytes` a list of the two PNGs and the lists as JSON strings.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from PIL import Image

from minimind_v.data.synth.draw import draw_scene
from minimind_v.data.synth.language import POSITIONS, TWO_IMAGES, WORDS, keyed, listing, noun_phrase, steps
from minimind_v.data.synth.samples import first_turn, image_after, pick_language
from minimind_v.data.synth.world import (COLORS, GRID, MAX_OBJECTS, SHAPES, SIZES, Scene, SceneObject, edited,
                                         empty_cells, sample_scene, split_of)

MULTI_TYPES = ("more", "both", "change")

Change = tuple[str, SceneObject | None, SceneObject | None]
"""(added | removed | recolored, the object before or None, the object after or None)."""


@dataclass
class MultiSample:
    conversations: list[dict[str, str]]
    type: str
    lang: str
    scenes: tuple[Scene, Scene]
    images: list[Image.Image]

    def record(self) -> dict[str, object]:
        """Everything but the images (the layout in the module docstring)."""
        return {"conversations": self.conversations, "type": self.type, "types": [self.type], "lang": self.lang,
                "scenes": [[dataclasses.asdict(o) for o in scene] for scene in self.scenes]}


def _edits(scene: Scene) -> dict[str, list[tuple[SceneObject | None, SceneObject | None]]]:
    """Every single change the world allows, by kind, as (before, after)."""
    added = [(None, SceneObject(cell // GRID, cell % GRID, color, shape, size)) for cell in empty_cells(scene)
             for color in COLORS for shape in SHAPES for size in SIZES]
    return {"added": added if len(scene) < MAX_OBJECTS else [],
            "removed": [(obj, None) for obj in scene] if len(scene) > 1 else [],
            "recolored": [(obj, dataclasses.replace(obj, color=color)) for obj in scene
                          for color in COLORS if color != obj.color]}


def _one_change(first: Scene, rng: random.Random, split: str) -> tuple[Change, Scene] | None:
    """A change of kind drawn uniformly (among those with one) whose result is in `split`, and that result."""
    found: dict[str, list[tuple[Change, Scene]]] = {}
    for kind, edits in _edits(first).items():
        for before, after in edits:
            second = edited(first, before, after)
            if split_of(second) == split:
                found.setdefault(kind, []).append(((kind, before, after), second))
    return rng.choice(found[rng.choice(list(found))]) if found else None


def _scenes(qtype: str, rng: random.Random, split: str) -> tuple[Scene, Scene, Change | None]:
    while True:
        first = sample_scene(rng, split)
        if qtype == "more":
            return first, sample_scene(rng, split), None
        changed = _one_change(first, rng, split)
        if changed is not None:
            return first, changed[1], changed[0]


def _ask_more(first: Scene, second: Scene, rng: random.Random, lang: str) -> tuple[str, str]:
    attribute = rng.choice(("shape", "color"))
    value = rng.choice(sorted({getattr(o, attribute) for o in first + second}))
    counts = [sum(getattr(o, attribute) == value for o in scene) for scene in (first, second)]
    verdict = "first" if counts[0] > counts[1] else "second" if counts[1] > counts[0] else "neither"
    words = TWO_IMAGES[lang]
    question = words[f"more_{attribute}"].format(**{attribute: WORDS[lang][value]})
    return question, keyed(listing([str(c) for c in counts], lang), words[verdict], lang)


def _ask_both(first: Scene, second: Scene, rng: random.Random, lang: str) -> tuple[str, str]:
    """Half the time (where there is one) a colour and shape both images have, else one only one of them has."""
    present = [{(o.color, o.shape) for o in scene} for scene in (first, second)]
    in_both, in_one = sorted(present[0] & present[1]), sorted(present[0] ^ present[1])
    color, shape = rng.choice(in_both if in_both and (not in_one or rng.random() < 0.5) else in_one)
    w = WORDS[lang]
    found = [w["yes" if (color, shape) in p else "no"] for p in present]
    question = TWO_IMAGES[lang]["both"].format(color=w[color], shape=w[shape])
    return question, keyed(listing(found, lang), w["yes" if (color, shape) in in_both else "no"], lang)


def _ask_change(change: Change, lang: str) -> tuple[str, str]:
    kind, before, after = change
    obj = before if before is not None else after
    assert obj is not None
    words = TWO_IMAGES[lang]
    color = WORDS[lang][after.color] if after is not None else ""
    what = words[kind].format(obj=noun_phrase(obj, lang), color=color)
    scan = [keyed(POSITIONS[lang][cell], words["same"], lang) for cell in range(obj.cell)]
    return words["change"], steps([*scan, keyed(POSITIONS[lang][obj.cell], what, lang)], lang)


def make_multi(seed: int, split: str, index: int, lang: str = "en", image_size: int = 48,
               types: tuple[str, ...] = MULTI_TYPES, image_place: str = "before") -> MultiSample:
    """Record `index` of a split; depends only on its arguments (its own random stream, apart from make_sample's)."""
    rng = random.Random(f"minimind-v synth multi {seed} {split} {index}")
    qtype = rng.choice(types)
    first, second, change = _scenes(qtype, rng, split)
    images = [draw_scene(scene, rng, image_size) for scene in (first, second)]
    language = pick_language(rng, lang)
    if change is not None and qtype == "change":
        question, answer = _ask_change(change, language)
    else:
        question, answer = (_ask_more if qtype == "more" else _ask_both)(first, second, rng, language)
    conversations = [{"role": "user", "content": first_turn(question, image_after(rng, image_place), 2)},
                     {"role": "assistant", "content": answer}]
    return MultiSample(conversations, qtype, language, (first, second), images)
