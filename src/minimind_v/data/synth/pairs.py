"""Preference pairs for DPO (`--kind pairs`): one question about a scene, its right answer and a wrong one.

The wrong (rejected) answer is the right answer to the same question about the scene with exactly one fact
corrupted, so it keeps the canonical form and differs from the chosen answer in that fact alone:

    color     one object recoloured: "top left: red" -> "top left: blue", or that word in a description
    position  one object moved to an empty cell: "red circle: top left" -> "red circle: bottom"
    absent    an object the scene does not have (a colour and shape absent from it) added in an empty
              cell: "blue square: no" -> "blue square: yes", or one more entry in a description

Half the pairs ask for the description (type "describe"), half the short question that asks about the
corrupted fact (color -> "color", position -> "position", absent -> "exist"); a moved object no phrase names
alone is asked about through the description.

A jsonl record (images in OUT/images/, one per pair):

    {"conversations": [{"role": "user", "content": "<image>\\nWhat color is the object at the top left?"}],
     "chosen": "top left: red", "rejected": "top left: blue", "type": "color", "corruption": "color",
     "lang": "en", "scene": [{"row": 0, "col": 0, "color": "red", "shape": "circle", "size": "big"}],
     "image": "train_000000.png"}

`conversations` is the prompt: every turn before the answer (a system turn may lead, as in any conversation),
ending with the user turn; the prompt followed by an assistant turn holding `chosen` (or `rejected`) is a
complete training conversation. Parquet has the same columns, with `image_bytes` in place of `image` and
the lists as JSON strings.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Callable

from PIL import Image

from minimind_v.data.synth.draw import draw_scene
from minimind_v.data.synth.language import POSITIONS, PROMPTS, WORDS, describe, keyed, noun_phrase
from minimind_v.data.synth.questions import unambiguous
from minimind_v.data.synth.samples import first_turn, image_after, pick_language
from minimind_v.data.synth.world import (COLORS, GRID, SHAPES, SIZES, Scene, SceneObject, edited, empty_cells,
                                         sample_scene)

CORRUPTIONS = ("color", "position", "absent")
SHORT_QUESTION = {"color": "color", "position": "position", "absent": "exist"}
"""The short question whose answer states the fact each corruption gets wrong."""


@dataclass
class Pair:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    type: str
    corruption: str
    lang: str
    scene: Scene
    images: list[Image.Image]
    """The one image, in a list as every kind of record has them."""

    def record(self) -> dict[str, object]:
        """Everything but the image (the layout in the module docstring)."""
        return {"conversations": self.prompt, "chosen": self.chosen, "rejected": self.rejected, "type": self.type,
                "corruption": self.corruption, "lang": self.lang,
                "scene": [dataclasses.asdict(o) for o in self.scene]}


Corrupt = Callable[[Scene, random.Random], tuple[SceneObject, Scene]]
"""-> (the object the question asks about, the scene with one fact wrong)."""


def _recolor(scene: Scene, rng: random.Random) -> tuple[SceneObject, Scene]:
    obj = rng.choice(scene)
    color = rng.choice([c for c in COLORS if c != obj.color])
    return obj, edited(scene, obj, dataclasses.replace(obj, color=color))


def _move(scene: Scene, rng: random.Random) -> tuple[SceneObject, Scene]:
    obj = rng.choice(unambiguous(scene) or scene)
    cell = rng.choice(empty_cells(scene))
    return obj, edited(scene, obj, dataclasses.replace(obj, row=cell // GRID, col=cell % GRID))


def _add_absent(scene: Scene, rng: random.Random) -> tuple[SceneObject, Scene]:
    present = {(o.color, o.shape) for o in scene}
    color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
    cell = rng.choice(empty_cells(scene))
    ghost = SceneObject(cell // GRID, cell % GRID, color, shape, rng.choice(SIZES))
    return ghost, edited(scene, add=ghost)


CORRUPT: dict[str, Corrupt] = {"color": _recolor, "position": _move, "absent": _add_absent}


def _question(qtype: str, target: SceneObject, rng: random.Random, lang: str) -> str:
    if qtype == "describe":
        return rng.choice(PROMPTS[lang]["describe"])
    w = WORDS[lang]
    return PROMPTS[lang][qtype][0].format(pos=POSITIONS[lang][target.cell], color=w[target.color],
                                          shape=w[target.shape])


def answer(qtype: str, target: SceneObject, scene: Scene, lang: str) -> str:
    """The canonical answer to the question about `target`, as true of `scene` (the real one or a corrupted one)."""
    if qtype == "describe":
        return describe(scene, lang)
    if qtype == "color":
        found = next(o for o in scene if o.cell == target.cell)
        return keyed(POSITIONS[lang][found.cell], WORDS[lang][found.color], lang)
    same = [o for o in scene if (o.color, o.shape) == (target.color, target.shape)]
    if qtype == "position":
        return keyed(noun_phrase(target, lang), POSITIONS[lang][same[0].cell], lang)
    return keyed(noun_phrase(target, lang), WORDS[lang]["yes" if same else "no"], lang)


def make_pair(seed: int, split: str, index: int, lang: str = "en", image_size: int = 48,
              image_place: str = "before") -> Pair:
    """Pair `index` of a split; depends only on its arguments (its own random stream, apart from make_sample's)."""
    rng = random.Random(f"minimind-v synth pairs {seed} {split} {index}")
    scene = sample_scene(rng, split)
    image = draw_scene(scene, rng, image_size)
    language = pick_language(rng, lang)
    corruption = rng.choice(CORRUPTIONS)
    target, wrong = CORRUPT[corruption](scene, rng)
    named = corruption != "position" or target in unambiguous(scene)
    qtype = SHORT_QUESTION[corruption] if named and rng.random() < 0.5 else "describe"
    question = _question(qtype, target, rng, language)
    prompt = [{"role": "user", "content": first_turn(question, image_after(rng, image_place))}]
    return Pair(prompt, answer(qtype, target, scene, language), answer(qtype, target, wrong, language), qtype,
                corruption, language, scene, [image])
