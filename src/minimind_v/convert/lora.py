"""`convert merge-lora`: a model directory and a LoRA adapter -> one plain model directory, the adapter folded in.

The merged model computes what the base with its adapter computes (to float rounding), with no adapter layers
left: every command, export-hf and `train --from` read it like any other model directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minimind_v.errors import UserError


@dataclass
class MergeLoraOptions:
    model: str
    """The adapter's base model directory (a LoRA run's OUT/model)."""
    out: str
    """Model directory to write, the adapter merged into its weights."""
    adapter: str | None = None
    """LoRA adapter directory (peft format; default: the model directory's own adapter/)."""


def main(opts: MergeLoraOptions) -> int:
    merge_lora(opts.model, opts.adapter, opts.out)
    print(f"wrote model directory {opts.out} (the adapter merged)")
    return 0


def merge_lora(model_dir: str | Path, adapter: str | Path | None, out: str | Path) -> None:
    from minimind_v import adapters
    from minimind_v.data.tokenizer import load_tokenizer
    from minimind_v.modeldir import MiniMindVLM, own_adapter

    adapter = adapter if adapter is not None else own_adapter(model_dir)
    if adapter is None:
        raise UserError(f"--model {model_dir}: carries no adapter/; name the adapter with --adapter DIR")
    if Path(out).resolve() == Path(model_dir).resolve():
        raise UserError(f"--out {out}: the same directory as --model; the base stays as it is, pick another")
    tokenizer = load_tokenizer(model_dir)
    model = MiniMindVLM.from_pretrained(model_dir, adapter)
    adapters.merge(model)
    model.save_pretrained(out, tokenizer=tokenizer)
