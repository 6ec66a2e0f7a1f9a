"""Stand-ins of the original MiniMind-V data at its real sizes, for benchmarks and scale tests (not for learning).

`synth --like minimind-v-pretrain --n 595000` writes OUT/pretrain_data.jsonl + OUT/pretrain_images/ in the
original layout: one caption sample per 128x128 JPEG, the user turn one of the original's brief-description
prompts followed by "\\n<image>", the caption random Chinese words and characters of a real caption's length.
`--like minimind-v-sft --n 300000` writes OUT/sft_data.jsonl + OUT/sft_images/: 1 to 5 turns of random
Chinese questions and answers, the image marker right after the first question ("...？<image>"), two
conversations to an image (300K conversations over 150K images, as in the original) and a few text-only.

Lengths are in characters, log-normal and clipped. With the original tokenizer and chat template a pretrain
sample is about 47 text tokens beside its 196 image tokens, an SFT conversation about 300 tokens in all,
near what bench.py's TEXT_LENGTHS takes for the real lengths. The jsonl is written as it is drawn,
while worker processes write the JPEGs. Sample i depends on the seed and the samples before it (any n gives
the same first samples); image i on (seed, kind, i) alone.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minimind_v.constants import IMAGE_MARKER
from minimind_v.data.synth.standin_images import ImageJob, Look, images_in_background, workers_available
from minimind_v.errors import UserError

CHARACTERS = "".join(dict.fromkeys(
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小心"
    "多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分"
    "将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因"
    "重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书"
    "比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今"
    "京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六"
    "功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即"
    "求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友孩"
    "站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组造落视济喜离虽坏兴切照复注"))
"""Single characters of the fixed set the stand-in text is drawn from: common ones, a token each in the original's."""
WORDS = tuple(dict.fromkeys("""
    我们 一个 图片 这个 可以 没有 他们 时候 什么 自己 一些 中国 因为 所以 如果 但是 已经 还是 现在 这些 图像 照片 背景 前面
    旁边 上面 下面 左边 右边 白色 黑色 红色 蓝色 绿色 黄色 颜色 男人 女人 孩子 桌子 椅子 房间 街道 城市 汽车 建筑 天空 树木
    草地 水面 阳光 人们 一只 一张 一位 一群 站在 坐在 放在 拿着 穿着 看着 正在 可能 非常 比较 很多 一起 这样 那些 问题 方法
    情况 关系 需要 进行 发展 工作 生活 学生 老师 朋友 时间 地方 东西 事情 世界 社会 国家 文化 历史 经济 技术 环境 安全 健康
    重要 不同 主要 其他 开始 之后 之前 同时 通过 使用 提供 包括 表示 认为 知道 觉得 希望 喜欢 帮助 注意 影响 结果 能够 应该
    特别 一直 一定 所有 每个 这种 那个 这里 那里 周围 中间 附近 远处 户外 室内 食物 动物 小狗 猫咪 鸟类 花朵""".split()))
"""Two-character words drawn beside the characters, so that the text has real Chinese's characters per token."""


def _code_points(units: tuple[str, ...]) -> np.ndarray:
    """(units, 2) code points, a single character padded with 0."""
    table = np.zeros((len(units), 2), dtype="<u4")
    for row, unit in enumerate(units):
        table[row, :len(unit)] = [ord(c) for c in unit]
    return table


_UNITS = _code_points((*CHARACTERS, *WORDS))
COMMA_RATE = 0.09
"""Chance that a character of the text is a comma (never next to another)."""

PRETRAIN_PROMPTS = ("提供给定图像的简要描述。", "简要描述这张图片。", "请简单描述图片的内容。", "用几句话概括这张图像。",
                    "给出图像的简短说明。", "这张图片展示了什么？", "简述图中的场景。", "为这张图片写一句简短的说明。",
                    "描述一下这幅图像。", "对图片做一个简要的描述。", "图片里有什么？请简要说明。")
"""The original's caption prompts are brief-description instructions like these (LLaVA-CC3M's, translated)."""


@dataclass(frozen=True)
class Lengths:
    """A length in characters: log-normal around a median, clipped to [low, high]."""

    median: float
    """The middle length in characters."""
    spread: float
    """Standard deviation of the log length (0.5 puts two thirds of the lengths within x0.6..x1.65 of the median)."""
    low: int
    """The shortest length."""
    high: int
    """The longest length."""

    def draw(self, rng: np.random.Generator) -> int:
        return int(min(max(round(self.median * math.exp(self.spread * rng.standard_normal())), self.low), self.high))


@dataclass(frozen=True)
class Profile:
    """What one of the original data sets looks like, as far as speed and scale see it."""

    stage: str
    """Names the files: OUT/<stage>_data.jsonl and OUT/<stage>_images/."""
    image_name: str
    """An image's file name from its index (str.format), after the original's."""
    answer: Lengths
    """Characters of each assistant turn (a caption in pretrain), its closing 。 included."""
    question: Lengths = Lengths(14, 0.35, 4, 60)
    """Characters of each drawn user question, its closing ？ included."""
    prompts: tuple[str, ...] = ()
    """When set, the first user turn is one of these instead of a drawn question."""
    turns: tuple[float, ...] = (1.0,)
    """Relative frequency of 1, 2, ... question-answer turns; only the first user turn carries the image."""
    marker_join: str = "\n"
    """What stands between the first question and its image marker, after the original's examples."""
    per_image: int = 1
    """Consecutive conversations that show the same image."""
    text_only: float = 0.0
    """Chance that a conversation other than the first on its image has no image at all."""
    look: Look = field(default_factory=Look)
    """How the images are drawn and encoded."""

    @property
    def data_file(self) -> str:
        return f"{self.stage}_data.jsonl"

    @property
    def image_dir(self) -> str:
        return f"{self.stage}_images"


PROFILES = {
    "minimind-v-pretrain": Profile(stage="pretrain", image_name="GCC_train_{:09d}.jpg",
                                   answer=Lengths(11, 0.4, 4, 64), prompts=PRETRAIN_PROMPTS),
    "minimind-v-sft": Profile(stage="sft", image_name="train-00000-of-00001_image_{}_0.jpg",
                              answer=Lengths(30, 0.6, 2, 400), turns=(0.6, 0.2, 0.1, 0.06, 0.04), marker_join="",
                              per_image=2, text_only=0.1),
}
"""--like NAME -> the profile it writes; the names are SynthOptions.like's choices."""


class TextStream:
    """Words and characters of the fixed sets, with a comma now and then, drawn a block at a time: each text
    is the stream's next stretch (a Python slice, so a million short texts cost seconds, not minutes)."""

    def __init__(self, rng: np.random.Generator, block: int = 1 << 18) -> None:
        self._rng, self._block, self._text, self._at = rng, block, "", 0

    def take(self, length: int, end: str) -> str:
        """`length` characters, the last one `end`; never a comma first or just before `end`."""
        if self._at + length > len(self._text):
            self._text, self._at = self._draw(max(self._block, length)), 0
        body = self._text[self._at:self._at + length - 1]
        self._at += length - 1
        if body[:1] == "，":
            body = CHARACTERS[0] + body[1:]
        if body[-1:] == "，":
            body = body[:-1] + CHARACTERS[0]
        return body + end

    def _draw(self, size: int) -> str:
        units = _UNITS[self._rng.integers(0, len(_UNITS), size)].ravel()
        text = units[units > 0]
        comma = self._rng.random(len(text)) < COMMA_RATE
        comma[1:] &= ~comma[:-1]
        text[comma] = ord("，")
        return text.tobytes().decode("utf-32-le")


def conversation(rng: np.random.Generator, text: TextStream, profile: Profile,
                 with_image: bool) -> list[dict[str, str]]:
    """One drawn conversation; the image marker (when shown) ends the first user turn."""
    n_turns = min(bisect.bisect_right(list(itertools.accumulate(profile.turns)), rng.random() * sum(profile.turns)),
                  len(profile.turns) - 1) + 1
    turns: list[dict[str, str]] = []
    for k in range(n_turns):
        if k == 0 and profile.prompts:
            question = profile.prompts[int(rng.integers(len(profile.prompts)))]
        else:
            question = text.take(profile.question.draw(rng), "？")
        if k == 0 and with_image:
            question = f"{question}{profile.marker_join}{IMAGE_MARKER}"
        turns += [{"role": "user", "content": question},
                  {"role": "assistant", "content": text.take(profile.answer.draw(rng), "。")}]
    return turns


@dataclass
class StandinReport:
    """What a stand-in run wrote, and how fast."""

    path: Path
    samples: int
    images: int
    image_bytes: int
    seconds: float

    def summary(self, like: str) -> str:
        mean = self.image_bytes / max(self.images, 1)
        return (f"wrote {self.samples} samples like {like} ({self.images} images, mean {mean:.0f} bytes) to "
                f"{self.path} in {self.seconds:.1f} s ({self.images / max(self.seconds, 1e-9):.0f} images/s)")


def write_standin(like: str, n: int, seed: int, out: Path, workers: int | None = None,
                  chunk: int = 2000) -> StandinReport:
    """Write `n` samples like the original data set `like` into `out`; the JPEGs go to worker processes
    in chunks of `chunk` (workers: the cores available), which changes the speed, never the bytes."""
    if n < 1:
        raise UserError(f"--n {n}: must be at least 1")
    start, profile = time.perf_counter(), PROFILES[like]
    image_dir = out / profile.image_dir
    image_dir.mkdir(parents=True, exist_ok=True)
    n_images, salt = -(-n // profile.per_image), zlib.crc32(like.encode())
    jobs = [ImageJob(str(image_dir), profile.image_name, profile.look, seed, salt, lo, min(lo + chunk, n_images))
            for lo in range(0, n_images, chunk)]
    with images_in_background(jobs, workers_available() if workers is None else workers) as images_written:
        path = _write_records(profile, n, np.random.default_rng([seed, salt]), out / profile.data_file)
        image_bytes = sum(images_written())
    return StandinReport(path, n, n_images, image_bytes, time.perf_counter() - start)


def _write_records(profile: Profile, n: int, rng: np.random.Generator, path: Path) -> Path:
    """The jsonl, one line per sample as it is drawn; sample i shows image i // per_image unless text-only."""
    text = TextStream(rng)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            shared = i % profile.per_image > 0
            with_image = not (shared and rng.random() < profile.text_only)
            record: dict[str, object] = {"conversations": conversation(rng, text, profile, with_image)}
            if with_image:
                record["image"] = profile.image_name.format(i // profile.per_image)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
