"""How fast can a tiny model learn the synthetic world? A minimal loop for experiments, not the trainer.

It trains MiniMindLM plus a Hugging Face CLIP tower (or, with --symbolic, perfect image tokens: one
learned embedding per cell content) on `synth` samples, with a bare prompt format (no chat template),
and prints teacher-forced exact match per question type on held-out scenes as it goes. It exists to
separate "the language model cannot learn the lookups" from "the vision side is too slow", which the
full quickstart cannot tell apart. Findings are in docs/experiments.md and the commit messages of presets.py.

    python scripts/probe_world.py --symbolic --seconds 240            # the language side alone
    python scripts/probe_world.py --seconds 240 --position-std 0.5    # pixels through a 0-layer tower
    python scripts/probe_world.py --types color --seconds 100         # one question type
    python scripts/probe_world.py --tower-pretrain 300 --tower-frozen --layers 2 --turns 6 --lang mix \
        --steps 5000 --samples 16000 --device cuda                    # what the quickstart now does, by steps

To compare with another version of the world, put that checkout's src first: PYTHONPATH=OTHER/src.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

from minimind_v.data import synth
from minimind_v.data.batching import BatchPlan
from minimind_v.data.synth.tower import pretrain_tower, world_labels
from minimind_v.model.config import LMConfig, VisionConfig
from minimind_v.model.llm import MiniMindLM
from minimind_v.model.vision import VisionTower

PAD, IMAGE, EOS, USER, ASSISTANT = range(5)
SPECIALS = ["<pad>", "<image>", "<eos>", "<user>", "<assistant>"]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--symbolic", action="store_true", help="image tokens are learned embeddings of each cell's content")
    p.add_argument("--types", default=",".join(synth.QUESTION_TYPES), help="comma-separated question types")
    p.add_argument("--lang", default="en", choices=["en", "zh", "mix"])
    p.add_argument("--turns", type=int, default=4, help="questions per training image")
    p.add_argument("--samples", type=int, default=6000)
    p.add_argument("--seconds", type=float, default=240)
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps instead (the lr schedule follows steps)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=4, help="language model layers")
    p.add_argument("--hidden", type=int, default=128, help="language model (and tower) width")
    p.add_argument("--tower-pretrain", type=int, default=0,
                   help="first train the tower alone for this many steps to name each patch's colour, shape and size")
    p.add_argument("--tower-frozen", action="store_true", help="freeze the tower after --tower-pretrain")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--patch", type=int, default=16, help="tower patch size on 48 px images")
    p.add_argument("--tower-layers", type=int, default=0)
    p.add_argument("--position-std", type=float, default=None, help="re-draw the tower's position embeddings")
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--grouped", action="store_true", help="batches of similar length (the trainer's --group-by-length)")
    args = p.parse_args()
    unknown = set(args.types.split(",")) - set(synth.QUESTION_TYPES)
    if unknown:
        p.error(f"--types: unknown {', '.join(sorted(unknown))} (known: {', '.join(synth.QUESTION_TYPES)})")
    if args.patch < 1 or 48 % args.patch:
        p.error(f"--patch {args.patch}: must divide the 48 px image")
    if args.tower_pretrain and args.patch != 48 // synth.GRID:
        p.error(f"--tower-pretrain labels grid cells: it needs --patch {48 // synth.GRID} (one patch per cell)")
    return args


class SymbolicCells(nn.Module):
    """Perfect vision: cell c of a scene -> embedding(content) + embedding(c); 0 is an empty cell."""

    def __init__(self, width: int):
        super().__init__()
        self.content = nn.Embedding(1 + len(synth.COLORS) * len(synth.SHAPES) * len(synth.SIZES), width)
        self.cell = nn.Parameter(torch.randn(synth.GRID ** 2, width) * 0.5)

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        return self.content(cells) + self.cell


def cell_ids(scene: synth.Scene) -> torch.Tensor:
    ids = [0] * synth.GRID ** 2
    for o in scene:
        ids[o.cell] = 1 + (list(synth.COLORS).index(o.color) * len(synth.SHAPES) + synth.SHAPES.index(o.shape)) \
            * len(synth.SIZES) + synth.SIZES.index(o.size)
    return torch.tensor(ids)


def main() -> None:
    args = arguments()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    types = tuple(args.types.split(","))
    train = [synth.make_sample(1, "train", i, args.lang, "qa", args.turns, 48, types) for i in range(args.samples)]
    test = [synth.make_sample(2, "test", i, args.lang, "qa", 1, 48, types) for i in range(600)]

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator((t["content"] for s in train[:3000] for t in s.conversations),
                                  trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    n_image = synth.GRID ** 2 if args.symbolic else (48 // args.patch) ** 2

    def encode(sample: synth.Sample, turns: int) -> tuple[list[int], list[int]]:
        ids, labels = [], []
        for i in range(0, 2 * turns, 2):
            question = sample.conversations[i]["content"].removeprefix("<image>\n")
            prompt = [USER] + ([IMAGE] * n_image if i == 0 else []) + tokenizer.encode(question).ids + [ASSISTANT]
            answer = tokenizer.encode(sample.conversations[i + 1]["content"]).ids + [EOS]
            ids += prompt + answer
            labels += [-100] * len(prompt) + answer
        return ids, labels

    def image(sample: synth.Sample) -> torch.Tensor:
        if args.symbolic:
            return cell_ids(sample.scene)
        pixels = torch.from_numpy(np.asarray(sample.image)).permute(2, 0, 1).float() / 255
        return (pixels - MEAN) / STD

    train_set = [(encode(s, len(s.types)), image(s)) for s in train]
    test_set = [(encode(s, 1), image(s), s.types[0]) for s in test]

    width = args.hidden
    if args.symbolic:
        tower: nn.Module = SymbolicCells(width)
    else:
        init = {"model_type": "clip_vision_model", "hidden_size": width, "intermediate_size": 2 * width,
                "num_hidden_layers": args.tower_layers, "num_attention_heads": 4, "image_size": 48,
                "patch_size": args.patch}
        tower = VisionTower(VisionConfig(init=init, hidden_size=width, image_size=48, num_patches=(48 // args.patch) ** 2,
                                         freeze=False, position_init_std=args.position_std))
    projector = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
    lm = MiniMindLM(LMConfig(vocab_size=512, hidden_size=width, num_hidden_layers=args.layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512))
    device = torch.device(args.device)
    tower, projector, lm = tower.to(device), projector.to(device), lm.to(device)
    if args.tower_pretrain and not args.symbolic:
        # The quickstart's own step (data/synth/tower.py), on the probe's training images.
        report = pretrain_tower(tower, torch.stack([img for _, img in train_set]).to(device),
                                world_labels([s.scene for s in train]),
                                args.tower_pretrain, args.batch)
        print(f"tower pretrained: {report}", flush=True)
        tower.train()
        if args.tower_frozen:
            tower.requires_grad_(False)
            tower.frozen = True
    params = [p for m in (tower, projector, lm) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))

    def forward(rows: list[tuple[list[int], list[int]]], images: torch.Tensor):
        width_t = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([i + [PAD] * (width_t - len(i)) for i, _ in rows], device=device)
        labels = torch.tensor([lab + [-100] * (width_t - len(lab)) for _, lab in rows], device=device)
        mask = (torch.arange(width_t)[None] < torch.tensor([len(i) for i, _ in rows])[:, None]).long().to(device)
        images = images.to(device)
        features = tower(images)
        embeds = lm.embed_tokens(ids).masked_scatter((ids == IMAGE)[..., None], projector(features))
        return lm(inputs_embeds=embeds, attention_mask=mask, labels=labels), labels

    def evaluate() -> str:
        lm.eval()
        right: dict[str, list[bool]] = {}
        with torch.no_grad():
            for i in range(0, len(test_set), 100):
                chunk = test_set[i:i + 100]
                out, labels = forward([c[0] for c in chunk], torch.stack([c[1] for c in chunk]))
                target = labels[:, 1:]
                ok = ((out.logits.argmax(-1)[:, :-1] == target) | (target == -100)).all(1)
                for c, good in zip(chunk, ok.tolist()):
                    right.setdefault(c[2], []).append(good)
        lm.train()
        return " ".join(f"{k} {100 * np.mean(v):.0f}%" for k, v in sorted(right.items()))

    # The trainer's batching, over groups of 16 batches when --grouped.
    plan = BatchPlan(np.array([len(ids) for (ids, _), _ in train_set]), args.batch,
                     "grouped" if args.grouped else "random", drop_last=True, group_factor=16)
    batches: list[list[int]] = []
    epoch, step, start = 0, 0, time.perf_counter()
    def done(elapsed: float) -> bool:
        return step >= args.steps if args.steps else elapsed >= args.seconds

    def progress(elapsed: float) -> float:
        return step / args.steps if args.steps else elapsed / args.seconds

    while not done(elapsed := time.perf_counter() - start):
        if not batches:
            batches, epoch = [b for b in plan.batches(epoch) if len(b) == args.batch], epoch + 1
        batch = batches.pop()
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress(elapsed))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        out, _ = forward([train_set[i][0] for i in batch], torch.stack([train_set[i][1] for i in batch]))
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        if step % args.eval_every == 0:
            print(f"step {step} {elapsed:.0f}s loss {out.loss.item():.3f} | {evaluate()}", flush=True)
    print(f"final step {step} | {evaluate()}", flush=True)


if __name__ == "__main__":
    main()
