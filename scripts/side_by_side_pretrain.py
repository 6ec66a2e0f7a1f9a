"""Time the ORIGINAL MiniMind-V pretrain script against `minimind-v train --stage pretrain`, side by side.

    .venv/bin/python scripts/side_by_side_pretrain.py --original DIR --tokenizer DIR \\
        [--n 32] [--epochs 4] [--batch-size 8] [--work DIR] [--json FILE]

One invocation, one machine, the same inputs for both sides:

  * the same N caption samples and JPEGs, the same random minimind2-small-v `llm_512.pth` (original format), the
    same random CLIP ViT-B/16 vision weights, all written by scripts/make_original_layout.py (imported);
  * the original: upstream's own `trainer/train_pretrain_vlm.py`, RUN (not copied into this project) from a
    throwaway copy of the checkout given as --original, with
        --epochs E --batch_size B --device cpu --num_workers W --data_path .. --images_path .. --save_dir ..
    and its defaults otherwise (lr 4e-4, max_seq_len 640, log_interval/save_interval 100, freeze_llm 1);
  * ours: `minimind-v train --stage pretrain --preset minimind2-small-v --from llm_512.pth ... --epochs E
    --batch-size B --device cpu --num-workers W` with MINIMIND_V_CACHE inside the work directory, so nothing is
    reused from an earlier invocation (a first run: the token-id encodings and the image-feature cache are built
    inside the timed process).

Each side is timed as a whole process (time.perf_counter around subprocess.run: interpreter start, imports,
model loading, data, training, saving), the original first unless --order says otherwise, with the thread
settings left at torch's defaults. --num-workers defaults to 0 for both: on a 2-core machine a loader process
only competes with the training threads, and ours uses 0 on CPU by default too.

--original is a checkout of jingyaogong/minimind-v at a CLIP-generation commit (2025; model/model_vlm.py loads
CLIPModel), e.g. 13c3a2c (2025-12-01). From a clone:

    git -C MINIMIND_V_CLONE archive 13c3a2c model trainer dataset | tar -x -C DEST

(the three folders are all the script needs; `git archive 13c3a2c | tar -x -C DEST` gives the whole tree where
every blob is present). Pass --commit 13c3a2c to record it; a git work tree's HEAD is read on its own.

What the original needs that no checkout has is written into the throwaway copy: ../out/llm_512.pth, and
model/vision_model/clip-vit-base-patch16 as a FULL CLIPModel (random text tower, the openai checkpoint's shapes;
vision tower = the layout's CLIPVisionModel weights, loaded in and checked equal) plus a CLIPProcessor: the
layout's CLIP image-processor settings and a tiny byte-level CLIP BPE tokenizer (514 tokens: the 256 byte
symbols, with and without </w>, and the two specials; built locally, no hub), which the pretrain script never
calls. The checkout's model/tokenizer.json must be the --tokenizer's (checked; replaced in the copy if not).

Upstream is run unmodified except where it cannot run at all under the installed torch/transformers; each such
fix is a one-line edit of the throwaway copy, printed and recorded in the JSON (at 13c3a2c: trainer_utils.py calls
gc.collect() at every save without importing gc, so `import gc` is added to it).

Prints both wall times, the ratio original/ours and one JSON line (also appended to --json FILE): both times,
the ratio, both commands, the upstream commit, the patches, the final losses, torch/transformers versions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minimind_v.errors import UserError

SCRIPTS = Path(__file__).resolve().parent
UPSTREAM_FILES = ("trainer/train_pretrain_vlm.py", "trainer/trainer_utils.py", "model/model_vlm.py",
                  "model/model_minimind.py", "dataset/lm_dataset.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CLIP_DIR = "model/vision_model/clip-vit-base-patch16"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--original", required=True, help="a checkout of jingyaogong/minimind-v (CLIP generation)")
    parser.add_argument("--tokenizer", required=True, help="the original tokenizer directory (tokenizer.json, ...)")
    parser.add_argument("--n", type=int, default=32, help="caption samples (default 32)")
    parser.add_argument("--epochs", type=int, default=4, help="(default 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="(default 8)")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loader processes, both sides (default 0)")
    parser.add_argument("--order", choices=["original-first", "ours-first"], default="original-first")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random layout (default 0)")
    parser.add_argument("--commit", help="the upstream commit of --original, for the record (default: its git "
                                         "HEAD where it is a work tree, else unknown)")
    parser.add_argument("--work", help="work directory, kept (default: a temporary one, removed at the end)")
    parser.add_argument("--json", help="append the result line to this file")
    args = parser.parse_args()
    for name in ("n", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_workers < 0:
        parser.error("--num-workers must be at least 0")
    return args


def check_original(original: Path) -> None:
    if not original.is_dir():
        raise UserError(f"--original {original}: not a directory")
    if not (original / "trainer").is_dir() or not (original / "model").is_dir():
        raise UserError(f"--original {original}: not a minimind-v checkout (no trainer/ and model/ folders)")
    missing = [f for f in UPSTREAM_FILES if not (original / f).is_file()]
    if missing:
        raise UserError(f"--original {original}: not a usable minimind-v checkout, missing {', '.join(missing)}")
    if "CLIPModel" not in (original / "model/model_vlm.py").read_text(encoding="utf-8", errors="replace"):
        raise UserError(f"--original {original}: model/model_vlm.py does not load CLIPModel; check out a 2025 "
                        f"CLIP-generation commit (e.g. 13c3a2c)")


def check_tokenizer(tokenizer: Path) -> None:
    if not tokenizer.is_dir():
        raise UserError(f"--tokenizer {tokenizer}: not a directory")
    if not (tokenizer / "tokenizer.json").is_file():
        raise UserError(f"--tokenizer {tokenizer}: no tokenizer.json in it")


def git_blob_id(path: Path) -> str:
    """The file's git object id, to match the copy against an upstream tree (`git ls-tree COMMIT`)."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def upstream_commit(original: Path, given: str | None) -> str:
    if given:
        return given
    if (original / ".git").exists():
        try:
            return subprocess.run(["git", "-C", str(original), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return "unknown"


# ---------------------------------------------------------------------------------------------- the inputs

def write_layout(layout: Path, tokenizer: Path, n: int, seed: int) -> None:
    """make_original_layout's files: llm_512.pth, clip-vit-base-patch16/, tokenizer/, dataset/."""
    sys.path.insert(0, str(SCRIPTS))
    import make_original_layout as mol

    layout.mkdir(parents=True, exist_ok=True)
    mol.write_llm(layout / "llm_512.pth", seed)
    mol.write_vision(layout / "clip-vit-base-patch16", seed)
    mol.copy_files(tokenizer, layout / "tokenizer")
    mol.write_data(layout / "dataset", n, seed)


def write_full_clip(vision_dir: Path, dest: Path, seed: int) -> None:
    """A full CLIPModel (what upstream loads) whose vision tower is `vision_dir`'s CLIPVisionModel, + a CLIPProcessor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, CLIPVisionModel
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vision = CLIPVisionModel.from_pretrained(vision_dir)
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(vision_config=vision.config.to_dict()))  # text tower: CLIPTextConfig's defaults = openai's
    clip.vision_model.load_state_dict(vision.state_dict())
    clip.save_pretrained(dest)

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor.from_pretrained(vision_dir)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(dest)

    # What upstream will see: the same vision weights, a processor that loads.
    loaded = CLIPModel.from_pretrained(dest).vision_model.state_dict()
    if loaded.keys() != vision.state_dict().keys() or not all(
            torch.equal(loaded[k], v) for k, v in vision.state_dict().items()):
        raise RuntimeError("the full CLIPModel's vision tower differs from the layout's CLIPVisionModel")
    CLIPProcessor.from_pretrained(dest)


def copy_upstream(original: Path, dest: Path, tokenizer: Path) -> list[str]:
    """The code and tokenizer files of model/, trainer/, dataset/ (no sub-folders: no downloaded towers or data)."""
    def ignore(directory: str, names: list[str]) -> list[str]:
        return [n for n in names if (Path(directory) / n).is_dir() or not n.endswith((".py", ".json"))]

    for sub in ("model", "trainer", "dataset"):
        shutil.copytree(original / sub, dest / sub, ignore=ignore)
    notes = []
    for name in TOKENIZER_FILES:
        theirs, ours = dest / "model" / name, tokenizer / name
        if ours.is_file() and (not theirs.is_file() or theirs.read_bytes() != ours.read_bytes()):
            shutil.copyfile(ours, theirs)
            notes.append(f"model/{name} replaced by --tokenizer's (they differed)")
    return notes


def patch_upstream(tree: Path) -> list[str]:
    """One-line fixes for what cannot run at all under the installed versions; each is returned and printed."""
    patches = []
    utils = tree / "trainer/trainer_utils.py"
    text = utils.read_text(encoding="utf-8")
    if "gc.collect()" in text and not re.search(r"^import gc\b", text, re.M):
        utils.write_text(text.replace("import os\n", "import os\nimport gc\n", 1), encoding="utf-8")
        patches.append("trainer/trainer_utils.py: added `import gc` after `import os` (vlm_checkpoint calls "
                       "gc.collect() at every save; without it the first save raises NameError)")
    return patches


# ---------------------------------------------------------------------------------------------- the runs

def run_timed(name: str, cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    print(f"[{name}] {' '.join(cmd)}\n[{name}] cwd {cwd}; log {log}", flush=True)
    with open(log, "w", encoding="utf-8") as fh:
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        raise RuntimeError(f"{name} failed (exit {proc.returncode}) after {seconds:.1f}s; the end of {log}:\n"
                           + "\n".join(tail))
    print(f"[{name}] {seconds:.1f} s", flush=True)
    return seconds


def original_final_loss(log: Path) -> float | None:
    losses = re.findall(r"Epoch:\[\d+/\d+\]\(\d+/\d+\) loss:([0-9.eE+-]+|nan|inf)", log.read_text(errors="replace"))
    return float(losses[-1]) if losses else None


def ours_final_loss(run_dir: Path) -> float | None:
    metrics, loss = run_dir / "metrics.jsonl", None
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("loss"), (int, float)):
                loss = float(record["loss"])
    return loss


def minimind_v_command() -> list[str]:
    beside = Path(sys.executable).parent / "minimind-v"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("minimind-v")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from minimind_v.cli import main; sys.argv[0] = 'minimind-v'; main()"]


def benchmark(args: argparse.Namespace, work: Path) -> dict:
    original, tokenizer = Path(args.original).resolve(), Path(args.tokenizer).resolve()
    layout, tree = work / "layout", work / "original"
    print(f"work directory {work}", flush=True)

    t = time.perf_counter()
    write_layout(layout, tokenizer, args.n, args.seed)
    notes = copy_upstream(original, tree, tokenizer)
    write_full_clip(layout / "clip-vit-base-patch16", tree / CLIP_DIR, args.seed)
    (tree / "out").mkdir()
    shutil.copyfile(layout / "llm_512.pth", tree / "out/llm_512.pth")
    patches = patch_upstream(tree)
    print(f"inputs written in {time.perf_counter() - t:.1f} s (untimed)")
    for line in notes:
        print(f"note: {line}")
    print("patches to the throwaway copy of upstream: " + ("; ".join(patches) if patches else "none"), flush=True)

    data, images = layout / "dataset/pretrain_data.jsonl", layout / "dataset/pretrain_images"
    original_cmd = [sys.executable, "train_pretrain_vlm.py", "--epochs", str(args.epochs),
                    "--batch_size", str(args.batch_size), "--device", "cpu", "--num_workers", str(args.num_workers),
                    "--data_path", str(data), "--images_path", str(images), "--save_dir", str(work / "original_out"),
                    "--log_interval", "100", "--save_interval", "100"]
    ours_dir = work / "ours_run"
    ours_cmd = minimind_v_command() + [
        "train", "--stage", "pretrain", "--preset", "minimind2-small-v", "--from", str(layout / "llm_512.pth"),
        "--tokenizer", str(layout / "tokenizer"), "--vision", str(layout / "clip-vit-base-patch16"),
        "--data", str(data), "--images", str(images), "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--device", "cpu", "--num-workers", str(args.num_workers),
        "--out", str(ours_dir)]
    env = dict(os.environ)
    ours_env = dict(env, MINIMIND_V_CACHE=str(work / "minimind_v_cache"))

    runs = [("original", original_cmd, tree / "trainer", env, work / "original.log"),
            ("ours", ours_cmd, work, ours_env, work / "ours.log")]
    if args.order == "ours-first":
        runs.reverse()
    seconds = {name: run_timed(name, cmd, cwd, e, log) for name, cmd, cwd, e, log in runs}

    import torch
    import transformers

    return {"original_s": round(seconds["original"], 2), "ours_s": round(seconds["ours"], 2),
            "ratio": round(seconds["original"] / seconds["ours"], 3),
            "final_loss": {"original": original_final_loss(work / "original.log"), "ours": ours_final_loss(ours_dir)},
            "n": args.n, "epochs": args.epochs, "batch_size": args.batch_size, "num_workers": args.num_workers,
            "order": args.order, "upstream_commit": upstream_commit(original, args.commit),
            "upstream_files": {f: git_blob_id(original / f) for f in UPSTREAM_FILES},
            "patches": patches, "notes": notes,
            "commands": {"original": original_cmd, "ours": ours_cmd, "original_cwd": str(tree / "trainer")},
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def main() -> None:
    args = parse_args()
    try:
        check_original(Path(args.original))
        check_tokenizer(Path(args.tokenizer))
        if args.work:
            work = Path(args.work).resolve()
            if work.exists() and any(work.iterdir()):
                raise UserError(f"--work {work}: not empty (each invocation starts from nothing)")
            work.mkdir(parents=True, exist_ok=True)
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise UserError(f"--json {args.json}: its folder does not exist")
    except UserError as err:  # one line and exit 2, as the minimind-v commands say a user's mistake
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="mmv-side-by-side-"))
    try:
        result = benchmark(args, work)
    except RuntimeError as err:
        sys.exit(f"error: {err}\n(work directory kept: {work})")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)

    loss = result["final_loss"]
    print(f"\noriginal train_pretrain_vlm.py: {result['original_s']:.1f} s (final loss {loss['original']})")
    print(f"minimind-v train --stage pretrain: {result['ours_s']:.1f} s (final loss {loss['ours']})")
    print(f"ratio original/ours: {result['ratio']:.2f}x")
    line = json.dumps(result, ensure_ascii=False)
    print(line)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
