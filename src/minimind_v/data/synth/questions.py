"""Questions about a scene, each with its one canonical answer, and conversations of distinct questions."""

from __future__ import annotations

import random
from typing import Callable

from minimind_v.data.synth.language import (LINES, POSITIONS, PROMPTS, WORDS, describe, keyed, listing, noun_phrase,
                                            phrase)
from minimind_v.data.synth.world import COLORS, SHAPES, Scene, SceneObject
from minimind_v.errors import UserError

QUESTION_TYPES = ("describe", "count", "color", "shape", "size", "position", "exist", "left_of", "above")
LONG_TYPES = ("describe", "caption")
"""Types whose answer is a full description; every other answer is one to four words."""

Question = tuple[str, str]
"""(question, answer)"""


def weighted_types(weights: str | None, names: tuple[str, ...] = QUESTION_TYPES) -> tuple[str, ...]:
    """"left_of=3,above=3" -> `names` with those types repeated (a question's type is drawn uniformly
    from the tuple, so a weight is a relative frequency); None or "" -> `names` unchanged."""
    counts = {t: 1 for t in names}
    for part in filter(None, (weights or "").split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in counts or not value.strip().isdigit():
            raise UserError(f"--type-weights {part!r}: expected TYPE=N with N a whole number and TYPE one of "
                            f"{', '.join(names)}")
        counts[name.strip()] = int(value)
    if not any(counts.values()):
        raise UserError(f"--type-weights {weights!r}: every weight is 0")
    return tuple(t for t in names for _ in range(counts[t]))


def unambiguous(scene: Scene) -> list[SceneObject]:
    """Objects that "the <colour> <shape>" names without ambiguity."""
    keys = [(o.color, o.shape) for o in scene]
    return [o for o in scene if keys.count((o.color, o.shape)) == 1]


def _ask_describe(scene: Scene, rng: random.Random, lang: str) -> Question:
    return rng.choice(PROMPTS[lang]["describe"]), describe(scene, lang)


def _ask_count(scene: Scene, rng: random.Random, lang: str) -> Question:
    by_color, overall = PROMPTS[lang]["count"][1], PROMPTS[lang]["count"][0]
    if rng.random() < 0.5:
        return overall, str(len(scene))
    color = rng.choice(list(COLORS))
    return (by_color.format(color=WORDS[lang][color]),
            keyed(WORDS[lang][color], str(sum(o.color == color for o in scene)), lang))


def _ask_attribute(attribute: str) -> Callable[[Scene, random.Random, str], Question]:
    def ask(scene: Scene, rng: random.Random, lang: str) -> Question:
        obj = rng.choice(scene)
        question = PROMPTS[lang][attribute][0].format(pos=POSITIONS[lang][obj.cell])
        return question, keyed(POSITIONS[lang][obj.cell], WORDS[lang][getattr(obj, attribute)], lang)
    return ask


def _ask_position(scene: Scene, rng: random.Random, lang: str) -> Question | None:
    candidates = unambiguous(scene)
    if not candidates:
        return None
    obj = rng.choice(candidates)
    w = WORDS[lang]
    return (PROMPTS[lang]["position"][0].format(color=w[obj.color], shape=w[obj.shape]),
            keyed(noun_phrase(obj, lang), POSITIONS[lang][obj.cell], lang))


def _ask_exist(scene: Scene, rng: random.Random, lang: str) -> Question:
    present = {(o.color, o.shape) for o in scene}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
    else:
        color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
    answer = "yes" if (color, shape) in present else "no"
    w = WORDS[lang]
    return (PROMPTS[lang]["exist"][0].format(color=w[color], shape=w[shape]),
            keyed(phrase([color, shape], lang), w[answer], lang))


def _ask_relation(axis: str) -> Callable[[Scene, random.Random, str], Question | None]:
    """left_of compares columns, above compares rows; pairs on the same column (row) are never asked.

    The answer names the column (row) of each object, then the verdict: "left, right: yes". Each part
    is one lookup the model also makes for "where is ...?"; a bare "yes" would need both lookups and the
    comparison inside one token (docs/experiments.md).
    """
    def ask(scene: Scene, rng: random.Random, lang: str) -> Question | None:
        candidates = unambiguous(scene)
        pairs = [(a, b) for a in candidates for b in candidates if getattr(a, axis) != getattr(b, axis)]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        answer = "yes" if getattr(a, axis) < getattr(b, axis) else "no"
        kind = "left_of" if axis == "col" else "above"
        question = PROMPTS[lang][kind][0].format(a=noun_phrase(a, lang), b=noun_phrase(b, lang))
        names = LINES[lang][axis]
        found = listing([names[getattr(o, axis)] for o in (a, b)], lang)
        return question, keyed(found, WORDS[lang][answer], lang)
    return ask


ASK: dict[str, Callable[[Scene, random.Random, str], Question | None]] = {
    "describe": _ask_describe, "count": _ask_count, "color": _ask_attribute("color"),
    "shape": _ask_attribute("shape"), "size": _ask_attribute("size"), "position": _ask_position,
    "exist": _ask_exist, "left_of": _ask_relation("col"), "above": _ask_relation("row"),
}
"""Per question type: a question about the scene and its canonical answer, or None where the type does not apply."""


def _ask_any(scene: Scene, rng: random.Random, lang: str, types: tuple[str, ...]) -> tuple[str, Question]:
    """A question of a random type among `types`, redrawing when a type does not apply to this scene."""
    while True:
        qtype = rng.choice(types)
        qa = ASK[qtype](scene, rng, lang)
        if qa is not None:
            return qtype, qa


REDRAWS = 8
"""Draws per wanted turn before a conversation settles for fewer (distinct) questions."""


def conversation(scene: Scene, rng: random.Random, lang: str, types: tuple[str, ...],
                 turns: int) -> list[tuple[str, Question]]:
    """Up to `turns` questions about the scene, none asked twice.

    A repeated question is answered by copying the earlier answer and teaches nothing about the image.
    A scene with few distinct questions (one object, a heavily weighted type) gets a shorter conversation.
    """
    asked: list[tuple[str, Question]] = []
    for _ in range(turns * REDRAWS):
        if len(asked) == turns:
            break
        qtype, qa = _ask_any(scene, rng, lang, types)
        if all(qa[0] != earlier[0] for _, earlier in asked):
            asked.append((qtype, qa))
    return asked
