"""`minimind-v quickstart`: the whole pipeline on the synthetic world, on a CPU, within --minutes.

synth -> tokenizer -> the tiny preset's CLIP tower pretrained on its own (train/tower.py: each
patch names the colour, shape, size and colour-shape pair in its grid cell; seconds) and then
frozen, as CLIP is in the real recipe -> the real trainer's SFT stage on questions and answers,
the language model (2 layers here) and the projector learning from scratch -> exact-match
evaluation on held-out scenes -> a sample chat -> accuracy against minutes and the loss curve.

Why this recipe (measured; numbers in the README): through a from-scratch language model the tower
never learned shape or size (chance after thousands of steps), while on its own it learns them in
a few hundred steps; 2 layers train ~1.7x faster per step than 4 and did better in the same time;
the questions that need an object found by its name (relations, existence, position, counting by
colour) are the slow ones, so the QA mix asks them more often; with queries and keys RMS-normalised per
head (qk_norm) and twice the learning rate, those lookups are learned long before the end (the training
loss a quarter of what it was at the same step), where before a run often ended with one half-learned. There
is no caption stage: the real recipe's pretraining aligns a projector to a language model that already
knows language, while here both start from nothing, and captions taught nothing the questions needed
(0% on them after the stage; the run without it reached 98.8% short answers, the best of its recipe's
runs at 89.7-97.2%).

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

import numpy as np
import torch

from minimind_v.constants import IGNORE_INDEX
from minimind_v.errors import UserError

MARKER = "quickstart.json"
"""Written into OUT: a directory holding it may be cleared and rebuilt by the next quickstart."""


@dataclass
class Recipe:
    """How the quickstart trains; the defaults were chosen by experiment (see the README's quickstart section)."""

    qa_samples: int = 16000
    """Question-answer scenes to train on (1 to max_turns questions each)."""
    tower_samples: int = 6000
    """The first this many training scenes teach the tower what each grid cell holds."""
    max_turns: int = 8
    """Questions per QA sample; the image and the system turn are paid for once for all of them."""
    type_weights: str = "count=2,size=3,position=3,exist=3,left_of=5,above=5"
    """Question mix of the QA stage: the questions that need the object found by its name come more often
    (colour, shape and descriptions are learned first and need less). Size too: with qk_norm and the higher
    rate it was the last skill learned (at chance at step 2,900 in two runs, learned by the end in one only)."""
    test_samples: int = 300
    """Held-out QA samples for the final evaluation."""
    curve_samples: int = 96
    """Held-out QA samples evaluated at each checkpoint for the accuracy-against-minutes curve."""
    vocab_size: int = 600
    """BPE vocabulary of the world's tokenizer."""
    layers: int = 2
    """Decoder layers of the tiny language model (the preset has 4)."""
    tower_steps: int = 400
    """Steps of the tower's supervised pretraining (train/tower.py); the tower is frozen afterwards."""
    batch_size: int = 32
    """Samples per step."""
    lr: float = 1.4e-3
    """Peak learning rate: twice the best without qk_norm (there, 1e-3 did worse than 7e-4 on each of 3 seeds)."""
    qk_norm: bool = True
    """RMSNorm on each head's queries and keys (LMConfig.qk_norm), which keeps the attention logits in range at
    the higher rate. Adopted together with it (not separated): training loss 0.018 at step 3,100, ~0.065 before."""
    checkpoints: int = 3
    """Checkpoints evaluated for the curve (besides the final model)."""
    device: str = "cpu"
    """Where training runs (experiments only: the quickstart's promise is about 2 CPU cores)."""
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


def train_world_tokenizer(corpus: list[Path], vocab_size: int, out: Path) -> Any:
    from minimind_v.data.tokenizer import corpus_texts, save_tokenizer, train_tokenizer

    tokenizer = train_tokenizer(corpus_texts([str(p) for p in corpus]), vocab_size)
    save_tokenizer(tokenizer, out)
    return tokenizer


def world_model(cfg: Any, recipe: Recipe) -> Any:
    """The tiny preset as the recipe trains it: fewer layers, q/k norm, the tower frozen, images first."""
    lm = dataclasses.replace(cfg.lm, num_hidden_layers=recipe.layers, qk_norm=recipe.qk_norm)
    return dataclasses.replace(cfg, lm=lm, vision=dataclasses.replace(cfg.vision, freeze=True),
                               images_first=recipe.images_first)


def pretrain_world_tower(data: Path, cfg: Any, recipe: Recipe, out: Path, seed: int) -> dict[str, Any]:
    """The tiny preset's tower from scratch, taught what each grid cell holds (train/tower.py) in the first
    recipe.tower_samples scenes of `data`, saved to OUT/vision."""
    from minimind_v.data import synth
    from minimind_v.data.images import ImagePreprocessor, load_image
    from minimind_v.model.vision import VisionTower
    from minimind_v.modeldir import save_tower
    from minimind_v.train.tower import pretrain_tower, world_labels

    torch.manual_seed(seed)
    preprocess = ImagePreprocessor.for_image_size(cfg.vision.image_size)
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()[:recipe.tower_samples]]
    pixels = torch.from_numpy(np.stack([preprocess.array(load_image(data.parent / "images" / r["image"]))
                                        for r in records]))
    labels = world_labels([synth.scene_from_record(r["scene"]) for r in records])
    tower = VisionTower(cfg.vision)
    report = pretrain_tower(tower, pixels, labels, recipe.tower_steps, recipe.batch_size, seed=seed)
    save_tower(tower, out, cfg.vision.image_size)
    return vars(report)


@dataclass
class Shape:
    """What a training sample costs, from the first samples of the data."""

    tokens: float
    """Mean length in tokens, chat template and image placeholders included."""
    supervised: float
    """Share of those tokens that are answer tokens (the only ones the output head runs on)."""
    setup_s: float
    """Seconds of the trainer's set-up per sample: templating and tokenising, decoding the image."""


def sample_shape(data: Path, tokenizer: Any, cfg: Any, n: int = 200) -> Shape:
    from minimind_v.data.formats import open_dataset
    from minimind_v.data.images import ImageFolder, ImagePreprocessor, load_image
    from minimind_v.data.template import encode_conversation

    began = time.perf_counter()
    reader = open_dataset(data)
    samples = [reader[i] for i in range(min(n, len(reader)))]
    encoded = [encode_conversation(tokenizer, s.conversations, cfg, len(s.images), 4096) for s in samples]
    preprocess = ImagePreprocessor.for_image_size(cfg.vision.image_size)
    folder = ImageFolder(reader.images_dir)  # synth writes paths relative to the image folder
    for ref in (ref for s in samples for ref in s.images):
        preprocess.array(load_image(folder.resolve(ref)))
    tokens = sum(len(e.input_ids) for e in encoded)
    supervised = sum(sum(1 for label in e.labels if label != IGNORE_INDEX) for e in encoded)
    return Shape(tokens / len(encoded), supervised / max(tokens, 1), (time.perf_counter() - began) / len(samples))


def time_one_step(cfg: Any, batch_size: int, seq_len: int, supervised: float) -> float:
    """Seconds for one training step (forward, backward, AdamW) of the real model on a batch of this shape,
    `supervised` of each row's tokens labelled."""
    from minimind_v.model.vlm import MiniMindVLM

    model = MiniMindVLM(cfg)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seq_len = max(seq_len, cfg.image_token_len + 4)
    ids = torch.randint(4, cfg.lm.vocab_size, (batch_size, seq_len))
    ids[:, 2:2 + cfg.image_token_len] = cfg.image_token_id
    answers = max(1, round(supervised * seq_len))
    labels = ids.clone()
    labels[:, :seq_len - answers] = IGNORE_INDEX
    pixels = torch.randn(batch_size, 3, cfg.vision.image_size, cfg.vision.image_size)

    def step() -> None:
        out = model(ids, pixel_values=pixels, labels=labels, logits_to_keep="none")
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the first step allocates; time the next ones
    began = time.perf_counter()
    for _ in range(2):
        step()
    return (time.perf_counter() - began) / 2


def fastest_threads(cfg: Any, batch_size: int, seq_len: int, supervised: float,
                    rounds: int = 3) -> tuple[int, float]:
    """Set torch's thread count to the faster of 1 and all cores, measured on the real step.

    On an idle machine all cores win; on a busy one (other jobs on the same cores) the threads of one
    step wait for each other and a single thread can be several times faster. The counts are timed in
    turn for a few rounds and each is judged by its fastest round: from one round each, a moment of
    contention (another process starting) once made one thread look faster, and the whole run went at
    half speed.
    """
    timings: dict[int, list[float]] = {threads: [] for threads in sorted({1, torch.get_num_threads()})}
    for _ in range(rounds):
        for threads, seconds in timings.items():
            torch.set_num_threads(threads)
            seconds.append(time_one_step(cfg, batch_size, seq_len, supervised))
    fastest = {threads: min(seconds) for threads, seconds in timings.items()}
    best = min(fastest, key=fastest.__getitem__)
    torch.set_num_threads(best)
    return best, fastest[best]


@dataclass
class TrainingRun:
    """What training did, as measured."""

    name: str
    steps: int
    wall_s: float
    """The whole call: set-up (reading and tokenising the data, building the model) and training."""
    train_s: float
    """The training loop alone, from the trainer's metrics."""
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
        batching="grouped", model=model_cfg))
    settings = RunSettings(data=str(data), out=str(run_dir), save_every=max(1, math.ceil(steps / recipe.checkpoints)),
                           keep_checkpoints=recipe.checkpoints + 1, log_every=10, device=recipe.device)
    began = time.perf_counter()
    train(cfg, start, settings, distributed.setup(recipe.device))
    wall = time.perf_counter() - began
    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    return TrainingRun("sft", last["step"], round(wall, 2), float(last["elapsed"]), int(last["tokens"]))


def steps_for(seconds: float, seconds_per_step: float, setup_s: float) -> int:
    return max(1, int((seconds - setup_s) / seconds_per_step))


# --- evaluation, chat, curves ----------------------------------------------------------------

def checkpoint_engines(run_dir: Path) -> list[tuple[Path, Any]]:
    """An engine per saved checkpoint of a stage: the stage's final model with the checkpoint's weights."""
    from safetensors.torch import load_file

    from minimind_v.infer.engine import Engine

    engines = []
    for path in sorted((run_dir / "checkpoints").glob("step-*")):
        engine = Engine.load(run_dir / "model", "cpu")
        weights = load_file(str(path / "trainable.safetensors"))
        missing, unexpected = engine.model.load_state_dict(weights, strict=False)
        if unexpected:
            raise RuntimeError(f"{path}: unexpected weights {unexpected[:4]}")
        engines.append((path, engine))
    return engines


def curve_point(stage: str, step: int, minutes: float, report: dict[str, Any]) -> dict[str, Any]:
    """One point of the accuracy curve: an evaluation report's exact match (all, short, long) at a minute."""
    return {"stage": stage, "step": step, "minutes": round(minutes, 3), "exact_match": report["exact_match"],
            "short": report["short"]["exact_match"], "long": report["long"]["exact_match"]}


def accuracy_curve(run_dir: Path, test: Path, limit: int, wall_start: float) -> list[dict[str, Any]]:
    """Held-out exact match at every checkpoint, against the wall-clock minute the checkpoint was written."""
    from minimind_v.evaluate import evaluate

    points = []
    for path, engine in checkpoint_engines(run_dir):
        report, _ = evaluate(run_dir / "model", test, limit=limit, engine=engine)
        minutes = ((path / "state.json").stat().st_mtime - wall_start) / 60
        points.append(curve_point(run_dir.name, int(path.name.split("-")[1]), minutes, report))
    return points


def plot_curves(points: list[dict[str, Any]], metrics: list[dict[str, Any]], began_min: float, out: Path) -> None:
    """accuracy.png (exact match against minutes) and loss.png (the training loss against minutes; training
    began `began_min` minutes after the quickstart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in (("short", "short answers"), ("long", "descriptions"), ("exact_match", "all")):
        xy = [(p["minutes"], 100 * p[key]) for p in points if p[key] is not None]
        if xy:
            ax.plot(*zip(*xy), "o-", label=label, markersize=4)
    ax.set(xlabel="minutes since quickstart began", ylabel="held-out exact match (%)", ylim=(0, 100),
           title="minimind-v quickstart: accuracy against time (2 CPU cores)")
    _save(fig, ax, out / "accuracy.png")

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    xy = [(began_min + r["elapsed"] / 60, r["loss"]) for r in metrics if "loss" in r]
    if xy:
        ax.plot(*zip(*xy), label="training loss", linewidth=1.2)
    ax.set(xlabel="minutes since quickstart began", ylabel="cross-entropy per answer token", yscale="log",
           title="minimind-v quickstart: training loss")
    _save(fig, ax, out / "loss.png")


def _save(fig: Any, ax: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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

PLAN_SPEED = 1.1
"""The plan assumes steps 10% faster than the timed step. Inside the trainer a step took 1.01x the timed one
(one run), and this machine's speed drifts by more than that from minute to minute. A plan too slow ends
training early and wastes the rest of the budget; one too fast costs little, as the trainer then decays the
learning rate on the clock and stops at its time cap."""


def main(opts: QuickstartOptions) -> int:
    if opts.minutes <= 0 or opts.scale <= 0:
        raise UserError("--minutes and --scale must be positive")
    threads = torch.get_num_threads()
    try:
        return _run(opts)
    finally:
        torch.set_num_threads(threads)  # the run's choice (see fastest_threads) stays inside the run


def _run(opts: QuickstartOptions) -> int:
    from minimind_v.evaluate import evaluate, write_predictions
    from minimind_v.modeldir import embed_tower
    from minimind_v.train.build import resolve_start
    from minimind_v.train.metrics import read_metrics

    clock, wall_start = Clock(opts.minutes), time.time()
    out, recipe = Path(opts.out), opts.recipe
    prepare_out(out)
    with clock.phase("synthetic world"):
        data = write_world(out, opts.seed, recipe, opts.scale)
    with clock.phase("tokenizer"):
        tokenizer = train_world_tokenizer([data["qa"]], recipe.vocab_size, out / "tokenizer")
    with clock.phase("vision tower"):
        fresh = resolve_start("none", "tiny", str(out / "tokenizer"), None).cfg
        tower = pretrain_world_tower(data["qa"], fresh, recipe, out, opts.seed)
    start = resolve_start("none", "tiny", str(out / "tokenizer"), str(out / "vision"))
    cfg = world_model(start.cfg, recipe)
    with clock.phase("planning"):
        shape = sample_shape(data["qa"], tokenizer, cfg)
        samples = sum(1 for _ in open(data["qa"], encoding="utf-8"))
        threads, step_s = fastest_threads(cfg, recipe.batch_size, round(shape.tokens), shape.supervised)
    # Evaluation, the curve, the chat and a safety margin come after training: keep their time aside
    # (they took 3-5 s of a 15-minute run; with 45 s kept, runs ended 40 s early; the trainer also stops at
    # its own time cap).
    reserve = max(15.0, 0.02 * clock.budget)
    setup_s = 3 + shape.setup_s * samples
    steps = recipe.steps or steps_for(clock.left() - reserve, step_s / PLAN_SPEED, setup_s)
    with clock.phase("training: questions and answers"):
        run = train_world(data["qa"], samples, out / "sft", cfg, start, steps, clock.left() - reserve - setup_s,
                          recipe, opts.seed)
    shutil.copytree(out / "sft" / "model", out / "model")
    embed_tower(out / "model")  # the tower is tiny: OUT/model works wherever it is copied
    with clock.phase("evaluation"):
        report, items = evaluate(out / "model", data["test"])
        write_predictions(items, out / "predictions.jsonl")
        (out / "eval.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    final_point = curve_point("final", run.steps, clock.elapsed() / 60, report)
    with clock.phase("accuracy curve"):
        points = accuracy_curve(out / "sft", data["test"], recipe.curve_samples, wall_start)
        points.append(final_point)
    with clock.phase("sample chat"):
        chat = sample_chat(out / "model", data["test"])
    metrics = out / "sft" / "metrics.jsonl"
    began_min = metrics.stat().st_mtime / 60 - run.train_s / 60 - wall_start / 60
    plot_curves(points, read_metrics(metrics), began_min, out)
    (out / "accuracy.json").write_text(json.dumps(points, indent=2) + "\n")
    summary = {"minutes": round(clock.elapsed() / 60, 2), "budget_minutes": opts.minutes, "seed": opts.seed,
               "phases_s": clock.phases, "tower": tower, "training": vars(run),
               "plan": {"shape": vars(shape), "samples": samples, "step_s": step_s, "steps": steps,
                        "setup_s": setup_s, "reserve_s": reserve, "threads": threads},
               "eval": report, "accuracy_curve": points, "chat": chat}
    (out / MARKER).write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print_summary(summary, out)
    return 0


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
