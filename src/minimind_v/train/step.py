"""One optimizer step over k micro-batches, and the validation pass.

The objective of a step is the cross-entropy summed over every supervised token of the step's
micro-batches on every process, divided by their total count: each token weighs the same
whatever micro-batch or process it landed in. So k micro-batches of B samples give the weights
of one batch of kB, and W processes give those of one process with a W times larger batch.
Another `Objective` (DPO's, train/dpo.py) brings its own loss and its own units (preference pairs
instead of tokens), weighed the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from minimind_v.constants import IGNORE_INDEX
from minimind_v.model.config import LMConfig, VLMConfig
from minimind_v.train import distributed

Batch = dict[str, torch.Tensor]


@dataclass
class Precision:
    """How the forward pass runs: bf16 or fp16 autocast on CUDA (fp16 with a loss scaler), else fp32."""

    device_type: str
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    tf32: bool = False
    """fp32 matrix products and convolutions on CUDA's TF32 tensor cores (10-bit mantissa, fp32 accumulation)."""

    @classmethod
    def choose(cls, name: str, device: torch.device) -> "Precision":
        if name == "auto":
            name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        dtype = {"fp32": None, "fp32-strict": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
        return cls(device.type, dtype, scaler, tf32=device.type == "cuda" and name == "fp32")

    def set_backends(self) -> None:
        """Tell CUDA's matrix libraries whether fp32 may use TF32 (without it an H100 multiplies fp32 ~15x slower).
        Global torch state: the run sets it once, before its first step."""
        if self.device_type == "cuda":
            mode = "tf32" if self.tf32 else "ieee"
            torch.backends.cuda.matmul.fp32_precision = mode
            torch.backends.cudnn.conv.fp32_precision = mode

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def supervised_tokens(batch: Batch) -> int:
    """Supervised targets in a batch, counted on the host from the labels the model will shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def input_tokens(batch: Batch) -> int:
    """Real (non-padding) tokens, for throughput."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "segment_ids" in batch:
        return int((batch["segment_ids"] > 0).sum())
    return batch["input_ids"].numel()


# Dimensions whose size changes from batch to batch within one padded shape: how many supervised positions,
# image slots and images. torch.compile traces them as symbols, so they cost no new graph.
VARYING_SIZES = ("supervised_index", "image_index", "pixel_values", "image_features")


def to_device(batch: Batch, device: torch.device) -> Batch:
    # Pinned host memory (DataLoader pin_memory) lets these copies overlap with compute on CUDA.
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    for key in VARYING_SIZES:
        if isinstance(moved.get(key), torch.Tensor):
            torch._dynamo.maybe_mark_dynamic(moved[key], 0)
    return moved


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model under DDP (.module) and torch.compile (._orig_mod), whose cfg says how to prepare a batch."""
    while (inner := getattr(model, "module", None) or getattr(model, "_orig_mod", None)) is not None:
        model = inner
    return model


def host_prepared(batch: Batch, model: nn.Module) -> Batch:
    """The batch plus what the forward would otherwise read back from the device, computed here on the host.

    Flat indices of the supervised positions and of the image placeholders (the model gathers and copies at
    them), the position limit checked, and no attention_mask when every row is right-padded: causal attention
    already keeps real tokens off later padding, and the labels keep the padding out of the loss (not out of
    an MoE balance loss: those keep the mask). Packed rows keep their segment_ids mask. A batch already on a
    device, or a model without our config, is left as it is.
    """
    cfg = getattr(_unwrapped(model), "cfg", None)
    lm_cfg = cfg.lm if isinstance(cfg, VLMConfig) else cfg
    if not isinstance(lm_cfg, LMConfig) or "labels" not in batch or batch["labels"].device.type != "cpu":
        return batch
    out, labels = dict(batch), batch["labels"]
    positions = batch.get("position_ids")
    if positions is not None and int(positions.max()) >= lm_cfg.max_position_embeddings:
        raise ValueError(f"position {int(positions.max())} exceeds max_position_embeddings "
                         f"{lm_cfg.max_position_embeddings}")
    out["positions_checked"] = positions is not None or labels.shape[1] <= lm_cfg.max_position_embeddings
    mask = batch.get("attention_mask")
    # The MoE balance loss routes the padding too, and the padding's hidden states depend on the mask.
    moe_sees_padding = lm_cfg.use_moe and lm_cfg.aux_loss_alpha > 0
    if mask is not None and not moe_sees_padding and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        del out["attention_mask"]
    out["supervised_index"] = supervised_index(labels)
    if isinstance(cfg, VLMConfig) and (batch.get("pixel_values") is not None or
                                       batch.get("image_features") is not None):
        out["image_index"] = (batch["input_ids"] == cfg.image_token_id).flatten().nonzero().squeeze(1)
    return out


def supervised_index(labels: torch.Tensor) -> torch.Tensor:
    """(N,) flat indices into (B*T) of the positions whose next token is supervised (the model's shift: position
    t predicts token t+1)."""
    supervised = torch.zeros_like(labels, dtype=torch.bool)
    supervised[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return supervised.flatten().nonzero().squeeze(1)


def _forward(model: nn.Module, batch: Batch, precision: Precision):
    with precision.autocast():
        # logits_to_keep="none": with labels the model runs the LM head only at supervised positions.
        return model(**batch, logits_to_keep="none")


class Objective(Protocol):
    """What a step minimises: a mean over some units of each micro-batch, counted on the host."""

    loss_name: str
    """What the logged loss is, for the loss plot's axis."""

    def units(self, batch: Batch) -> int:
        """How many units (supervised tokens, preference pairs) the batch's loss is a mean over."""

    def __call__(self, model: nn.Module, batch: Batch, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the batch's units, MoE balance loss) for a batch prepared on the device."""

    def window_metrics(self) -> dict[str, float]:
        """Means since the last call for the log line, over all processes (every process calls it); {} if none."""


class CrossEntropy:
    """The language-model objective of every stage but dpo: cross-entropy per supervised token."""

    loss_name = "cross-entropy per supervised token"

    def units(self, batch: Batch) -> int:
        return supervised_tokens(batch)

    def __call__(self, model: nn.Module, batch: Batch, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
        out = _forward(model, batch, precision)
        return out.loss - out.aux_loss, out.aux_loss

    def window_metrics(self) -> dict[str, float]:
        return {}


CROSS_ENTROPY = CrossEntropy()


def _step_tokens(local: int, device: torch.device) -> float | torch.Tensor:
    """Supervised tokens (an objective's units) of this step on all processes (at least 1), without making the host
    wait."""
    if not torch.distributed.is_initialized():
        return float(max(local, 1))
    # A pageable host->device copy would wait for the queued kernels; a pinned, non-blocking one does not.
    count = torch.tensor([float(local)], pin_memory=device.type == "cuda").to(device, non_blocking=True)
    return distributed.all_reduce_sum(count).clamp(min=1)[0]


def train_step(model: nn.Module, micro_batches: list[Batch], optimizer: torch.optim.Optimizer,
               precision: Precision, grad_clip: float, device: torch.device,
               objective: Objective = CROSS_ENTROPY) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward every micro-batch, then clip and step. Returns (the loss summed over the units: summed CE,
    grad norm) as device tensors, so nothing here waits for the device."""
    counts = [objective.units(b) for b in micro_batches]
    total = _step_tokens(sum(counts), device)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    k = len(micro_batches)
    loss_sum = torch.zeros((), device=device)
    for i, (batch, n) in enumerate(zip(micro_batches, counts)):
        last = i == k - 1
        # DDP averages gradients over processes; multiplying by `world` turns that average into a sum.
        sync = contextlib.nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
        with sync:
            # The mean loss over this micro-batch's n units (supervised tokens for CE).
            loss, aux_loss = objective(model, to_device(host_prepared(batch, model), device), precision)
            backward(loss * (n * world) / total + aux_loss / k, precision)
        loss_sum += loss.detach().float() * n
    return loss_sum, apply_gradients(optimizer, precision, grad_clip)


def backward(loss: torch.Tensor, precision: Precision) -> None:
    """Gradients of `loss`, scaled first when fp16 needs a loss scaler."""
    (precision.scaler.scale(loss) if precision.scaler else loss).backward()


def apply_gradients(optimizer: torch.optim.Optimizer, precision: Precision, grad_clip: float) -> torch.Tensor:
    """Clip the global gradient norm (0: no clipping), step and zero the gradients; returns the norm before
    clipping, on the device. Every loop that trains (the trainer, bench, the tower's pretraining) ends its
    step here."""
    if precision.scaler:
        precision.scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if precision.scaler:
        precision.scaler.step(optimizer)
        precision.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


@torch.no_grad()
def validation_sums(model: nn.Module, batches: Iterator[Batch], precision: Precision,
                    device: torch.device, objective: Objective = CROSS_ENTROPY) -> tuple[float, int]:
    """(summed loss: CE, units: supervised tokens) over this process's validation batches, summed over processes."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        n = objective.units(batch)
        loss, _ = objective(model, to_device(host_prepared(batch, model), device), precision)
        totals[0] += loss.double() * n
        totals[1] += n
    model.train(was_training)
    distributed.all_reduce_sum(totals)
    return float(totals[0]), int(totals[1])
