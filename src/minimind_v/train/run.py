"""Setting a run up: the model with its starting weights and freezing, the data, the optimizer.

`set_up` returns a `Run`, what the loop (train/loop.py) works with and never replaces, and the
`LoopState` it starts from (a checkpoint's on --resume). The order
of the steps is part of the contract: the initial weights, the data order and dropout all come
from seeded generators, so the same config gives the same run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from minimind_v.data.batching import BatchPlan, Collator, bucket_widths
from minimind_v.data.dataset import BadSampleTracker, VLMDataset
from minimind_v.data.feature_cache import NoRoom
from minimind_v.data.preference import PairCollate, open_pairs
from minimind_v.errors import UserError
from minimind_v.model.vlm import MiniMindVLM
from minimind_v.train import build, checkpoint, distributed, features, freezing, lora, optim
from minimind_v.train.config import TrainConfig
from minimind_v.train.distributed import DistInfo
from minimind_v.train.settings import RunSettings
from minimind_v.train.state import LoopState
from minimind_v.train.stages import get_stage
from minimind_v.train.step import Precision

Say = Callable[[str], None]


@dataclass
class Data:
    """The training (and validation) samples, how they are batched and collated."""

    dataset: VLMDataset
    val: VLMDataset | None
    bad: BadSampleTracker
    collate: Callable[[list[Any]], dict[str, Any]]
    plan: BatchPlan


@dataclass
class Run:
    cfg: TrainConfig
    settings: RunSettings
    info: DistInfo
    start: build.Start
    model: MiniMindVLM
    train_model: torch.nn.Module
    """The model as the step calls it: compiled and/or wrapped in DDP."""
    optimizer: torch.optim.Optimizer
    precision: Precision
    data: Data

    @property
    def out(self) -> Path:
        return Path(self.settings.out)

    @property
    def device(self) -> torch.device:
        return self.info.device

    def loader(self, dataset: VLMDataset, batches: list[list[int]]) -> torch.utils.data.DataLoader:
        workers = self.settings.num_workers
        if workers is None:
            workers = 4 if self.device.type == "cuda" else 0
        # An own generator: DataLoader would otherwise draw its seed from the global RNG that dropout uses,
        # and a resumed run (one loader fewer) would then drop out differently.
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=self.data.collate,
                                           num_workers=workers, pin_memory=self.device.type == "cuda",
                                           generator=torch.Generator().manual_seed(self.cfg.seed))


def set_up(cfg: TrainConfig, start: build.Start, settings: RunSettings, info: DistInfo, resume_from: Path | None,
           say: Say) -> tuple[Run, LoopState]:
    """Build everything a run needs, and where its loop stands: at the start, or at `resume_from`'s step."""
    build.seed_everything(cfg.seed)  # the same initial weights on every process
    model, notes = build.build_model(start, cfg.model)
    for note in notes:
        say(f"--from {start.path}: {note}")
    lora.add_adapter(model, cfg, start.tokenizer)
    uses_images = get_stage(cfg.stage).uses_images
    freezing.apply_policy(model, cfg.freeze, train_vision=not cfg.model.vision.freeze, uses_images=uses_images,
                          lora=cfg.lora.lora_rank > 0)
    model = model.to(info.device)
    total, trainable = freezing.count_parameters(model)
    say(f"parameters: {total:,} total, {trainable:,} trainable (freeze={cfg.freeze}{lora.describe(cfg)}); "
        f"{info.world_size} process(es) on {info.device}")
    precision = Precision.choose(cfg.dtype, info.device)
    precision.set_backends()
    data = open_data(cfg, start, settings, info, model, precision, say)
    try:
        optimizer = build_optimizer(model, cfg)
    except ValueError as err:
        raise UserError(f"--freeze {cfg.freeze}: {err}") from None
    if resume_from is not None:
        state = restore(resume_from, model, optimizer, precision, cfg, info, say)
    else:
        state = LoopState()
        build.seed_everything(cfg.seed + info.rank)  # dropout differs across processes
    train_model = wrap(model, cfg, settings, info)
    return Run(cfg, settings, info, start, model, train_model, optimizer, precision, data), state


def restore(path: Path, model: MiniMindVLM, optimizer: torch.optim.Optimizer, precision: Precision,
            cfg: TrainConfig, info: DistInfo, say: Say) -> LoopState:
    """Weights, optimizer, generators and the loop's state from checkpoint `path`."""
    saved = checkpoint.read_state(path)
    rng_states = checkpoint.load(path, model, optimizer, precision.scaler)
    if checkpoint.frozen_fingerprint(model) != saved["frozen_fingerprint"]:
        raise UserError(f"--resume: the frozen weights differ from those {path} was trained on (--from changed?)")
    state = LoopState.from_saved(saved)
    if info.rank < len(rng_states):
        checkpoint.set_rng_state(rng_states[info.rank])
    else:  # more processes than the run had: a fresh, still reproducible, dropout stream
        build.seed_everything(cfg.seed + 1000 * state.step + info.rank)
    say(f"resumed from {path}: step {state.step}, epoch {state.epoch}, batch {state.position} "
        f"({state.samples} samples of that epoch consumed), saved by {len(rng_states)} process(es), "
        f"now {info.world_size}")
    return state


def shapes(dataset: VLMDataset, cfg: TrainConfig, settings: RunSettings) -> dict[str, Any]:
    """A compiled model's batch shapes: a few widths, all rows, so that few graphs are compiled (none without
    --compile: padding that nothing needs would only cost time). Packed rows are max_seq_len wide, but how many
    rows a batch packs into varies."""
    if not settings.compile:
        return {}
    if cfg.batching == "packed":
        return {"widths": (cfg.max_seq_len,)}
    widths = bucket_widths(dataset.lengths, settings.length_buckets)
    # A DPO batch's rows are its pairs' chosen then rejected answers; rows added after them would pair with nothing.
    if cfg.stage == "dpo":
        return {"widths": widths}
    return {"widths": widths, "rows": cfg.batch_size, "tokens": batch_tokens(cfg)}


def batch_tokens(cfg: TrainConfig) -> int | None:
    """One micro-batch's share of --tokens-per-step."""
    return None if cfg.tokens_per_step is None else cfg.tokens_per_step // cfg.accumulation_steps


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """The config's AdamW over what trains: the one optimizer every training loop uses."""
    return optim.build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps,
                                 lora_plus=cfg.lora.lora_plus)


def open_data(cfg: TrainConfig, start: build.Start, settings: RunSettings, info: DistInfo, model: MiniMindVLM,
              precision: Precision, say: Say) -> Data:
    uses_images = get_stage(cfg.stage).uses_images
    preprocessor = build.image_preprocessor(start, cfg.model) if uses_images else None
    cached = bool(cfg.feature_cache)

    cache_dir = build.encodings_dir(settings.encodings_dir)
    open_file = open_pairs if cfg.stage == "dpo" else build.open_data  # preference pairs: data/preference.py

    def read(path: str, training: bool) -> VLMDataset:
        dataset = open_file(path, settings.images, start.tokenizer, cfg.model, preprocessor, cfg.max_seq_len,
                            decode_images=not cached, augment=cfg.augment if training else None, seed=cfg.seed,
                            cache_dir=cache_dir)
        say(f"{path}: {dataset.pass_note}")
        return dataset

    if not info.is_main and cache_dir is not None:
        distributed.barrier()  # rank 0 encodes (in worker processes) and stores; the others then read its files
    dataset = read(settings.data, training=True)
    bad = dataset.tracker(cfg.max_bad_fraction)  # raises when the file is already too broken
    summary = bad.summary()
    say(f"data: {len(dataset)} usable samples of {summary['total']} in {settings.data}; "
        f"bad: {summary['bad']} {summary['reasons']}; examples: {summary['examples']}")
    val = read(settings.val_data, training=False) if settings.val_data else None
    if info.is_main and cache_dir is not None:
        distributed.barrier()
    if val is not None:
        say(f"validation: {len(val)} usable samples ({len(val.bad_upfront)} bad) in {settings.val_data}")
    pack_len = cfg.max_seq_len if cfg.batching == "packed" else None
    padded = shapes(dataset, cfg, settings)
    collate: Any = Collator(start.tokenizer.pad_token_id, pack_len, **padded)
    if cached:
        root = Path(settings.feature_cache_dir or Path(settings.out) / "feature_cache")
        datasets = [d for d in (dataset, val) if d is not None]
        cache = feature_cache(model, preprocessor, root, datasets, info, precision, cfg.feature_cache_dtype, say)
        if cache is None:  # no room for it: the tower encodes each batch's images instead
            for each in datasets:
                each.settings.decode_images = True
        else:
            collate = features.WithCachedFeatures(collate, cache)
    if cfg.stage == "dpo":
        collate = PairCollate(collate)  # a batch of P pairs: P chosen rows, then their P rejected rows
    plan = BatchPlan(dataset.lengths, cfg.batch_size, cfg.batching, cfg.max_seq_len, cfg.seed,
                     tokens=batch_tokens(cfg), widths=padded.get("widths", ()) if pack_len is None else ())
    return Data(dataset, val, bad, collate, plan)


def feature_cache(model: MiniMindVLM, preprocessor: Any, root: Path, datasets: list[VLMDataset], info: DistInfo,
                  precision: Precision, dtype: str, say: Say) -> Any:
    """The frozen tower's features of every image of `datasets`: each process encodes its share, then all read all;
    None when they do not fit on the disk (said)."""
    cache = features.open_cache(model, preprocessor, root, dtype)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with precision.autocast():
            return model.encode_images(pixels.to(info.device))

    try:
        features.fill_cache(cache, datasets, preprocessor, encode, say if info.is_main else (lambda _: None),
                            share=(info.rank, info.world_size))
        room = ""
    except NoRoom as err:
        room = str(err)
    short = [r for r in distributed.all_gather_objects(room) if r]  # every rank takes the same road
    if short:
        say(f"{short[0]}: the images are encoded by the tower at every step instead (free disk, or point "
            "--feature-cache-dir elsewhere, to cache them)")
        return None
    if info.enabled:
        cache.reload()  # the other ranks' shards
    return cache


def compile_model(model: torch.nn.Module, use_moe: bool, packed: bool,
                  length_buckets: int = RunSettings.length_buckets) -> torch.nn.Module:
    """torch.compile as `train --compile` (and bench's fast mode) runs it.

    Batches come in a few padded shapes (`shapes`): one static graph for each, while the counts of images and
    supervised positions vary inside a shape as symbols (step.VARYING_SIZES). A shape may also come with no image
    or with one (sizes 0 and 1 are always specialised): hence the higher recompile limit. Packed batches vary in
    rows, so their shapes are left to dynamo. fullgraph: a graph break is an error, not a silent split; MoE
    routing has data-dependent shapes (tokens per expert), so there dynamo may split.
    """
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 3 * length_buckets + 2)
    return torch.compile(model, fullgraph=not use_moe, dynamic=None if packed else False)


def wrap(model: MiniMindVLM, cfg: TrainConfig, settings: RunSettings, info: DistInfo) -> torch.nn.Module:
    """The model the step calls: compiled on request, in DDP under torchrun. A LoRA adapter's layers are plain
    modules inside `model`, so both take them as they are (DDP syncs only what learns: the adapter, not the base);
    checkpoints and OUT/model are written from `model` itself, never from the wrapper's renamed parameters."""
    wrapped: torch.nn.Module = model
    if settings.compile:
        wrapped = compile_model(model, cfg.model.lm.use_moe, cfg.batching == "packed", settings.length_buckets)
    if info.enabled:
        # Batches without images leave the projector (and MoE experts) unused on some steps.
        unused = get_stage(cfg.stage).uses_images or cfg.model.lm.use_moe
        ids = [info.device.index] if info.device.type == "cuda" else None
        # The only buffers are constant RoPE tables: broadcasting them every step would be wasted traffic.
        wrapped = DistributedDataParallel(wrapped, device_ids=ids, find_unused_parameters=unused,
                                          forward_sync_buffers=False)
    return wrapped
