"""One training run from start (or checkpoint) to OUT/model: set-up, the step loop, logging, saving."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from minimind_v.data.batching import BatchPlan, Collator
from minimind_v.errors import UserError
from minimind_v.fileio import replace_dir
from minimind_v.train import build, checkpoint, distributed, features, freezing, optim
from minimind_v.train.config import TrainConfig, warmup_steps
from minimind_v.train.distributed import DistInfo
from minimind_v.train.metrics import MetricsLog, RunLog, Tracker, plot_loss
from minimind_v.train.sampler import Slicing
from minimind_v.train.stages import get_stage
from minimind_v.train.step import Batch, Precision, input_tokens, supervised_tokens, train_step, validation_sums

MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "segment_ids", "position_ids", "pixel_values",
                "image_features")


def model_inputs(batch: dict[str, Any]) -> Batch:
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


class Session:
    def __init__(self, opts: Any, info: DistInfo, cfg: TrainConfig, start: build.Start,
                 resume_from: Path | None) -> None:
        self.opts, self.info, self.cfg, self.start, self.resume_from = opts, info, cfg, start, resume_from
        self.out = Path(opts.out)
        self.stage = get_stage(cfg.stage)
        self.device = info.device
        self.step, self.epoch, self.position = 0, 0, 0
        self.tokens_seen, self.elapsed_before = 0, 0.0
        self.pending_bad: list[Any] = []
        self.lr, self.grad_norm = 0.0, torch.zeros(())
        self.log: RunLog | None = None
        self.metrics: MetricsLog | None = None

    # ---- the run -----------------------------------------------------------------------------

    def run(self) -> None:
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.log = RunLog(self.out, echo=sys.stderr)
        distributed.barrier()
        try:
            self._setup()
            self._train()
            self._finish()
        finally:
            self._close()

    def say(self, text: str) -> None:
        if self.log is not None:
            self.log.line(text)

    def _setup(self) -> None:
        cfg, info = self.cfg, self.info
        self.say(f"command: minimind-v {' '.join(sys.argv[1:])}")
        self.say(f"config: {json.dumps(cfg.to_dict())}")
        build.seed_everything(cfg.seed)  # the same initial weights on every process
        model, notes = build.build_model(self.start, cfg.model)
        for note in notes:
            self.say(f"--from {self.start.path}: {note}")
        freezing.apply_policy(model, cfg.freeze, train_vision=not cfg.model.vision.freeze,
                              uses_images=self.stage.uses_images)
        self.model = model.to(self.device)
        total, trainable = freezing.count_parameters(model)
        self.say(f"parameters: {total:,} total, {trainable:,} trainable (freeze={cfg.freeze}); "
                 f"{info.world_size} process(es) on {self.device}")
        self.precision = Precision.choose(cfg.dtype, self.device)
        self._setup_data()
        try:
            self.optimizer = optim.build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                                   cfg.adam_eps)
        except ValueError as err:
            raise UserError(f"--freeze {cfg.freeze}: {err}") from None
        if self.resume_from is not None:
            self._restore(self.resume_from)
        else:
            build.seed_everything(cfg.seed + info.rank)  # dropout differs across processes
        self.train_model = self._wrap(model)

    def _setup_data(self) -> None:
        cfg, opts = self.cfg, self.opts
        uses_images = self.stage.uses_images
        preprocessor = build.image_preprocessor(self.start, cfg.model) if uses_images else None
        cached = uses_images and self.model.vision.frozen and opts.feature_cache is not False
        self.dataset = build.open_data(opts.data, opts.images, self.start.tokenizer, cfg.model, preprocessor,
                                       cfg.max_seq_len, decode_images=not cached)
        self.tracker = self.dataset.tracker(cfg.max_bad_fraction)  # raises when the file is already too broken
        summary = self.tracker.summary()
        self.say(f"data: {len(self.dataset)} usable samples of {summary['total']} in {opts.data}; "
                 f"bad: {summary['bad']} {summary['reasons']}; examples: {summary['examples']}")
        self.val = None
        if opts.val_data:
            self.val = build.open_data(opts.val_data, opts.images, self.start.tokenizer, cfg.model, preprocessor,
                                       cfg.max_seq_len, decode_images=not cached)
            self.say(f"validation: {len(self.val)} usable samples ({len(self.val.bad_upfront)} bad) in {opts.val_data}")
        pack_len = cfg.max_seq_len if cfg.batching == "packed" else None
        self.collate: Any = Collator(self.start.tokenizer.pad_token_id, pack_len)
        if cached:
            self.collate = features.WithCachedFeatures(self.collate, self._feature_cache(preprocessor))
        self.plan = BatchPlan(self.dataset.lengths, cfg.batch_size, cfg.batching, cfg.max_seq_len, cfg.seed)

    def _feature_cache(self, preprocessor: Any) -> Any:
        root = Path(self.opts.feature_cache_dir or self.out / "feature_cache")
        if self.info.is_main:  # one writer; the others read once it is complete
            cache = features.open_cache(self.model, preprocessor, root)

            def encode(pixels: torch.Tensor) -> torch.Tensor:
                with self.precision.autocast():
                    return self.model.encode_images(pixels.to(self.device))

            datasets = [self.dataset] + ([self.val] if self.val is not None else [])
            features.fill_cache(cache, datasets, preprocessor, encode, self.say)
        distributed.barrier()
        return cache if self.info.is_main else features.open_cache(self.model, preprocessor, root)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        wrapped = torch.compile(model) if self.opts.compile else model
        if self.info.enabled:
            # Batches without images leave the projector (and MoE experts) unused on some steps.
            unused = self.stage.uses_images or self.cfg.model.lm.use_moe
            ids = [self.device.index] if self.device.type == "cuda" else None
            # The only buffers are constant RoPE tables: broadcasting them every step would be wasted traffic.
            wrapped = DistributedDataParallel(wrapped, device_ids=ids, find_unused_parameters=unused,
                                              forward_sync_buffers=False)
        return wrapped

    def _restore(self, path: Path) -> None:
        state = checkpoint.read_state(path)
        rng_states = checkpoint.load(path, self.model, self.optimizer, self.precision.scaler)
        if checkpoint.frozen_fingerprint(self.model) != state["frozen_fingerprint"]:
            raise UserError(f"--resume: the frozen weights differ from those {path} was trained on (--from changed?)")
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.tokens_seen, self.elapsed_before = state["tokens"], state["elapsed"]
        rank = self.info.rank
        if rank < len(rng_states):
            checkpoint.set_rng_state(rng_states[rank])
        else:  # more processes than the run had: a fresh, still reproducible, dropout stream
            build.seed_everything(self.cfg.seed + 1000 * self.step + rank)
        self.say(f"resumed from {path}: step {self.step}, epoch {self.epoch}, batch {self.position} "
                 f"({state['samples']} samples of that epoch consumed), saved by {len(rng_states)} process(es), "
                 f"now {self.info.world_size}")

    # ---- the loop ----------------------------------------------------------------------------

    def _steps_left(self, epoch: int, position: int) -> int:
        slicing = Slicing(self.info.world_size, self.cfg.accumulation_steps)
        return sum(slicing.steps_left(len(self.plan.batches(e)), position if e == epoch else 0)
                   for e in range(epoch, self.cfg.epochs))

    def _train(self) -> None:
        cfg = self.cfg
        self.total_steps = self.step + self._steps_left(self.epoch, self.position)
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        if self.total_steps == 0:
            raise UserError(f"--data {self.opts.data}: {len(self.dataset)} samples fill no optimizer step of "
                            f"{self.info.world_size * cfg.accumulation_steps} batches of {cfg.batch_size}")
        self.warmup = warmup_steps(cfg, self.total_steps)
        self.say(f"steps: {self.step} done, {self.total_steps} in all; warmup {self.warmup}; "
                 f"{cfg.batch_size} x {self.info.world_size} x {cfg.accumulation_steps} samples per step")
        if self.info.is_main:
            trackers = [Tracker(kind, self.out, cfg.to_dict()) for kind in self.opts.log_to]
            self.metrics = MetricsLog(self.out, trackers, resume_step=self.step)
        self.bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.info.is_main, unit="step",
                        dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
        self.started, self.first_step, self.clock_used = time.perf_counter(), self.step, 0.0
        self._reset_window()
        first_epoch, first_position = self.epoch, self.position
        for epoch in range(first_epoch, cfg.epochs):
            if self.step >= self.total_steps:
                break
            self._train_epoch(epoch, first_position if epoch == first_epoch else 0)
        self.bar.close()

    def _train_epoch(self, epoch: int, position: int) -> None:
        batches = self.plan.batches(epoch)
        slicing = Slicing(self.info.world_size, self.cfg.accumulation_steps)
        schedule = list(slicing.steps(len(batches), position, self.info.rank))
        schedule = schedule[:self.total_steps - self.step]
        loader = self._loader(self.dataset, [batches[i] for _, indices in schedule for i in indices])
        micro = iter(loader)
        for position_after, indices in schedule:
            if self.step >= self.total_steps:
                break  # --max-minutes ended the run early
            self._step([next(micro) for _ in indices])
            self.epoch, self.position = epoch, position_after
            self.samples_done = sum(len(b) for b in batches[:position_after])
            self._after_step()

    def _loader(self, dataset: Any, batch_list: list[list[int]]) -> torch.utils.data.DataLoader:
        workers = self.opts.num_workers
        if workers is None:
            workers = 4 if self.device.type == "cuda" else 0
        # An own generator: DataLoader would otherwise draw its seed from the global RNG that dropout uses,
        # and a resumed run (one loader fewer) would then drop out differently.
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_list, collate_fn=self.collate,
                                           num_workers=workers, pin_memory=self.device.type == "cuda",
                                           generator=torch.Generator().manual_seed(self.cfg.seed))

    def _step(self, micro: list[dict[str, Any]]) -> None:
        cfg = self.cfg
        for batch in micro:
            self.pending_bad += batch["bad"]
        micro = [b for b in micro if b["input_ids"] is not None]
        if not micro and self.info.enabled:
            raise UserError(f"--data {self.opts.data}: every sample of a micro-batch was unusable "
                            f"({self.pending_bad[-1]}); fix the data or raise --batch-size")
        lr = optim.lr_at(self._schedule_step(), cfg.lr, self.warmup, self.total_steps, cfg.min_lr_ratio)
        if micro:
            optim.set_lr(self.optimizer, lr)
            inputs = [model_inputs(b) for b in micro]
            ce_sum, self.grad_norm = train_step(self.train_model, inputs, self.optimizer, self.precision,
                                                cfg.grad_clip, self.device)
            self.window_ce += ce_sum
            self.window_supervised += sum(supervised_tokens(b) for b in inputs)
            self.window_tokens += sum(input_tokens(b) for b in inputs)
        self.lr = lr
        self.step += 1
        self.bar.update(1)

    def _clock(self) -> float:
        """Share of --max-minutes used (0 without a limit); every process sees rank 0's clock."""
        if self.opts.max_minutes is None:
            return 0.0
        used = torch.tensor((time.perf_counter() - self.started) / (60 * self.opts.max_minutes), device=self.device)
        if self.info.enabled:
            torch.distributed.broadcast(used, src=0)
        return float(used)

    def _schedule_step(self) -> int:
        """Where the learning-rate schedule stands: at the step, or further on where the clock says so.

        Under --max-minutes a run that would reach its time cap before its last step decays on the clock
        (the steps left shrunk in proportion to the time left), so it still ends at the floor instead of
        being cut off at a high learning rate; a run on schedule is unaffected.
        """
        return optim.schedule_step(self.step, self.first_step, self.total_steps, self.clock_used)

    def _reset_window(self) -> None:
        self.window_ce = torch.zeros((), device=self.device)
        self.window_supervised, self.window_tokens = 0, 0
        self.window_start = time.perf_counter()

    def _after_step(self) -> None:
        opts, step = self.opts, self.step
        self.clock_used = self._clock()
        if step < self.total_steps and self.clock_used >= 1.0:
            self.total_steps = step
        last = step >= self.total_steps
        evaluate = self.val is not None and (last or (opts.eval_every and step % opts.eval_every == 0))
        save = last or (opts.save_every and step % opts.save_every == 0)
        if last or evaluate or save or step % opts.log_every == 0:
            seconds = time.perf_counter() - self.window_start  # training time only, not validation
            self._log(seconds, val_loss=self._validate() if evaluate else None)
            if save:
                self._save()
            self._reset_window()

    # ---- logging, validation, saving ---------------------------------------------------------

    def _log(self, seconds: float, val_loss: float | None) -> None:
        sums = torch.stack([self.window_ce.double(), torch.tensor(float(self.window_supervised), device=self.device),
                            torch.tensor(float(self.window_tokens), device=self.device)]).double()
        ce, supervised, tokens = distributed.all_reduce_sum(sums).tolist()  # the one host sync per log line
        self._check_bad_samples()
        self.tokens_seen += int(tokens)
        record = {"step": self.step, "epoch": self.epoch, "loss": ce / max(supervised, 1), "lr": self.lr,
                  "tokens": self.tokens_seen, "tokens_per_s": tokens / max(seconds, 1e-9),
                  "elapsed": round(self.elapsed(), 3), "grad_norm": float(self.grad_norm)}
        if val_loss is not None:
            record["val_loss"] = val_loss
        if self.metrics is not None:
            self.metrics.log(record)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{self.lr:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            if val_loss is not None:
                self.say(f"step {self.step}: validation loss {val_loss:.4f}")

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def _check_bad_samples(self) -> None:
        """Samples that broke during training (an image that will not decode), counted across processes."""
        found = [bad for part in distributed.all_gather_objects(self.pending_bad) for bad in part]
        self.pending_bad = []
        before = self.tracker.bad
        self.tracker.add(found)
        if self.tracker.bad > before:
            self.say(f"bad samples so far: {self.tracker.counts_text()}")
        self.tracker.check()

    def _validate(self) -> float:
        order = sorted(range(len(self.val)), key=lambda i: int(self.val.lengths[i]))  # little padding
        size = self.cfg.batch_size
        chunks = [order[i:i + size] for i in range(0, len(order), size)]
        loader = self._loader(self.val, chunks[self.info.rank::self.info.world_size])
        batches = (model_inputs(b) for b in loader if b["input_ids"] is not None)
        ce, n = validation_sums(self.model, batches, self.precision, self.device)
        return ce / max(n, 1)

    def _save(self) -> None:
        rng_states = distributed.all_gather_objects(checkpoint.rng_state())
        if self.info.is_main:
            state = {"step": self.step, "epoch": self.epoch, "position": self.position,
                     "samples": self.samples_done, "world_size": self.info.world_size,
                     "tokens": self.tokens_seen, "elapsed": self.elapsed(),
                     "frozen_fingerprint": checkpoint.frozen_fingerprint(self.model),
                     "config": self.cfg.to_dict()}
            checkpoint.save(self.out, self.step, self.model, self.optimizer, self.precision.scaler, rng_states,
                            state, self.opts.keep_checkpoints)
        distributed.barrier()

    def _finish(self) -> None:
        if self.info.is_main:
            target, tmp = self.out / "model", self.out / ".tmp-model"
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(tmp, tokenizer=self.start.tokenizer)
            replace_dir(tmp, target)
            self.say(f"done: {self.step} steps in {self.elapsed():.1f} s; model in {target}")
        distributed.barrier()

    def _close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            plot_loss(self.metrics.records, self.out / "loss.png", f"minimind-v {self.cfg.stage}: {self.out.name}")
        if self.log is not None:
            self.log.close()
