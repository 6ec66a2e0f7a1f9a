"""`minimind-v synth`: a procedural image-text world small enough to learn on a CPU in minutes.

A scene is one to four objects on a 3x3 grid; each object has a colour, a shape and a size and
sits (with a little jitter) in the middle of its cell, so a vision tower whose patches tile the
cells sees one object per patch. The background carries noise and faint lines: clutter that is
never an object. Every answer is canonical (fixed words, fixed reading order, digits for counts),
so exact match is a fair score.

Answers name what they look up before what they find: "top left: red", "red circle: top left",
"top left: small red circle; center: big blue square.". The token that must say "red" then sits
right after the words that say where to look; with the bare answer ("red") those words are several
tokens back, and a tiny model trained from scratch learns the lookup more slowly. Measured with
scripts/probe_world.py and perfect symbolic image tokens (the language side alone), colour
questions, 150 s: keyed 90% in 461 steps, bare 71% in 555. Relations answer with what they found
("left, right: yes": the two columns, then the verdict); overall counts keep the bare digit.

Train and test never share a scene: the canonical scene text is hashed, and the hash alone decides
the split a scene belongs to, whatever the seed. Generation is deterministic: sample i of a split
draws from a random generator seeded by (seed, split, i), so the same seed gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from PIL import Image, ImageDraw

from minimind_v.errors import UserError

GRID = 3
MAX_OBJECTS = 4
TEST_SHARE = 8
"""One scene in TEST_SHARE (by hash) belongs to the test split."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45), "green": (40, 160, 60), "blue": (45, 85, 225),
    "yellow": (235, 200, 30), "purple": (145, 60, 185),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "big")
SIZE_FRACTION = {"small": 0.46, "big": 0.8}
"""Object diameter as a share of the cell."""

QUESTION_TYPES = ("describe", "count", "color", "shape", "size", "position", "exist", "left_of", "above")
LONG_TYPES = ("describe", "caption")
"""Types whose answer is a full description; every other answer is one to four words."""

Lang = Literal["en", "zh"]

WORDS: dict[str, dict[str, str]] = {
    "en": {
        "red": "red", "green": "green", "blue": "blue", "yellow": "yellow", "purple": "purple",
        "circle": "circle", "square": "square", "triangle": "triangle", "diamond": "diamond",
        "small": "small", "big": "big", "yes": "yes", "no": "no",
    },
    "zh": {
        "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色",
        "circle": "圆形", "square": "正方形", "triangle": "三角形", "diamond": "菱形",
        "small": "小", "big": "大", "yes": "是", "no": "否",
    },
}
POSITIONS: dict[str, tuple[str, ...]] = {
    # Cells in reading order: row by row, left to right.
    "en": ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"),
    "zh": ("左上", "上方", "右上", "左侧", "中间", "右侧", "左下", "下方", "右下"),
}

LINES: dict[str, dict[str, tuple[str, ...]]] = {
    # Columns (left to right) and rows (top to bottom), named in the answers to relation questions.
    "en": {"col": ("left", "middle", "right"), "row": ("top", "middle", "bottom")},
    "zh": {"col": ("左列", "中列", "右列"), "row": ("上行", "中行", "下行")},
}

PROMPTS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "caption": ("Caption this image.", "What is in this image?"),
        "describe": ("Describe the image in detail.", "Describe every object in the picture."),
        "count": ("How many objects are there?", "How many {color} objects are there?"),
        "color": ("What color is the object at the {pos}?",),
        "shape": ("What shape is the object at the {pos}?",),
        "size": ("Is the object at the {pos} big or small?",),
        "position": ("Where is the {color} {shape}?",),
        "exist": ("Is there a {color} {shape}?",),
        "left_of": ("Is the {a} to the left of the {b}?",),
        "above": ("Is the {a} above the {b}?",),
    },
    "zh": {
        "caption": ("请为这张图片写一句说明。", "这张图片里有什么？"),
        "describe": ("详细描述这张图片。", "描述图中的每一个物体。"),
        "count": ("图中有几个物体？", "图中有几个{color}物体？"),
        "color": ("{pos}的物体是什么颜色？",),
        "shape": ("{pos}的物体是什么形状？",),
        "size": ("{pos}的物体是大还是小？",),
        "position": ("{color}{shape}在哪里？",),
        "exist": ("图中有{color}{shape}吗？",),
        "left_of": ("{a}在{b}的左边吗？",),
        "above": ("{a}在{b}的上面吗？",),
    },
}


@dataclass(frozen=True)
class SceneObject:
    row: int
    col: int
    color: str
    shape: str
    size: str

    @property
    def cell(self) -> int:
        return self.row * GRID + self.col

    @property
    def color_shape(self) -> str:
        return f"{self.color} {self.shape}"


Scene = tuple[SceneObject, ...]
"""Objects in reading order (one per cell at most)."""


ATTRIBUTES: dict[str, tuple[str, ...]] = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES}
"""What an object is, attribute by attribute."""

CELL_LABELS: dict[str, tuple[str, ...]] = {**ATTRIBUTES,
                                           "color_shape": tuple(f"{c} {s}" for c in COLORS for s in SHAPES)}
"""What the vision tower's pretraining names in each cell (train/tower.py): every attribute, and the colour and
shape together as one of 20 classes. The pair is what "the red circle" looks up; a feature that only adds a
red part and a circle part gives a red square and a blue circle together the same evidence."""


def cell_labels(scene: Scene) -> list[list[int]]:
    """Per CELL_LABELS entry, per cell in reading order: 1 + the value's index, or 0 for an empty cell."""
    labels = [[0] * GRID ** 2 for _ in CELL_LABELS]
    for obj in scene:
        for row, (name, values) in zip(labels, CELL_LABELS.items()):
            row[obj.cell] = 1 + values.index(getattr(obj, name))
    return labels


def scene_from_record(objects: list[dict[str, object]]) -> Scene:
    """The "scene" field of a written record back into a Scene."""
    return tuple(SceneObject(**obj) for obj in objects)  # type: ignore[arg-type]


def weighted_types(weights: str | None) -> tuple[str, ...]:
    """"left_of=3,above=3" -> QUESTION_TYPES with those types repeated (a question's type is drawn uniformly
    from the tuple, so a weight is a relative frequency); None or "" -> QUESTION_TYPES unchanged."""
    counts = {t: 1 for t in QUESTION_TYPES}
    for part in filter(None, (weights or "").split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in counts or not value.strip().isdigit():
            raise UserError(f"--type-weights {part!r}: expected TYPE=N with N a whole number and TYPE one of "
                            f"{', '.join(QUESTION_TYPES)}")
        counts[name.strip()] = int(value)
    if not any(counts.values()):
        raise UserError(f"--type-weights {weights!r}: every weight is 0")
    return tuple(t for t in QUESTION_TYPES for _ in range(counts[t]))


def canonical(scene: Scene) -> str:
    return ";".join(f"{o.cell}:{o.size}-{o.color}-{o.shape}" for o in scene)


def split_of(scene: Scene) -> str:
    digest = hashlib.sha256(canonical(scene).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_SHARE == 0 else "train"


def sample_scene(rng: random.Random, split: str) -> Scene:
    """A random scene of the given split: draw until the hash puts it there (7 in 8 draws for train)."""
    while True:
        cells = sorted(rng.sample(range(GRID * GRID), rng.randint(1, MAX_OBJECTS)))
        scene = tuple(SceneObject(c // GRID, c % GRID, rng.choice(list(COLORS)), rng.choice(SHAPES),
                                  rng.choice(SIZES)) for c in cells)
        if split_of(scene) == split:
            return scene


# --- drawing ---------------------------------------------------------------------------------

def draw_scene(scene: Scene, rng: random.Random, image_size: int) -> Image.Image:
    """Noisy light background, faint lines, then each object centred in its cell with a small jitter."""
    noise = np.random.default_rng(rng.getrandbits(64))
    base = np.array([rng.randint(200, 240) for _ in range(3)], dtype=np.int16)
    pixels = base + noise.integers(-12, 13, size=(image_size, image_size, 1), dtype=np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        shade = rng.randint(150, 190)
        points = [(rng.randint(0, image_size), rng.randint(0, image_size)) for _ in range(2)]
        draw.line(points, fill=(shade, shade, shade), width=1)
    cell = image_size / GRID
    for obj in scene:
        radius = cell * SIZE_FRACTION[obj.size] / 2 * rng.uniform(0.92, 1.08)
        jitter = cell * 0.06
        cx = (obj.col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (obj.row + 0.5) * cell + rng.uniform(-jitter, jitter)
        _draw_shape(draw, obj.shape, cx, cy, radius, COLORS[obj.color])
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85  # a square of the same diameter looks bigger than the circle; shrink it to match
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


# --- language --------------------------------------------------------------------------------

def phrase(words: list[str], lang: str) -> str:
    """World words ("small", "red", "circle") in `lang`: spaced in English, run together in Chinese."""
    return ("" if lang == "zh" else " ").join(WORDS[lang][word] for word in words)


def noun_phrase(obj: SceneObject, lang: str, with_size: bool = False) -> str:
    return phrase(([obj.size] if with_size else []) + [obj.color, obj.shape], lang)


def keyed(key: str, value: str, lang: str) -> str:
    """"key: value" (full-width colon in Chinese): the answer names what it looked up, then what it found."""
    return f"{key}：{value}" if lang == "zh" else f"{key}: {value}"


def describe(scene: Scene, lang: str) -> str:
    """The canonical description: every object in reading order as "position: size colour shape"."""
    parts = [keyed(POSITIONS[lang][o.cell], noun_phrase(o, lang, True), lang) for o in scene]
    return "；".join(parts) + "。" if lang == "zh" else "; ".join(parts) + "."


def _unique(scene: Scene) -> list[SceneObject]:
    """Objects that "the <colour> <shape>" names without ambiguity."""
    keys = [(o.color, o.shape) for o in scene]
    return [o for o in scene if keys.count((o.color, o.shape)) == 1]


Question = tuple[str, str]
"""(question, answer)"""


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
    candidates = _unique(scene)
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
    is one lookup the model also makes for "where is ...?"; a bare "yes" needed both lookups and the
    comparison inside one token, and stayed near chance (65-70% on 2,000 held-out questions after the
    quickstart, every other short type at 81-100%).
    """
    def ask(scene: Scene, rng: random.Random, lang: str) -> Question | None:
        candidates = _unique(scene)
        pairs = [(a, b) for a in candidates for b in candidates if getattr(a, axis) != getattr(b, axis)]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        answer = "yes" if getattr(a, axis) < getattr(b, axis) else "no"
        kind = "left_of" if axis == "col" else "above"
        question = PROMPTS[lang][kind][0].format(a=noun_phrase(a, lang), b=noun_phrase(b, lang))
        names = LINES[lang][axis]
        found = ("、" if lang == "zh" else ", ").join(names[getattr(o, axis)] for o in (a, b))
        return question, keyed(found, WORDS[lang][answer], lang)
    return ask


ASK: dict[str, Callable[[Scene, random.Random, str], Question | None]] = {
    "describe": _ask_describe, "count": _ask_count, "color": _ask_attribute("color"),
    "shape": _ask_attribute("shape"), "size": _ask_attribute("size"), "position": _ask_position,
    "exist": _ask_exist, "left_of": _ask_relation("col"), "above": _ask_relation("row"),
}


def ask(qtype: str, scene: Scene, rng: random.Random, lang: str) -> Question | None:
    """A question of this type about the scene and its canonical answer; None where the type does not apply."""
    return ASK[qtype](scene, rng, lang)


def _ask_any(scene: Scene, rng: random.Random, lang: str, types: tuple[str, ...]) -> tuple[str, Question]:
    """A question of a random type among `types`, redrawing when a type does not apply to this scene."""
    while True:
        qtype = rng.choice(types)
        qa = ask(qtype, scene, rng, lang)
        if qa is not None:
            return qtype, qa


REDRAWS = 8
"""Draws per wanted turn before a conversation settles for fewer (distinct) questions."""


def _conversation(scene: Scene, rng: random.Random, lang: str, types: tuple[str, ...],
                  turns: int) -> list[tuple[str, Question]]:
    """Up to `turns` questions about the scene, none asked twice.

    A repeated question is answered by copying the earlier answer and teaches nothing about the image:
    drawn independently, 13% of the quickstart's turns were repeats. A scene with few distinct questions
    (one object, a heavily weighted type) gets a shorter conversation instead.
    """
    asked: list[tuple[str, Question]] = []
    for _ in range(turns * REDRAWS):
        if len(asked) == turns:
            break
        qtype, qa = _ask_any(scene, rng, lang, types)
        if all(qa[0] != earlier[0] for _, earlier in asked):
            asked.append((qtype, qa))
    return asked


# --- samples ---------------------------------------------------------------------------------

@dataclass
class Sample:
    conversations: list[dict[str, str]]
    types: list[str]
    lang: str
    scene: Scene
    image: Image.Image

    def record(self) -> dict[str, object]:
        """Everything but the image: the conversation, the first question's type and the scene it is about."""
        return {"conversations": self.conversations, "type": self.types[0], "types": self.types,
                "lang": self.lang, "scene": [dataclasses.asdict(o) for o in self.scene]}


def make_sample(seed: int, split: str, index: int, lang: str = "en", kind: str = "qa", max_turns: int = 3,
                image_size: int = 48, types: tuple[str, ...] = QUESTION_TYPES, image_place: str = "before") -> Sample:
    """Sample `index` of a split; depends only on its arguments, so any n gives the same first samples.

    The image marker goes before the first question, after it, or either ("mixed", drawn last, so the
    three settings give the same scene, image and words)."""
    rng = random.Random(f"minimind-v synth {seed} {split} {index}")
    scene = sample_scene(rng, split)
    image = draw_scene(scene, rng, image_size)
    language = rng.choice(("en", "zh")) if lang == "mix" else lang
    if kind == "mixed":
        kind = rng.choice(("caption", "qa"))
    if kind == "caption":
        turns = [("caption", (rng.choice(PROMPTS[language]["caption"]), describe(scene, language)))]
    else:
        turns = _conversation(scene, rng, language, types, rng.randint(1, max_turns))
    after = rng.random() < 0.5 if image_place == "mixed" else image_place == "after"
    conversations: list[dict[str, str]] = []
    for i, (_, (question, answer)) in enumerate(turns):
        content = question if i else f"{question}\n<image>" if after else f"<image>\n{question}"
        conversations += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return Sample(conversations, [t for t, _ in turns], language, scene, image)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


# --- command ---------------------------------------------------------------------------------

@dataclass
class SynthOptions:
    out: str
    """Directory to write into: OUT/<split>.jsonl + OUT/images/, or OUT/<split>.parquet."""
    n: int = 1000
    """Number of samples."""
    seed: int = 0
    """Random seed; the same seed writes the same bytes."""
    split: Literal["train", "test"] = "train"
    """Which half of the scene space to draw from; no scene appears in both, whatever the seeds."""
    lang: Literal["en", "zh", "mix"] = "en"
    """Language of questions and answers; mix draws one per sample."""
    kind: Literal["caption", "qa", "mixed"] = "qa"
    """caption: one description per image (pretrain); qa: questions and answers (SFT); mixed: either per sample."""
    format: Literal["jsonl", "parquet"] = "jsonl"
    """jsonl with an image folder (the original MiniMind-V layout) or one parquet file with image bytes."""
    max_turns: int = 3
    """A QA sample has 1 to this many question-answer turns; only the first turn carries the image."""
    image_size: int = 48
    """Side of the square images in pixels; 48 is the tiny preset's input, so grid cells match its patches."""
    type_weights: str | None = None
    """Relative frequency of question types, e.g. left_of=3,above=3 (unnamed types weigh 1; 0 leaves one out)."""
    image_place: Literal["before", "after", "mixed"] = "before"
    """Where the image goes in the first user turn: before the question, after it (as in the original's real
    data and OpenAI's examples), or either, half and half (docs/experiments.md: what mixed costs the quickstart)."""


def write_dataset(opts: SynthOptions) -> Path:
    """Write the data set and return the path of the jsonl or parquet file."""
    if opts.n < 1:
        raise UserError(f"--n {opts.n}: must be at least 1")
    if opts.max_turns < 1:
        raise UserError(f"--max-turns {opts.max_turns}: must be at least 1")
    if opts.image_size < 24:
        raise UserError(f"--image-size {opts.image_size}: must be at least 24 pixels")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    types = weighted_types(opts.type_weights)
    samples = (make_sample(opts.seed, opts.split, i, opts.lang, opts.kind, opts.max_turns, opts.image_size, types,
                           opts.image_place) for i in range(opts.n))
    if opts.format == "parquet":
        return _write_parquet(samples, out / f"{opts.split}.parquet")
    return _write_jsonl(samples, out / f"{opts.split}.jsonl", out / "images", opts.split)


def _write_jsonl(samples, path: Path, image_dir: Path, split: str) -> Path:
    image_dir.mkdir(exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, sample in enumerate(samples):
            name = f"{split}_{i:06d}.png"
            (image_dir / name).write_bytes(png_bytes(sample.image))
            record = {**sample.record(), "image": name}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _write_parquet(samples, path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list] = {"conversations": [], "image_bytes": [], "type": [], "types": [], "lang": [],
                                "scene": []}
    for sample in samples:
        record = sample.record()
        columns["conversations"].append(json.dumps(sample.conversations, ensure_ascii=False))
        columns["image_bytes"].append(png_bytes(sample.image))
        columns["type"].append(record["type"])
        columns["types"].append(json.dumps(record["types"]))
        columns["lang"].append(sample.lang)
        columns["scene"].append(json.dumps(record["scene"]))
    pq.write_table(pa.table(columns), path)
    return path


def main(opts: SynthOptions) -> int:
    path = write_dataset(opts)
    print(f"wrote {opts.n} {opts.split} samples ({opts.kind}, {opts.lang}) to {path}")
    return 0
