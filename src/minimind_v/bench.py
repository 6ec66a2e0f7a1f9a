"""`minimind-v bench`: training throughput of one preset and stage, the original's way against ours.

Both modes run the real model and optimizer on the same synthetic batches at the preset's true
shapes (one image of random pixels per sample, a prompt, an answer), from the same initial
weights, with the stage's trainable set (pretrain: the projector; sft: LLM + projector):

- naive, the original loop: every sample padded to the stage's max length, the frozen vision
  tower run on every step, logits over every position, plain AdamW.
- fast: dynamic padding (each batch as long as its longest sample; right padding needs no
  attention mask under a causal model), image features taken from a cache built once before the
  clock starts (what data/feature_cache.py gives a real run), the LM head only at supervised
  positions, fused AdamW, and on CUDA the model compiled as `train --compile` compiles it.

Both compute the same objective, so their first-step losses agree (a check printed in the JSON).
With `--data` the samples are a data set's own (e.g. `synth --like`'s stand-ins of the original data at their
real sizes), read as `train` reads them: its reader, chat template and image preprocessing; the report then
adds the set-up `train` spends before its first step (the up-front pass over the records, the tower encoding
each image once) and the epoch time both loops imply.
Generation is timed too, through the engine every chat, web and serve request goes through.
Model FLOPs count only the useful work at the real length (no padding, no per-step tower, the LM
head where supervised); MFU divides them by the device's dense bf16 peak when it is known.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from minimind_v.bench_samples import (
    Batch,
    DataReport,
    Sample,
    bench_config,
    data_samples,
    make_batches,
    synthetic_samples,
)
from minimind_v.constants import IGNORE_INDEX
from minimind_v.data.batching import Collator, bucket_widths
from minimind_v.data.dataset import Sample as DataSample
from minimind_v.data.images import ImagePreprocessor
from minimind_v.devices import (
    bf16_peak,
    device_name,
    now,
    peak_memory_mb,
    resolve_device,
)
from minimind_v.errors import UserError
from minimind_v.model.config import VLMConfig
from minimind_v.model.vlm import MiniMindVLM
from minimind_v.train import optim
from minimind_v.train.config import TrainConfig, for_stage
from minimind_v.train.freezing import apply_policy
from minimind_v.train.loop import model_inputs
from minimind_v.train.run import build_optimizer, compile_model
from minimind_v.train.stages import get_stage
from minimind_v.train.step import (
    Precision,
    apply_gradients,
    backward,
    supervised_tokens,
    train_step,
)


@dataclass
class BenchOptions:
    preset: str = "minimind2-small-v"
    """Model preset; a tower that would be downloaded is built with random weights from its config instead."""
    stage: Literal["pretrain", "sft"] = "pretrain"
    """pretrain: the projector learns, captions; sft: LLM + projector learn, conversations."""
    steps: int = 3
    """Timed optimizer steps per mode."""
    warmup: int = 1
    """Untimed steps first (allocator, kernels, compilation)."""
    mode: Literal["naive", "fast", "both"] = "both"
    """Which loop to time; both also reports fast/naive."""
    batch_size: int = 8
    """Samples per step."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    max_seq_len: int | None = None
    """Length the naive loop pads to; default the stage's (pretrain 640, sft 1536)."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the model in fast mode as `train --compile` does; auto: on CUDA only (on 2 CPU cores it
    costs minutes)."""
    seed: int = 0
    """Seed of the weights and of the synthetic data."""
    generate: bool = True
    """Also time generation through the engine: greedy, batch 1, one image + 54-token prompt, 100 new tokens."""
    data: str | None = None
    """A data file (jsonl or parquet) whose samples are timed, drawn at random, instead of synthetic tokens."""
    images: str | None = None
    """The data's image folder (default: beside the data file, as `train --images`)."""
    tokenizer: str | None = None
    """Tokenizer directory for --data (the model's vocabulary and placeholder id come from it)."""
    epoch_samples: int | None = None
    """Samples in the epoch whose time is extrapolated; default with --data: the data's usable samples."""
    epochs: int | None = None
    """Epochs the extrapolated total covers (default the stage's: pretrain 4, sft 2, the original's)."""



def main(opts: BenchOptions) -> int:
    print(json.dumps(run(opts), indent=2))
    return 0


@dataclass
class Setup:
    """A model with the stage's trainable set and the synthetic batches both modes run on."""

    cfg: VLMConfig
    model: MiniMindVLM
    batches: list[Batch]
    encode_seconds_per_image: float
    max_len: int
    device: torch.device
    data: DataReport | None = None



def setup(opts: BenchOptions) -> Setup:
    _validate(opts)
    device = resolve_device(opts.device)
    stage = get_stage(opts.stage)
    max_len = opts.max_seq_len or stage.max_seq_len
    n = opts.batch_size * (opts.warmup + opts.steps)
    report = None
    if opts.data is None:
        cfg = bench_config(opts.preset)
        samples = synthetic_samples(cfg, opts.stage, n, max_len, opts.seed)
    else:
        assert opts.tokenizer is not None  # _validate
        cfg, samples, report = data_samples(opts.preset, opts.data, opts.images, opts.tokenizer, n, max_len,
                                            opts.seed)
    torch.manual_seed(opts.seed)
    model = MiniMindVLM(cfg).to(device)
    # The stage's trainable set; the tower stays frozen, as in the recipe whose features can be cached.
    apply_policy(model, stage.freeze, train_vision=False, uses_images=True)
    batches, encode_s = make_batches(model, samples, opts.batch_size, device)
    return Setup(cfg, model, batches, encode_s, max_len, device, report)


def run(opts: BenchOptions) -> dict[str, Any]:
    s = setup(opts)
    samples = [x for b in s.batches for x in b.samples]
    result: dict[str, Any] = {
        "preset": opts.preset, "stage": opts.stage, "device": device_name(s.device),
        "batch_size": opts.batch_size, "timed_steps": opts.steps, "warmup_steps": opts.warmup,
        "naive_max_seq_len": s.max_len,
        "mean_real_tokens_per_sample": round(sum(len(x.input_ids) for x in samples) / len(samples), 1),
        "trainable_parameters": sum(p.numel() for p in s.model.parameters() if p.requires_grad),
        "feature_cache": {"encoded_once_untimed": True, "seconds_per_image": round(s.encode_seconds_per_image, 4)},
    }
    if s.data is not None:
        result["data"] = dataclasses.asdict(s.data)
    initial = copy.deepcopy({k: v for k, v in s.model.state_dict().items() if not k.startswith("vision.")})
    # Fast first: on CPU the peak-memory figure is the process's, which only ever grows.
    for mode in ("fast", "naive"):
        if opts.mode in (mode, "both"):
            s.model.load_state_dict(initial, strict=False)
            result[mode] = time_mode(mode, s, opts)
    if opts.mode == "both":
        result["speedup_fast_over_naive"] = round(result["fast"]["samples_per_s"] / result["naive"]["samples_per_s"], 2)
        result["first_step_loss_gap"] = round(abs(result["fast"]["first_loss"] - result["naive"]["first_loss"]), 5)
    epoch = opts.epoch_samples or (s.data.usable if s.data else None)
    if epoch:
        result["epoch"] = epoch_estimate(result, s, epoch, opts.epochs or get_stage(opts.stage).epochs)
    if opts.generate:
        result["generation"] = generation_speed(s.model, s.device, opts.seed)
    return result


def epoch_estimate(result: dict[str, Any], s: Setup, samples: int, epochs: int) -> dict[str, Any]:
    """Seconds an epoch of `samples` takes in each timed loop at the timed speed, and `epochs` of them in all.
    Ours adds its set-up once: the up-front pass (scaled from the records read) and the tower run once per image
    for the feature cache; the original's loop has neither (it reads records in its loader and runs the tower
    in every step of every epoch)."""
    estimate: dict[str, Any] = {"samples": samples, "epochs": epochs}
    if "fast" in result:
        images = samples * (s.data.images_per_sample if s.data else 1.0)
        pass_s = s.data.up_front_pass_s * samples / s.data.records if s.data else 0.0
        set_up = pass_s + images * s.encode_seconds_per_image
        epoch = samples / result["fast"]["samples_per_s"]
        estimate.update(fast_set_up_s=round(set_up, 1), fast_epoch_s=round(epoch, 1),
                        fast_total_s=round(set_up + epochs * epoch, 1))
    if "naive" in result:
        epoch = samples / result["naive"]["samples_per_s"]
        estimate.update(naive_epoch_s=round(epoch, 1), naive_total_s=round(epochs * epoch, 1))
    if "fast" in result and "naive" in result:
        estimate["naive_over_fast_total"] = round(estimate["naive_total_s"] / estimate["fast_total_s"], 2)
    return estimate


def _validate(opts: BenchOptions) -> None:
    for name in ("steps", "batch_size"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")
    if opts.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {opts.warmup}")
    for name in ("epoch_samples", "epochs"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")
    if opts.data is None and (opts.images or opts.tokenizer):
        raise UserError("--images and --tokenizer describe --data; without --data the samples are synthetic")
    if opts.data is not None and opts.tokenizer is None:
        raise UserError(f"--data {opts.data}: needs --tokenizer DIR (the vocabulary its text is tokenised with)")




# ---- the two loops ------------------------------------------------------------------------------


def naive_inputs(batch: Batch, max_len: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The original's tensors: ids padded with 0 to max_len, then X = ids[:-1], Y = ids[1:], mask on Y."""
    ids = torch.zeros(len(batch.samples), max_len, dtype=torch.long)
    mask = torch.zeros(len(batch.samples), max_len)
    for row, s in enumerate(batch.samples):
        ids[row, :len(s.input_ids)] = torch.tensor(s.input_ids)
        mask[row, :len(s.labels)] = torch.tensor([float(t != IGNORE_INDEX) for t in s.labels])
    return ids[:, :-1].to(device), ids[:, 1:].to(device), mask[:, 1:].to(device)


def naive_loss(model: nn.Module, batch: Batch, max_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(mean CE over the masked targets, MoE aux loss), the original's way."""
    x, y, mask = naive_inputs(batch, max_len, device)
    out = model(x, pixel_values=batch.pixels)  # tower on every step, logits at every position
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), reduction="none").view(y.shape)
    return (ce * mask).sum() / mask.sum(), out.aux_loss


def fast_inputs(batch: Batch, collate: Collator) -> dict[str, Tensor]:
    """The trainer's host batch for these samples, from its Collator (right-padded to the longest row; for a
    compiled model to a bucket width and full rows), the cached features beside it. Right padding under a
    causal mask needs no attention mask (the step drops it), so attention keeps SDPA's fused causal path."""
    samples = [DataSample(torch.tensor(s.input_ids), torch.tensor(s.labels), None, [], "bench")
               for s in batch.samples]
    inputs = model_inputs(collate(samples))
    if batch.features is not None:
        inputs["image_features"] = batch.features
    return inputs


def time_mode(mode: str, s: Setup, opts: BenchOptions) -> dict[str, Any]:
    model, device = s.model, s.device
    cuda = device.type == "cuda"
    compiled = mode == "fast" and (opts.compile == "on" or (opts.compile == "auto" and cuda))
    cfg = for_stage(TrainConfig(stage=opts.stage, model=s.cfg))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    if mode == "fast":
        # Compiled as the trainer compiles (train/run.compile_model), on the shapes its Collator gives then, with
        # one width: the bench times the steady state, where every width of a real run is compiled already, and
        # one width is compiled by the first warmup step.
        lengths = np.array([len(x.input_ids) for b in s.batches for x in b.samples])
        shapes = {"widths": bucket_widths(lengths, 1), "rows": opts.batch_size} if compiled else {}
        step_model = compile_model(model, cfg.model.lm.use_moe, packed=False) if compiled else model
        losses, seconds, cpu_seconds = _timed_fast(step_model, cfg, s.batches, opts.warmup, device,
                                                   Collator(0, **shapes))
    else:
        losses, seconds, cpu_seconds = _timed_naive(model, cfg, s.batches, opts.warmup, s.max_len, device)
    timed = [x for b in s.batches[opts.warmup:] for x in b.samples]
    flops = sum(sample_flops(s.cfg, x, opts.stage) for x in timed)
    peak = bf16_peak(device)
    return {
        "seconds_per_step": round(seconds / opts.steps, 4),
        # CPU time of this process: on a shared machine it moves far less than the wall clock does.
        "cpu_seconds_per_step": round(cpu_seconds / opts.steps, 4),
        "samples_per_s": round(len(timed) / seconds, 3),
        "real_tokens_per_s": round(sum(len(x.input_ids) for x in timed) / seconds, 1),
        "model_tflops_per_s": round(flops / seconds / 1e12, 4),
        "mfu": round(flops / seconds / peak, 4) if peak else None,
        "peak_memory_mb": peak_memory_mb(device),
        "first_loss": round(losses[0], 5),
        "compiled": compiled,
    }


def _timed_fast(model: nn.Module, cfg: TrainConfig, batches: list[Batch], warmup: int, device: torch.device,
                collate: Collator) -> tuple[list[float], float, float]:
    """The trainer's own optimizer and step (train/step.py) on each batch, which takes host tensors as the
    trainer's loader gives them (the step prepares and moves them itself)."""
    optimizer = build_optimizer(model, cfg)
    precision = Precision.choose(cfg.dtype, device)
    precision.set_backends()

    def step(batch: Batch) -> float:
        inputs = fast_inputs(batch, collate)
        ce_sum, _ = train_step(model, [inputs], optimizer, precision, cfg.grad_clip, device)
        return float(ce_sum) / supervised_tokens(inputs)

    return _timed(step, batches, warmup, device)


def _timed_naive(model: nn.Module, cfg: TrainConfig, batches: list[Batch], warmup: int, max_len: int,
                 device: torch.device) -> tuple[list[float], float, float]:
    """The original's loop on each batch, ending in the trainer's gradient step, with the original's AdamW
    (weight decay 0.01, betas 0.9/0.999, the unfused kernel) and clipping at 1."""
    optimizer = optim.build_optimizer(model, cfg.lr, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, fused=False)
    precision = Precision.choose(cfg.dtype, device)
    precision.set_backends()

    def step(batch: Batch) -> float:
        with precision.autocast():
            ce, aux = naive_loss(model, batch, max_len, device)
        backward(ce + aux, precision)
        apply_gradients(optimizer, precision, 1.0)
        return float(ce.detach())

    return _timed(step, batches, warmup, device)


def _timed(step: Callable[[Batch], float], batches: list[Batch], warmup: int,
           device: torch.device) -> tuple[list[float], float, float]:
    """`step` on every batch: the losses, and wall and CPU seconds after the first `warmup` batches."""
    losses, start, cpu_start = [], now(device), time.process_time()
    for i, batch in enumerate(batches):
        if i == warmup:
            start, cpu_start = now(device), time.process_time()
        losses.append(step(batch))
    return losses, now(device) - start, time.process_time() - cpu_start


def sample_flops(cfg: VLMConfig, sample: Sample, stage: str) -> float:
    """Useful training FLOPs of one sample: forward + backward at its real length.

    A frozen matmul still needs its input gradient (1x forward) in backward; a trained one also its
    weight gradient (2x). Attention is 2x forward in backward either way. The LM head counts only
    at supervised positions; the frozen tower not at all (its features are cached).
    """
    lm = cfg.lm
    T = len(sample.input_ids)
    supervised = sum(t != IGNORE_INDEX for t in sample.labels)
    kv = lm.num_key_value_heads * lm.head_dim
    layer_params = 2 * lm.hidden_size * lm.hidden_size + 2 * lm.hidden_size * kv + 3 * lm.hidden_size * lm.ffn_size
    llm_backward = 2 if stage == "sft" else 1  # sft trains the LLM, pretrain only reaches the projector through it
    matmul = 2 * lm.num_hidden_layers * layer_params * T + 2 * lm.hidden_size * lm.vocab_size * supervised
    attention = lm.num_hidden_layers * 4 * lm.hidden_size * T * (T + 1) / 2  # causal QK^T and AV
    projector_params = cfg.vision.hidden_size * lm.hidden_size + (lm.hidden_size ** 2 if cfg.projector == "mlp" else 0)
    projector = 2 * projector_params * sum(t == cfg.image_token_id for t in sample.input_ids)
    return matmul * (1 + llm_backward) + attention * 3 + projector * 3


def generation_speed(model: MiniMindVLM, device: torch.device, seed: int, prompt_text: int = 54,
                     new_tokens: int = 100) -> dict[str, Any]:
    """New tokens per second through the engine (prefill with the tower included, then KV-cached decoding).

    The tokenizer is a stand-in with one word per id and no end token, so every run makes exactly
    `new_tokens` tokens; the image goes through the real CLIP preprocessing.
    """
    from minimind_v.infer.engine import Engine, SamplingParams

    cfg = model.cfg
    preprocess = ImagePreprocessor.for_image_size(cfg.vision.image_size)  # CLIP's recipe at the tower's size
    engine = Engine(model, _stand_in_tokenizer(cfg.lm.vocab_size), preprocess, device)
    rng = random.Random(seed)
    text_ids = [i for i in range(3, cfg.lm.vocab_size) if i != cfg.image_token_id]
    prompt = [cfg.image_token_id] * cfg.image_token_len + [rng.choice(text_ids) for _ in range(prompt_text)]
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    engine.generate([prompt], [[image]], SamplingParams(max_new_tokens=2))  # warm-up
    t0 = now(device)
    done = engine.generate([prompt], [[image]], SamplingParams(max_new_tokens=new_tokens))[0]
    seconds = now(device) - t0
    return {"batch_size": 1, "greedy": True, "prompt_tokens": len(prompt), "new_tokens": done.completion_tokens,
            "seconds": round(seconds, 3), "new_tokens_per_s": round(done.completion_tokens / seconds, 1)}


def _stand_in_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0")
