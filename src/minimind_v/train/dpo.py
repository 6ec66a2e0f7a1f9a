"""Direct preference optimisation (`train --stage dpo`): the objective the one training step minimises.

For a pair (prompt x, chosen answer c, rejected answer r), with log-probabilities summed over each answer's
supervised tokens (its text and end-of-turn token, data/preference.py), the loss is

    -log sigmoid(beta * ((log pi(c|x) - log ref(c|x)) - (log pi(r|x) - log ref(r|x))))

averaged over the step's pairs (micro-batches and processes alike, train/step.py); --dpo-sft-weight w adds
w * (-log pi(c|x) / tokens of c) per pair, the chosen answer's cross-entropy (RPO). beta * (log pi - log ref) is an
answer's reward: the log lines give the reward margin (chosen's minus rejected's, the argument of the sigmoid),
the share of pairs whose chosen answer has the larger reward, and the model's mean log-probabilities of both.

The reference is the starting model, never a second model: the run's own model, called without gradients and in
eval mode (no dropout), with each weight that learns swapped for its starting value (torch.func.functional_call).
Under --lora-rank the language model's weights do not learn: its LoRA layers are switched off for that call (peft's
BaseTunerLayer.enable_adapters) and the reference LLM is the frozen base itself, so only the projector's starting
weights (and a tower's that learns) are kept, a few hundred thousand values. Without LoRA, the kept starting values
are every weight that learns, the LLM's and the projector's: the trainable weights once more (minimind2-small-v:
26M, 104 MB in fp32), half of what AdamW's moments already hold. Log-probs of the reference computed in an up-front
pass would save that memory, but cost the same forward passes over one epoch and would have to be found again by a
resumed run; the copy is exact and simple. On --resume the starting values are rebuilt from --from, not taken from
the checkpoint. Each step costs the policy's forward and backward plus one reference forward without gradients;
the log-probs need the LM head at every position (B x T x vocab logits), where cross-entropy needs it only at the
supervised ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from minimind_v.adapters import has_adapter, is_adapter_weight
from minimind_v.constants import IGNORE_INDEX
from minimind_v.train import build, distributed
from minimind_v.train.run import Run
from minimind_v.train.step import Batch, Precision, supervised_index


def answer_logps(model: Callable[..., Any], batch: Batch, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """(the log-probability of each row's supervised tokens, summed: (R,) float32, the MoE balance loss) of a batch
    on the device; its host-prepared `supervised_index` is used when there is one."""
    labels = batch["labels"]
    rows, width = labels.shape
    index = batch.get("supervised_index")
    if index is None:
        index = supervised_index(labels)
    with precision.autocast():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})  # logits (R, T, V)
    logits = out.logits.flatten(0, 1).index_select(0, index).float()  # (N, V): where an answer token is predicted
    targets = labels.flatten().index_select(0, index + 1)  # position t predicts token t + 1
    token_logps = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)  # (N,)
    sums = torch.zeros(rows, dtype=torch.float32, device=labels.device).index_add(0, index // width, token_logps)
    return sums, out.aux_loss


def dpo_losses(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(each pair's loss, its reward margin) from the answers' summed log-probs, rows [chosen..., rejected...]."""
    pairs = policy.shape[0] // 2
    chosen = policy[:pairs] - reference[:pairs]
    rejected = policy[pairs:] - reference[pairs:]
    margins = beta * (chosen - rejected)  # (P,)
    return -F.logsigmoid(margins), margins


@contextmanager
def _eval_without_adapters(model: nn.Module, tuner_layers: list[nn.Module]) -> Iterator[None]:
    was_training = model.training
    model.eval()
    for layer in tuner_layers:
        layer.enable_adapters(False)  # peft also stops the adapter's requires_grad, no matter under no_grad
    try:
        yield
    finally:
        for layer in tuner_layers:
            layer.enable_adapters(True)  # and makes it learn again, as it does in a LoRA run
        model.train(was_training)


class Reference:
    """The starting model, computed by `model` itself: the `starting` values of the weights that learn swapped in,
    its LoRA layers (if any) switched off."""

    def __init__(self, model: nn.Module, starting: dict[str, torch.Tensor]) -> None:
        self.model, self.starting = model, starting
        self.tuner_layers: list[nn.Module] = []
        if has_adapter(model):
            from peft.tuners.tuners_utils import BaseTunerLayer

            self.tuner_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    @torch.no_grad()
    def logps(self, batch: Batch, precision: Precision) -> torch.Tensor:
        """(R,) each row's summed log-probability of its supervised tokens under the reference."""

        def reference(**inputs: Any) -> Any:
            return functional_call(self.model, self.starting, (), inputs)

        with _eval_without_adapters(self.model, self.tuner_layers):
            return answer_logps(reference, batch, precision)[0]


def starting_values(run: Run, resumed: bool) -> dict[str, torch.Tensor]:
    """Every weight of the run's model that learns (LoRA's left out: switched off instead), at its starting value:
    the model's own before its first step, else rebuilt from the start (--from) as set_up first built it."""
    learns = [name for name, p in run.model.named_parameters() if p.requires_grad and not is_adapter_weight(name)]
    params = dict(run.model.named_parameters())
    if not resumed:
        return {name: params[name].detach().clone() for name in learns}
    with torch.random.fork_rng(devices=[]):  # the resumed run's generators stay as the checkpoint left them
        torch.manual_seed(run.cfg.seed)
        fresh = dict(build.build_model(run.start, run.cfg.model)[0].named_parameters())
    return {name: fresh[name.replace(".base_layer.", ".")].detach().to(run.device, params[name].dtype)
            for name in learns}


class DPOObjective:
    """DPO's loss per pair for train/step.py's `train_step`; the reward statistics of the training pairs since the
    last log line (a call in eval mode, as validation's, is not counted)."""

    loss_name = "DPO loss per preference pair"

    def __init__(self, reference: Reference, beta: float, device: torch.device, sft_weight: float = 0.0) -> None:
        self.reference, self.beta, self.sft_weight = reference, beta, sft_weight
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # margin, chosen wins, log-probs c and r
        self.pairs = 0

    def units(self, batch: Batch) -> int:
        return batch["input_ids"].shape[0] // 2

    def __call__(self, model: nn.Module, batch: Batch, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
        reference = self.reference.logps(batch, precision)
        policy, aux_loss = answer_logps(model, batch, precision)
        losses, margins = dpo_losses(policy, reference, self.beta)
        pairs = len(margins)
        if self.sft_weight:
            tokens = (batch["labels"][:pairs, 1:] != IGNORE_INDEX).sum(1).clamp(min=1)  # (P,) the chosen answers'
            losses = losses - self.sft_weight * policy[:pairs] / tokens
        if model.training:
            self.pairs += pairs
            self.sums += torch.stack([margins.detach().sum(), (margins.detach() > 0).float().sum(),
                                      policy[:pairs].detach().sum(), policy[pairs:].detach().sum()]).double()
        return losses.mean(), aux_loss

    def window_metrics(self) -> dict[str, float]:
        pairs = torch.tensor([float(self.pairs)], dtype=torch.float64, device=self.sums.device)
        margin, wins, chosen, rejected, n = distributed.all_reduce_sum(torch.cat([self.sums, pairs])).tolist()
        self.sums.zero_()
        self.pairs = 0
        if not n:
            return {}
        return {"reward_margin": margin / n, "reward_accuracy": wins / n, "logp_chosen": chosen / n,
                "logp_rejected": rejected / n}


def objective_for(run: Run, resumed: bool, say: Callable[[str], None]) -> DPOObjective:
    """The run's DPO objective, its reference the run's starting model."""
    starting = starting_values(run, resumed)
    kept = sum(t.numel() for t in starting.values())
    lora = " with its LoRA layers switched off" if has_adapter(run.model) else ""
    sft = f", chosen answers' cross-entropy weighted {run.cfg.dpo_sft_weight}" if run.cfg.dpo_sft_weight else ""
    say(f"dpo: beta {run.cfg.dpo_beta}{sft}; the reference is the starting model{lora}, its {kept:,} starting values "
        "of the weights that learn kept aside")
    return DPOObjective(Reference(run.model, starting), run.cfg.dpo_beta, run.device, run.cfg.dpo_sft_weight)
