"""A small copy of the original MiniMind-V layout, with random weights, for timing the real recipe offline.

    .venv/bin/python scripts/make_original_layout.py --out /tmp/mmv --tokenizer DIR [--n 32]

writes what `minimind-v download` would (same names, same formats), only small and random:

    OUT/llm_512.pth                    a random minimind2-small-v LLM in the original format: fp16 state dict,
                                       upstream key names, both tied keys (model.embed_tokens / lm_head)
    OUT/clip-vit-base-patch16/         a random CLIP ViT-B/16 vision model (save_pretrained) + preprocessor_config.json
    OUT/tokenizer/                     a copy of --tokenizer (the original's, from `minimind-v download --what tokenizer`)
    OUT/dataset/pretrain_data.jsonl    N caption samples in the original jsonl format
    OUT/dataset/pretrain_images/       their N JPEG images

and prints the `minimind-v train` command that runs the original pretrain recipe on it.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import CLIPVisionConfig, CLIPVisionModel

from minimind_v.convert.upstream import upstream_name
from minimind_v.data.images import ImagePreprocessor
from minimind_v.model.llm import MiniMindLM
from minimind_v.modeldir import write_preprocessor_config
from minimind_v.presets import get_preset

PROMPTS = ["Provide a brief description of the given image.\n<image>", "<image>\nDescribe this picture briefly.",
           "What does the image show?\n<image>", "<image>\nWrite a short caption for this photo."]
WORDS = ("a red car parked near a small house on a quiet street with trees and a blue sky behind it while "
         "two people walk a dog past a shop window full of bright flowers and fresh bread").split()


def write_llm(path: Path, seed: int) -> None:
    """The original llm_512.pth: LLM keys only, fp16, the tied matrix stored under both names."""
    torch.manual_seed(seed)
    llm = MiniMindLM(get_preset("minimind2-small-v").lm)
    state = {}
    for key, tensor in llm.state_dict().items():
        # The head sits at the top level upstream (lm_head.weight), the rest under model.*.
        name = key if key == "lm_head.weight" else upstream_name(f"lm.{key}")
        state[name] = tensor.detach().half().clone()  # clone: two separate copies of the tied matrix, as upstream
    torch.save(state, path)


def write_vision(directory: Path, seed: int) -> None:
    """A randomly initialised CLIP ViT-B/16 (224 px, 16 px patches: 196 patch features of 768)."""
    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(patch_size=16)).save_pretrained(directory)
    write_preprocessor_config(directory, ImagePreprocessor().to_config())  # CLIP's own: shortest edge 224, centre crop, CLIP mean/std


def write_data(dataset: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    images = dataset / "pretrain_images"
    images.mkdir(parents=True, exist_ok=True)
    with open(dataset / "pretrain_data.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n):
            name = f"GCC_train_{i:09d}.jpg"
            _random_photo(rng).save(images / name, "JPEG", quality=90)
            caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30))).capitalize() + "."
            record = {"conversations": [{"role": "user", "content": rng.choice(PROMPTS)},
                                        {"role": "assistant", "content": caption}], "image": name}
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def _random_photo(rng: random.Random) -> Image.Image:
    """A JPEG-sized picture with gradients and shapes, so decoding costs what a real photo's does."""
    w, h = rng.choice([(320, 240), (400, 300), (256, 256), (300, 400)])
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * rng.random() + y * rng.random()) % 256 for _ in range(3)], axis=-1)
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = [x0, y0, x0 + rng.randint(10, w // 2), y0 + rng.randint(10, h // 2)]
        draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def copy_files(src: Path, dest: Path) -> None:
    """The files of `src`, without its permissions (a read-only source must not make `dest` read-only)."""
    dest.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.is_file():
            shutil.copyfile(file, dest / file.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the layout into")
    parser.add_argument("--tokenizer", required=True, help="the original tokenizer directory (tokenizer.json, ...)")
    parser.add_argument("--n", type=int, default=32, help="caption samples and images (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_llm(out / "llm_512.pth", args.seed)
    write_vision(out / "clip-vit-base-patch16", args.seed)
    copy_files(Path(args.tokenizer), out / "tokenizer")
    write_data(out / "dataset", args.n, args.seed)
    print(f"wrote {out}; the original pretrain recipe on it:\n"
          f"minimind-v train --stage pretrain --preset minimind2-small-v --from {out}/llm_512.pth "
          f"--tokenizer {out}/tokenizer --vision {out}/clip-vit-base-patch16 "
          f"--data {out}/dataset/pretrain_data.jsonl --images {out}/dataset/pretrain_images "
          f"--epochs 2 --batch-size 8 --out {out}/run")


if __name__ == "__main__":
    main()
