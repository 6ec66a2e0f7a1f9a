"""`minimind-v train`: the one training loop, for every stage.

A stage (lm, pretrain, sft, dpo) is a config (train/stages.py), not a script. Single process:
`minimind-v train --stage sft --data sft.jsonl --from runs/pretrain/model --out runs/sft`.
Several GPUs or CPU processes: `torchrun --nproc-per-node 8 -m minimind_v.cli train ...` (same flags).

`main` checks the command and resolves its config (train/config.py) and start (train/build.py);
`train` sets the run up (train/run.py) and drives `Loop` over the epochs: one `train_step`
(train/step.py) per optimizer step, a log line every --log-every steps, checkpoints, OUT/model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from minimind_v.data.formats import data_file
from minimind_v import devices
from minimind_v.errors import UserError, short_list
from minimind_v.fileio import replace_dir
from minimind_v.options import apply_overrides
from minimind_v.train import build, checkpoint, distributed, dpo, optim
from minimind_v.train.config import TrainConfig, check, for_stage, resume_conflicts, warmup_steps
from minimind_v.train.distributed import DistInfo
from minimind_v.train.metrics import MetricsLog, RunLog, Tracker, plot_loss, require_tracker
from minimind_v.train.run import Run, set_up
from minimind_v.train.sampler import Slicing
from minimind_v.train.settings import RunSettings, TrainOptions
from minimind_v.train.stages import get_stage
from minimind_v.train.state import LoopState, Window
from minimind_v.train.step import CROSS_ENTROPY, Batch, Objective, input_tokens, train_step, validation_sums

__all__ = ["TrainOptions", "main", "train"]

MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "segment_ids", "position_ids", "pixel_values",
                "image_features")


def model_inputs(batch: dict[str, Any]) -> Batch:
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def main(opts: TrainOptions) -> int:
    check(opts.config)
    check_inputs(opts.run)
    info = distributed.setup(opts.run.device)
    try:
        cfg, start, resume_from = prepare(opts.config, opts.run, info.world_size)
        train(cfg, start, opts.run, info, resume_from)
    finally:
        distributed.teardown()
    return 0


def check_inputs(settings: RunSettings) -> None:
    """The inputs exist before anything is built or written: a mistyped path costs nothing."""
    for kind in settings.log_to:
        require_tracker(kind)
    if settings.eval_every and not settings.val_data:
        raise UserError("--eval-every needs --val-data")
    if settings.length_buckets < 1:
        raise UserError(f"--length-buckets {settings.length_buckets}: must be at least 1")
    if settings.save_minutes < 0 or settings.save_every < 0:
        raise UserError(f"--save-minutes {settings.save_minutes} / --save-every {settings.save_every}: "
                        "must not be negative (0: only at the end / by the clock)")
    data_file(settings.data)
    if settings.val_data:
        data_file(settings.val_data, "--val-data")
    if settings.images is not None and not Path(settings.images).is_dir():
        raise UserError(f"--images {settings.images}: no such folder")


def prepare(config: TrainConfig, settings: RunSettings,
            processes: int = 1) -> tuple[TrainConfig, build.Start, Path | None]:
    """The run's resolved config and starting point; on --resume also the checkpoint, checked against the config."""
    stage = get_stage(config.stage, config.recipe)
    from_ = settings.from_ or ("none" if not stage.needs_from else None)
    if from_ is None:
        raise UserError(f"--stage {config.stage} starts from a trained model: give --from DIR (or a .pth, or none)")
    start = build.resolve_start(from_, settings.preset, settings.tokenizer, settings.vision)
    cfg = for_stage(apply_overrides(dataclasses.replace(config, model=start.cfg), settings.set_), processes)
    out = Path(settings.out)
    resume_from = checkpoint.latest(out)
    if settings.resume:
        if resume_from is None:
            raise UserError(f"--resume: no checkpoint in {checkpoint.checkpoint_root(out)}")
        saved = checkpoint.read_state(resume_from)["config"]
        conflicts = resume_conflicts(saved, json.loads(json.dumps(cfg.to_dict())))
        if conflicts:
            raise UserError(f"--resume: this command differs from the run in {out}: {short_list(conflicts, 4)}")
    elif resume_from is not None:
        raise UserError(f"--out {out}: already holds a run; add --resume to continue it, or pick a new --out")
    return cfg, start, resume_from


def train(cfg: TrainConfig, start: build.Start, settings: RunSettings, info: DistInfo,
          resume_from: Path | None = None) -> None:
    """One run from `start` (or `resume_from`) to OUT/model; `cfg` as `for_stage` resolved it."""
    out = Path(settings.out)
    log = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log = RunLog(out, echo=sys.stderr)
    say = log.line if log is not None else (lambda text: None)
    distributed.barrier()
    loop = None
    try:
        say(f"command: minimind-v {' '.join(sys.argv[1:])}")
        say(f"config: {json.dumps(cfg.to_dict())}")
        run, state = set_up(cfg, start, settings, info, resume_from, say)
        loop = Loop(run, state, say)
        age = devices.process_age()
        if age is not None:
            say(f"set-up: {age:.1f} s from the start of the process to the first step")
        loop.epochs()
        finish(run, loop.state.step, loop.elapsed(), say)
    finally:
        if loop is not None:
            loop.close()
        if log is not None:
            log.close()


@dataclass
class Schedule:
    """How many steps the run takes and where its learning rate stands on them (and on the clock)."""

    total_steps: int
    warmup: int
    first_step: int
    """The step this process began at (0, or the checkpoint's)."""
    began: float
    """perf_counter() when this process's loop began."""
    clock_used: float = 0.0
    """Share of --max-minutes used (0 without a limit)."""

    def lr(self, step: int, cfg: TrainConfig) -> float:
        # Under --max-minutes a run that would reach its time cap before its last step decays on the clock
        # (the steps left shrunk in proportion to the time left), so it still ends at the floor instead of
        # being cut off at a high learning rate; a run on schedule is unaffected.
        at = optim.schedule_step(step, self.first_step, self.total_steps, self.clock_used)
        return optim.lr_at(at, cfg.lr, self.warmup, self.total_steps, cfg.min_lr_ratio)


def plan_steps(run: Run, state: LoopState) -> int:
    """Optimizer steps from the state to the end of the last epoch (or --max-steps)."""
    slicing = Slicing(run.info.world_size, run.cfg.accumulation_steps)
    plan = run.data.plan
    # Counted from the epoch the run is in, so a packed run packs that epoch (which it trains next) last.
    left = sum(slicing.steps_left(plan.count(e), state.position if e == state.epoch else 0)
               for e in reversed(range(state.epoch, run.cfg.epochs)))
    total = state.step + left
    return total if run.cfg.max_steps is None else min(total, run.cfg.max_steps)


class Loop:
    """The epochs of one run: steps, log lines, validation and checkpoints, on every process alike."""

    def __init__(self, run: Run, state: LoopState, say: Any) -> None:
        cfg, info = run.cfg, run.info
        self.run, self.state, self.say = run, state, say
        total = plan_steps(run, state)
        if total == 0:
            raise UserError(f"--data {run.settings.data}: {len(run.data.dataset)} samples fill no optimizer step of "
                            f"{info.world_size * cfg.accumulation_steps} batches of {cfg.batch_size}")
        self.schedule = Schedule(total, warmup_steps(cfg, total), state.step, time.perf_counter())
        say(f"steps: {state.step} done, {total} in all; warmup {self.schedule.warmup}; "
            + (f"{cfg.batch_size} x {info.world_size} x {cfg.accumulation_steps} samples per step"
               if cfg.tokens_per_step is None else
               f"{cfg.tokens_per_step} padded tokens (at most {cfg.batch_size} samples per micro-batch) x "
               f"{info.world_size} processes per step"))
        self.metrics = None
        if info.is_main:
            trackers = [Tracker(kind, run.out, cfg.to_dict()) for kind in run.settings.log_to]
            self.metrics = MetricsLog(run.out, trackers, resume_step=state.step)
        self.bar = tqdm(total=total, initial=state.step, disable=not info.is_main, unit="step",
                        dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
        self.window = Window(run.device)
        # What the step minimises: cross-entropy, or DPO's loss against the starting model (train/dpo.py).
        self.objective: Objective = CROSS_ENTROPY
        if cfg.stage == "dpo":
            self.objective = dpo.objective_for(run, resumed=state.step > 0, say=say)
        self.pending_bad: list[Any] = []
        self.lr, self.grad_norm = 0.0, torch.zeros(())
        self.last_save = self.schedule.began

    def epochs(self) -> None:
        first_epoch, first_position = self.state.epoch, self.state.position
        for epoch in range(first_epoch, self.run.cfg.epochs):
            if self.state.step >= self.schedule.total_steps:
                break
            self.one_epoch(epoch, first_position if epoch == first_epoch else 0)
        self.bar.close()

    def one_epoch(self, epoch: int, position: int) -> None:
        run = self.run
        batches = run.data.plan.batches(epoch)
        slicing = Slicing(run.info.world_size, run.cfg.accumulation_steps)
        schedule = list(slicing.steps(len(batches), position, run.info.rank))
        schedule = schedule[:self.schedule.total_steps - self.state.step]
        micro = iter(run.loader(run.data.dataset, [batches[i] for _, indices in schedule for i in indices]))
        samples_before = [0]
        for batch in batches:
            samples_before.append(samples_before[-1] + len(batch))
        for position_after, indices in schedule:
            if self.state.step >= self.schedule.total_steps:
                break  # --max-minutes ended the run early
            self.one_step([next(micro) for _ in indices])
            self.state.epoch, self.state.position = epoch, position_after
            self.state.samples = samples_before[position_after]
            self.after_step()

    def one_step(self, micro: list[dict[str, Any]]) -> None:
        run = self.run
        for batch in micro:
            self.pending_bad += batch["bad"]
        micro = [b for b in micro if b["input_ids"] is not None]
        if not micro and run.info.enabled:
            raise UserError(f"--data {run.settings.data}: every sample of a micro-batch was unusable "
                            f"({self.pending_bad[-1]}); fix the data or raise --batch-size")
        lr = self.schedule.lr(self.state.step, run.cfg)
        if micro:
            optim.set_lr(run.optimizer, lr)
            inputs = [model_inputs(b) for b in micro]
            loss_sum, self.grad_norm = train_step(run.train_model, inputs, run.optimizer, run.precision,
                                                  run.cfg.grad_clip, run.device, self.objective)
            self.window.add(loss_sum, sum(self.objective.units(b) for b in inputs),
                            sum(input_tokens(b) for b in inputs))
        self.lr = lr
        self.state.step += 1
        self.bar.update(1)

    def after_step(self) -> None:
        settings, step, schedule = self.run.settings, self.state.step, self.schedule
        schedule.clock_used = self.clock()
        if step < schedule.total_steps and schedule.clock_used >= 1.0:
            schedule.total_steps = step
        last = step >= schedule.total_steps
        evaluate = self.run.data.val is not None and (last or (settings.eval_every and step % settings.eval_every == 0))
        log_step = step % settings.log_every == 0
        save = last or self.save_due(step, log_step)
        if last or evaluate or save or log_step:
            seconds = time.perf_counter() - self.window.began  # training time only, not validation
            self.log(seconds, val_loss=validate(self.run, self.objective) if evaluate else None)
            if save:
                self.save()
            self.window.reset()

    def save_due(self, step: int, log_step: bool) -> bool:
        """A checkpoint every --save-every steps, or else every --save-minutes of training. The clock is read at log
        steps only (which read the loss back anyway), so a step never waits for it."""
        settings = self.run.settings
        if settings.save_every:
            return step % settings.save_every == 0
        if not settings.save_minutes or not log_step:
            return False
        return self.rank0(time.perf_counter() - self.last_save) >= 60 * settings.save_minutes

    def clock(self) -> float:
        """Share of --max-minutes used (0 without a limit)."""
        if self.run.cfg.max_minutes is None:
            return 0.0
        return self.rank0((time.perf_counter() - self.schedule.began) / (60 * self.run.cfg.max_minutes))

    def rank0(self, reading: float) -> float:
        """Rank 0's value of a clock reading, so that every process takes the same branch on it."""
        if not self.run.info.enabled:
            return reading
        value = torch.tensor(reading, device=self.run.device)
        torch.distributed.broadcast(value, src=0)
        return float(value)

    def elapsed(self) -> float:
        return self.state.elapsed + time.perf_counter() - self.schedule.began

    def log(self, seconds: float, val_loss: float | None) -> None:
        ce, supervised, tokens = self.window.totals()
        self.check_bad_samples()
        self.state.tokens += int(tokens)
        record = {"step": self.state.step, "epoch": self.state.epoch, "loss": ce / max(supervised, 1),
                  "lr": self.lr, "tokens": self.state.tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
                  "elapsed": round(self.elapsed(), 3), "grad_norm": float(self.grad_norm),
                  **self.objective.window_metrics()}
        if val_loss is not None:
            record["val_loss"] = val_loss
        if self.metrics is not None:
            self.metrics.log(record)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{self.lr:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            if val_loss is not None:
                self.say(f"step {self.state.step}: validation loss {val_loss:.4f}")

    def check_bad_samples(self) -> None:
        """Samples that broke during training (an image that will not decode), counted across processes."""
        found = [bad for part in distributed.all_gather_objects(self.pending_bad) for bad in part]
        self.pending_bad = []
        tracker = self.run.data.bad
        before = tracker.bad
        tracker.add(found)
        if tracker.bad > before:
            self.say(f"bad samples so far: {tracker.counts_text()}")
        tracker.check()

    def save(self) -> None:
        run = self.run
        rng_states = distributed.all_gather_objects(checkpoint.rng_state())
        if run.info.is_main:
            saved = {**self.state.saved(), "elapsed": self.elapsed(), "world_size": run.info.world_size,
                     "frozen_fingerprint": checkpoint.frozen_fingerprint(run.model), "config": run.cfg.to_dict()}
            checkpoint.save(run.out, self.state.step, run.model, run.optimizer, run.precision.scaler, rng_states,
                            saved, run.settings.keep_checkpoints)
        distributed.barrier()
        self.last_save = time.perf_counter()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            plot_loss(self.metrics.records, self.run.out / "loss.png",
                      f"minimind-v {self.run.cfg.stage}: {self.run.out.name}", self.objective.loss_name)


def validate(run: Run, objective: Objective = CROSS_ENTROPY) -> float:
    val = run.data.val
    order = sorted(range(len(val)), key=lambda i: int(val.lengths[i]))  # little padding
    size = run.cfg.batch_size
    chunks = [order[i:i + size] for i in range(0, len(order), size)]
    loader = run.loader(val, chunks[run.info.rank::run.info.world_size])
    batches = (model_inputs(b) for b in loader if b["input_ids"] is not None)
    loss, n = validation_sums(run.model, batches, run.precision, run.device, objective)
    return loss / max(n, 1)


def finish(run: Run, steps: int, elapsed: float, say: Any) -> None:
    """The trained model in OUT/model, swapped in whole."""
    if run.info.is_main:
        target, tmp = run.out / "model", run.out / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        run.model.save_pretrained(tmp, tokenizer=run.start.tokenizer)
        replace_dir(tmp, target)
        peak = devices.peak_memory_mb(run.device)
        say(f"done: {steps} steps in {elapsed:.1f} s; model in {target}; peak memory {peak['mb']:,.0f} MB "
            f"({peak['kind']})")
    distributed.barrier()
