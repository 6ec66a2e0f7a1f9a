"""`minimind-v quickstart`: the whole pipeline on the synthetic world, on a CPU, within --minutes.

synth -> tokenizer -> the tiny preset's CLIP tower pretrained on its own (data/synth/tower.py: each
patch names the colour, shape, size and colour-shape pair in its grid cell; seconds) and then
frozen, as CLIP is in the real recipe -> the real trainer's SFT stage on questions and answers,
the language model (2 layers here) and the projector learning from scratch -> exact-match
evaluation on held-out scenes -> a sample chat -> accuracy against minutes and the loss curve.

Why each choice of the Recipe: docs/experiments.md ("The quickstart's recipe"); in short, a tower
trained only through a language model that is itself learning never separates shape or size, the
questions that find an object by its name are the slow ones, and qk_norm lets a higher rate learn them.

The time budget is kept by measuring, not by guessing: every phase is timed, training steps of the
real model at the data's mean length are timed before training, and training gets the steps that
fit the time left; the trainer decays the learning rate on the clock when it falls behind that plan
and stops at its time cap. A slower machine therefore trains fewer steps and finishes on time with a
lower score, instead of overrunning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minimind_v.errors import UserError

MARKER = "quickstart.json"
"""Written into OUT: a directory holding it may be cleared and rebuilt by the next quickstart."""


@dataclass
class Recipe:
    """How the quickstart trains; docs/experiments.md records how each default was chosen."""

    qa_samples: int = 16000
    """Question-answer scenes to train on (1 to max_turns questions each)."""
    tower_samples: int = 6000
    """The first this many training scenes teach the tower what each grid cell holds."""
    max_turns: int = 8
    """Questions per QA sample; the image and the system turn are paid for once for all of them."""
    type_weights: str = "count=2,size=3,position=3,exist=3,left_of=5,above=5"
    """Question mix of the QA stage: the skills learned last come more often (colour, shape and descriptions
    are learned first and need less)."""
    test_samples: int = 300
    """Held-out QA samples for the final evaluation."""
    curve_samples: int = 96
    """Held-out QA samples evaluated at each checkpoint for the accuracy-against-minutes curve."""
    vocab_size: int = 600
    """BPE vocabulary of the world's tokenizer."""
    whole_words: bool = True
    """The world's tokenizer keeps each Chinese word of the answers whole (data.tokenizer.train_tokenizer's
    `words`), so that a shape or a colour is one token wherever it appears: merged across words, a Chinese shape
    was one token in a description and another in a shape answer, and the descriptions learned it apart."""
    layers: int = 2
    """Decoder layers of the tiny language model (the preset has 4)."""
    tower_steps: int = 400
    """Steps of the tower's supervised pretraining (data/synth/tower.py); the tower is frozen afterwards."""
    tower_places: bool = True
    """The tower's pretraining also names each patch's grid cell (tower.PLACE_LABELS), which the lookups by name
    read off the patch they find."""
    batch_size: int = 32
    """Samples per step."""
    lr: float = 1.4e-3
    """Peak learning rate (qk_norm keeps the attention logits in range at this rate)."""
    qk_norm: bool = True
    """RMSNorm on each head's queries and keys (LMConfig.qk_norm), which keeps the attention logits in range at
    the higher learning rate."""
    qk_norm_gain: float = 1.0
    """Initial weight of the query and key norms (LMConfig.qk_norm_gain): a bigger one lets attention pick one image
    token from the first step."""
    compile: bool = False
    """torch.compile the training step (`train --compile`), one graph per padded width."""
    checkpoints: int = 3
    """Checkpoints evaluated for the curve (besides the final model)."""
    device: str = "cpu"
    """Where training runs (experiments only: the quickstart's promise is about 2 CPU cores)."""
    dtype: str = "auto"
    """Training precision, as `train --dtype` (experiments: bf16 autocast against fp32)."""
    steps: int | None = None
    """Fixed training steps instead of what fits the time (experiments on other machines)."""
    image_place: str = "before"
    """Where the image goes in the training and test questions: before, after or mixed (synth --image-place)."""
    images_first: bool = True
    """The model reads each turn's images before its text whatever the order given (VLMConfig.images_first), so
    it answers a text-first question as it answers the image-first ones it learned from."""


@dataclass
class QuickstartOptions:
    out: str = "runs/quickstart"
    """Directory for the data, the runs and the final model (OUT/model)."""
    minutes: float = 15.0
    """Wall-clock budget for everything, evaluation included."""
    seed: int = 0
    """Seeds the synthetic data and the training."""
    scale: float = 1.0
    """Multiply the number of synthetic training samples (e.g. 0.05 for a smoke test)."""
    recipe: Recipe = field(default_factory=Recipe, metadata={"cli": False})
    """Training choices (Python API only)."""


class Clock:
    """Wall time since the start, the time left of the budget, and how long each phase took."""

    def __init__(self, minutes: float) -> None:
        self.start = time.perf_counter()
        self.budget = minutes * 60.0
        self.phases: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def phase(self, name: str) -> "_Phase":
        return _Phase(self, name)


class _Phase:
    def __init__(self, clock: Clock, name: str) -> None:
        self.clock, self.name = clock, name

    def __enter__(self) -> "_Phase":
        self.began = time.perf_counter()
        print(f"[{self.clock.elapsed() / 60:5.2f} min] {self.name} ...", flush=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.clock.phases[self.name] = round(time.perf_counter() - self.began, 2)


# --- phases ----------------------------------------------------------------------------------

def prepare_out(out: Path) -> None:
    """Start from an empty OUT; only a directory an earlier quickstart wrote (or an empty one) is cleared."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(f"--out {out}: exists and was not written by quickstart; choose another directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("{}\n")


def write_world(out: Path, seed: int, recipe: Recipe, scale: float) -> dict[str, Path]:
    """A QA training set and a held-out QA test set (scenes never in training), English and Chinese mixed."""
    from minimind_v.data.synth import SynthOptions, write_dataset

    def n(count: int) -> int:
        return max(8, round(count * scale))

    data = out / "data"
    return {
        "qa": write_dataset(SynthOptions(out=str(data / "qa"), n=n(recipe.qa_samples), seed=seed + 1, lang="mix",
                                         kind="qa", max_turns=recipe.max_turns, type_weights=recipe.type_weights,
                                         image_place=recipe.image_place)),
        "test": write_dataset(SynthOptions(out=str(data / "test"), n=recipe.test_samples,
                                           seed=seed + 2, split="test", lang="mix", kind="qa",
                                           image_place=recipe.image_place)),
    }


def train_world_tokenizer(corpus: list[Path], vocab_size: int, out: Path, whole_words: bool) -> Any:
    from minimind_v.data.synth.language import lexicon
    from minimind_v.data.tokenizer import corpus_texts, save_tokenizer, train_tokenizer

    tokenizer = train_tokenizer(corpus_texts([str(p) for p in corpus]), vocab_size,
                                lexicon("zh") if whole_words else ())
    save_tokenizer(tokenizer, out)
    return tokenizer


def world_model(cfg: Any, recipe: Recipe) -> Any:
    """The tiny preset as the recipe trains it: fewer layers, q/k norm, the tower frozen, images first."""
    lm = dataclasses.replace(cfg.lm, num_hidden_layers=recipe.layers, qk_norm=recipe.qk_norm,
                             qk_norm_gain=recipe.qk_norm_gain)
    return dataclasses.replace(cfg, lm=lm, vision=dataclasses.replace(cfg.vision, freeze=True),
                               images_first=recipe.images_first)


def pretrain_world_tower(data: Path, recipe: Recipe, out: Path, seed: int) -> dict[str, Any]:
    """The tiny preset's tower from scratch, taught what each grid cell holds (data/synth/tower.py) in the first
    recipe.tower_samples scenes of `data`, saved to OUT/vision."""
    from minimind_v.data.synth.tower import pretrain_tower, world_tower_data
    from minimind_v.model.vision import VisionTower
    from minimind_v.modeldir import save_tower
    from minimind_v.presets import get_preset

    vision = get_preset("tiny").vision
    torch.manual_seed(seed)
    pixels, labels = world_tower_data(data, recipe.tower_samples, vision.image_size, recipe.tower_places)
    tower = VisionTower(vision)
    report = pretrain_tower(tower, pixels, labels, recipe.tower_steps, recipe.batch_size, seed=seed)
    save_tower(tower, out, vision.image_size)
    return vars(report)


@dataclass
class TrainingRun:
    """What training did, as measured."""

    name: str
    steps: int
    wall_s: float
    """The whole call: set-up (reading and tokenising the data, building the model) and training."""
    train_s: float
    """The training loop alone, from the trainer's metrics."""
    setup_s: float
    """The trainer's set-up before its loop (reading the data, building the model): wall_s - train_s."""
    tokens: int
    """Tokens trained on (padding included), from the trainer's metrics."""


def train_world(data: Path, n_samples: int, run_dir: Path, model_cfg: Any, start: Any, steps: int,
                train_seconds: float, recipe: Recipe, seed: int) -> TrainingRun:
    """The real trainer's SFT stage from `start` (`minimind-v train --stage sft --from none`): the language model
    and the projector learn from nothing, the pretrained tower stays frozen.

    `steps` is the plan; `train_seconds` caps the training loop in case the machine turns out slower than planned.
    """
    from minimind_v.train import distributed
    from minimind_v.train.config import TrainConfig, for_stage
    from minimind_v.train.loop import train
    from minimind_v.train.metrics import read_metrics
    from minimind_v.train.settings import RunSettings

    cfg = for_stage(TrainConfig(
        stage="sft", lr=recipe.lr, batch_size=recipe.batch_size, max_seq_len=512,
        epochs=math.ceil(steps * recipe.batch_size / n_samples) + 1, freeze="llm", max_steps=steps,
        max_minutes=max(train_seconds, 1.0) / 60, seed=seed, warmup_steps=max(1, min(50, steps // 10)),
        batching="grouped", dtype=recipe.dtype, model=model_cfg))
    settings = RunSettings(data=str(data), out=str(run_dir), save_every=max(1, math.ceil(steps / recipe.checkpoints)),
                           keep_checkpoints=recipe.checkpoints + 1, log_every=10, device=recipe.device,
                           compile=recipe.compile)
    began = time.perf_counter()
    train(cfg, start, settings, distributed.setup(recipe.device))
    wall = time.perf_counter() - began
    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    return TrainingRun("sft", last["step"], round(wall, 2), float(last["elapsed"]), round(wall - last["elapsed"], 2),
                       int(last["tokens"]))


# --- after training ---------------------------------------------------------------------------

def sample_chat(model_dir: Path, test: Path) -> list[dict[str, str]]:
    """Ask the final model about the first held-out image, in both languages."""
    from minimind_v.data.formats import open_dataset
    from minimind_v.data.images import load_image, resolve_image_path
    from minimind_v.infer.engine import Engine, SamplingParams

    engine = Engine.load(model_dir, "cpu")
    reader = open_dataset(test)
    image_path = resolve_image_path(reader.images_dir, reader[0].images[0])
    image = load_image(image_path)
    questions = ["Describe the image in detail.", "How many objects are there?", "详细描述这张图片。"]
    params = SamplingParams(max_new_tokens=96, temperature=0.0)
    return [{"image": str(image_path), "question": q,
             "answer": engine.chat([{"role": "user", "content": f"<image>\n{q}"}], [image], params).text}
            for q in questions]


# --- the command -----------------------------------------------------------------------------

def main(opts: QuickstartOptions) -> int:
    if opts.minutes <= 0 or opts.scale <= 0:
        raise UserError("--minutes and --scale must be positive")
    threads = torch.get_num_threads()
    try:
        return _run(opts)
    finally:
        torch.set_num_threads(threads)  # the run's choice (see fastest_threads) stays inside the run


def _run(opts: QuickstartOptions) -> int:
    from minimind_v.modeldir import VISION_DIR
    from minimind_v.train.build import resolve_start

    clock, out, recipe = Clock(opts.minutes), Path(opts.out), opts.recipe
    prepare_out(out)
    with clock.phase("synthetic world"):
        data = write_world(out, opts.seed, recipe, opts.scale)
    with clock.phase("tokenizer"):
        tokenizer = train_world_tokenizer([data["qa"]], recipe.vocab_size, out / "tokenizer", recipe.whole_words)
    with clock.phase("vision tower"):
        tower = pretrain_world_tower(data["qa"], recipe, out, opts.seed)
    start = resolve_start("none", "tiny", str(out / "tokenizer"), str(out / VISION_DIR))
    cfg = world_model(start.cfg, recipe)
    with clock.phase("planning"):
        plan = plan_training(data["qa"], tokenizer, cfg, recipe, clock)
    with clock.phase("training: questions and answers"):
        began_min = clock.elapsed() / 60
        run = train_world(data["qa"], plan["samples"], out / "sft", cfg, start, plan["steps"],
                          clock.left() - plan["reserve_s"] - plan["setup_s"], recipe, opts.seed)
    summary = {"budget_minutes": opts.minutes, "seed": opts.seed, "tower": tower, "training": vars(run),
               "plan": plan, **after_training(out, data["test"], run, began_min + run.setup_s / 60, recipe, clock)}
    summary = {"minutes": round(clock.elapsed() / 60, 2), **summary, "phases_s": clock.phases}
    (out / MARKER).write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print_summary(summary, out)
    return 0


def plan_training(data: Path, tokenizer: Any, cfg: Any, recipe: Recipe, clock: Clock) -> dict[str, Any]:
    """The steps that fit the time left, from the data's shape and the real step timed on this machine."""
    from minimind_v.train.budget import PLAN_SPEED, fastest_threads, sample_shape, steps_for

    shape = sample_shape(data, tokenizer, cfg)
    samples = sum(1 for _ in open(data, encoding="utf-8"))
    threads, step_s = fastest_threads(cfg, recipe.batch_size, round(shape.tokens), shape.supervised)
    # Evaluation, the curve, the chat and a margin come after training: their time is kept aside (a few
    # seconds of a 15-minute run; the trainer also stops at its own time cap).
    reserve = max(15.0, 0.02 * clock.budget)
    setup_s = 3 + shape.setup_s * samples
    steps = recipe.steps or steps_for(clock.left() - reserve, step_s / PLAN_SPEED, setup_s)
    return {"shape": vars(shape), "samples": samples, "step_s": step_s, "steps": steps, "setup_s": setup_s,
            "reserve_s": reserve, "threads": threads}


def after_training(out: Path, test: Path, run: TrainingRun, began_min: float, recipe: Recipe,
                   clock: Clock) -> dict[str, Any]:
    """OUT/model with its tower inside, the held-out evaluation, the accuracy curve, a sample chat."""
    from minimind_v.curves import accuracy_curve, curve_point, plot_curves
    from minimind_v.evaluate import evaluate, write_predictions
    from minimind_v.modeldir import embed_tower
    from minimind_v.train.metrics import read_metrics

    shutil.copytree(out / "sft" / "model", out / "model")
    embed_tower(out / "model")  # the tower is tiny: OUT/model works wherever it is copied
    with clock.phase("evaluation"):
        report, items = evaluate(out / "model", test)
        write_predictions(items, out / "predictions.jsonl")
        (out / "eval.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    final_point = curve_point("final", run.steps, clock.elapsed() / 60, report)
    with clock.phase("accuracy curve"):
        points = accuracy_curve(out / "sft", test, recipe.curve_samples, began_min) + [final_point]
    with clock.phase("sample chat"):
        chat = sample_chat(out / "model", test)
    plot_curves(points, read_metrics(out / "sft" / "metrics.jsonl"), began_min, out, "minimind-v quickstart")
    (out / "accuracy.json").write_text(json.dumps(points, indent=2) + "\n")
    return {"eval": report, "accuracy_curve": points, "chat": chat}


def print_summary(summary: dict[str, Any], out: Path) -> None:
    report = summary["eval"]
    lines = ["", f"quickstart finished in {summary['minutes']:.1f} min (budget {summary['budget_minutes']:g} min)",
             "  " + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in summary["phases_s"].items()), "",
             f"held-out exact match on {report['scored']} questions about unseen scenes:",
             f"  {'type':<10}{'n':>5}{'exact':>9}"]
    for name, row in report["by_type"].items():
        lines.append(f"  {name:<10}{row['n']:>5}{100 * row['exact_match']:>8.1f}%")
    for name in ("short", "long"):
        row = report[name]
        if row["n"]:
            lines.append(f"  {name + ' answers':<10}{row['n']:>5}{100 * row['exact_match']:>8.1f}%")
    lines += ["", "sample chat (held-out image):"]
    lines += [f"  Q: {c['question']}\n  A: {c['answer']}" for c in summary["chat"]]
    image = summary["chat"][0]["image"]
    lines += ["", f"model:   {out / 'model'}",
              f"curves:  {out / 'accuracy.png'}, {out / 'loss.png'}  (data: {out / 'accuracy.json'})",
              f"chat:    minimind-v chat --model {out / 'model'} --image {image} --prompt \"Describe the image in detail.\"",
              f"web UI:  minimind-v web --model {out / 'model'}"]
    print("\n".join(lines))
