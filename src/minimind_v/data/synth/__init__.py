"""`minimind-v synth`: a procedural image-text world small enough to learn on a CPU in minutes.

A scene is one to four objects on a 3x3 grid; each object has a colour, a shape and a size and
sits (with a little jitter) in the middle of its cell, so a vision tower whose patches tile the
cells sees one object per patch. The background carries noise and faint lines: clutter that is
never an object. Every answer is canonical (fixed words, fixed reading order, digits for counts),
so exact match is a fair score.

Train and test never share a scene: the canonical scene text is hashed, and the hash alone decides
the split a scene belongs to, whatever the seed. Generation is deterministic: sample i of a split
draws from a random generator seeded by (seed, split, i), so the same seed gives the same bytes.

    world.py      scenes, the hash split, what each grid cell holds
    draw.py       a scene's pixels
    language.py   the words and canonical phrases, in English and Chinese
    questions.py  question types, each question's canonical answer, conversations
    samples.py    one sample from (seed, split, index)
    pairs.py      preference pairs for DPO: a question, its answer, and the answer with one fact wrong
    multi.py      questions over two images whose answers need both
    command.py    SynthOptions and the files written
    standin.py    --like: stand-ins of the original MiniMind-V data at its real sizes (random Chinese text of the
                  real lengths); standin_images.py: their photo-like 128x128 JPEGs, written by worker processes
    tower.py      a tower pretrained to name what covers each patch (imports torch; not re-exported here)
"""

from minimind_v.data.synth.command import SynthOptions, main, write_dataset
from minimind_v.data.synth.multi import MULTI_TYPES, MultiSample, make_multi
from minimind_v.data.synth.pairs import CORRUPTIONS, Pair, make_pair
from minimind_v.data.synth.questions import LONG_TYPES, QUESTION_TYPES, weighted_types
from minimind_v.data.synth.samples import Sample, make_sample
from minimind_v.data.synth.world import (CELL_LABELS, COLORS, GRID, SHAPES, SIZES, Scene, SceneObject, cell_labels,
                                         scene_from_record)

__all__ = [
    "CELL_LABELS", "COLORS", "CORRUPTIONS", "GRID", "LONG_TYPES", "MULTI_TYPES", "QUESTION_TYPES", "SHAPES", "SIZES",
    "MultiSample", "Pair", "Sample", "Scene", "SceneObject", "SynthOptions", "cell_labels", "main", "make_multi",
    "make_pair", "make_sample", "scene_from_record", "weighted_types", "write_dataset",
]
