"""The world's words in English and Chinese, and the canonical phrases answers are built from.

Answers name what they look up before what they find ("top left: red", "red circle: top left"), so the
token that must say "red" sits right after the words that say where to look (docs/experiments.md).
"""

from __future__ import annotations

from minimind_v.data.synth.world import Scene, SceneObject

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


TWO_IMAGES: dict[str, dict[str, str]] = {
    # Questions over two images (multi.py) and the words of their answers.
    "en": {"more_shape": "Which image has more {shape}s?", "more_color": "Which image has more {color} objects?",
           "both": "Is the {color} {shape} in both images?", "change": "What changed between the images?",
           "first": "first", "second": "second", "neither": "neither", "same": "same",
           "added": "added {obj}", "removed": "removed {obj}", "recolored": "{obj} turned {color}"},
    "zh": {"more_shape": "哪张图片里的{shape}更多？", "more_color": "哪张图片里的{color}物体更多？",
           "both": "两张图片里都有{color}{shape}吗？", "change": "两张图片之间有什么变化？",
           "first": "第一张", "second": "第二张", "neither": "一样多", "same": "相同",
           "added": "新增{obj}", "removed": "移除{obj}", "recolored": "{obj}变成{color}"},
}


def lexicon(lang: str) -> list[str]:
    """The words answers are built from: colours, shapes, sizes, yes/no, cells, rows and columns."""
    return [*WORDS[lang].values(), *POSITIONS[lang], *LINES[lang]["col"], *LINES[lang]["row"]]


def phrase(words: list[str], lang: str) -> str:
    """World words ("small", "red", "circle") in `lang`: spaced in English, run together in Chinese."""
    return ("" if lang == "zh" else " ").join(WORDS[lang][word] for word in words)


def noun_phrase(obj: SceneObject, lang: str, with_size: bool = False) -> str:
    return phrase(([obj.size] if with_size else []) + [obj.color, obj.shape], lang)


def listing(parts: list[str], lang: str) -> str:
    """What an answer found, one part per lookup: "left, right" ("左列、右列" in Chinese)."""
    return ("、" if lang == "zh" else ", ").join(parts)


def keyed(key: str, value: str, lang: str) -> str:
    """"key: value" (full-width colon in Chinese): the answer names what it looked up, then what it found."""
    return f"{key}：{value}" if lang == "zh" else f"{key}: {value}"


def steps(parts: list[str], lang: str) -> str:
    """An answer's keyed parts one after another: "top left: ...; top: ..." ("；" in Chinese)."""
    return ("；" if lang == "zh" else "; ").join(parts)


def describe(scene: Scene, lang: str) -> str:
    """The canonical description: every object in reading order as "position: size colour shape"."""
    parts = [keyed(POSITIONS[lang][o.cell], noun_phrase(o, lang, True), lang) for o in scene]
    return steps(parts, lang) + ("。" if lang == "zh" else ".")
