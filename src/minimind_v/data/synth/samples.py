"""One sample: a scene, its image, and a conversation about it, drawn from (seed, split, index) alone."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from PIL import Image

from minimind_v.constants import IMAGE_MARKER
from minimind_v.data.synth.draw import draw_scene
from minimind_v.data.synth.language import PROMPTS, describe
from minimind_v.data.synth.questions import QUESTION_TYPES, conversation
from minimind_v.data.synth.world import Scene, sample_scene


@dataclass
class Sample:
    conversations: list[dict[str, str]]
    types: list[str]
    lang: str
    scene: Scene
    image: Image.Image

    @property
    def images(self) -> list[Image.Image]:
        return [self.image]

    def record(self) -> dict[str, object]:
        """Everything but the image: the conversation, the first question's type and the scene it is about."""
        return {"conversations": self.conversations, "type": self.types[0], "types": self.types,
                "lang": self.lang, "scene": [dataclasses.asdict(o) for o in self.scene]}


def pick_language(rng: random.Random, lang: str) -> str:
    """en or zh as asked; "mix" draws one."""
    return rng.choice(("en", "zh")) if lang == "mix" else lang


def image_after(rng: random.Random, image_place: str) -> bool:
    """Whether the first user turn puts its image markers after the question ("mixed" draws)."""
    return rng.random() < 0.5 if image_place == "mixed" else image_place == "after"


def first_turn(question: str, after: bool, n_images: int = 1) -> str:
    """The first user turn: one `<image>` line per image, before the question or after it."""
    markers = "\n".join([IMAGE_MARKER] * n_images)
    return f"{question}\n{markers}" if after else f"{markers}\n{question}"


def make_sample(seed: int, split: str, index: int, lang: str = "en", kind: str = "qa", max_turns: int = 3,
                image_size: int = 48, types: tuple[str, ...] = QUESTION_TYPES, image_place: str = "before") -> Sample:
    """Sample `index` of a split; depends only on its arguments, so any n gives the same first samples.

    The image marker goes before the first question, after it, or either ("mixed", drawn last, so the
    three settings give the same scene, image and words)."""
    rng = random.Random(f"minimind-v synth {seed} {split} {index}")
    scene = sample_scene(rng, split)
    image = draw_scene(scene, rng, image_size)
    language = pick_language(rng, lang)
    if kind == "mixed":
        kind = rng.choice(("caption", "qa"))
    if kind == "caption":
        turns = [("caption", (rng.choice(PROMPTS[language]["caption"]), describe(scene, language)))]
    else:
        turns = conversation(scene, rng, language, types, rng.randint(1, max_turns))
    after = image_after(rng, image_place)
    conversations: list[dict[str, str]] = []
    for i, (_, (question, answer)) in enumerate(turns):
        content = question if i else first_turn(question, after)
        conversations += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return Sample(conversations, [t for t, _ in turns], language, scene, image)
