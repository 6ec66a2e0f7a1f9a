"""The world itself: what a scene is, which split it belongs to, and what each grid cell holds."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

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
"""What the vision tower's pretraining names in each cell (tower.py): every attribute, and the colour and
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


def canonical(scene: Scene) -> str:
    return ";".join(f"{o.cell}:{o.size}-{o.color}-{o.shape}" for o in scene)


def split_of(scene: Scene) -> str:
    digest = hashlib.sha256(canonical(scene).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_SHARE == 0 else "train"


def edited(scene: Scene, remove: SceneObject | None = None, add: SceneObject | None = None) -> Scene:
    """The scene without `remove` and with `add`, back in reading order."""
    kept = [o for o in scene if o != remove] + ([add] if add is not None else [])
    return tuple(sorted(kept, key=lambda o: o.cell))


def empty_cells(scene: Scene) -> list[int]:
    taken = {o.cell for o in scene}
    return [cell for cell in range(GRID * GRID) if cell not in taken]


def sample_scene(rng: random.Random, split: str) -> Scene:
    """A random scene of the given split: draw until the hash puts it there (7 in 8 draws for train)."""
    while True:
        cells = sorted(rng.sample(range(GRID * GRID), rng.randint(1, MAX_OBJECTS)))
        scene = tuple(SceneObject(c // GRID, c % GRID, rng.choice(list(COLORS)), rng.choice(SHAPES),
                                  rng.choice(SIZES)) for c in cells)
        if split_of(scene) == split:
            return scene
