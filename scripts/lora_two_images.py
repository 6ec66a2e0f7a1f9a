"""Teach the quickstart model a two-image skill with LoRA, end to end, through the `minimind-v` CLI.

Copies the base model (default runs/quickstart/model; the original is never written to), writes the data with
`minimind-v synth` in the quickstart's world and image size (48 px, the tiny preset's input): two-image questions
(`--kind multi`: "Which image has more circles?", "Is the blue square in both images?", "What changed between the
images?", English and Chinese) for training and held out, some of the quickstart's own single-image conversations
(its training recipe: seed 1, up to 8 turns, its type weights with descriptions more often) mixed into the training
set so the old skills stay, and the quickstart's held-out check (`synth --n 2000 --kind qa --lang mix --split test
--seed 99 --max-turns 1 --image-place before`). Then `minimind-v eval` of the copy on both held-out sets,
`minimind-v train --stage sft --from COPY --lora-rank R ... --max-minutes M`, `minimind-v eval` of OUT/run/model
(its adapter/ applied), and one JSON line on stdout: the trainable share, the run's wall minutes, exact match
before and after (two-image overall and per type; the quickstart's short answers and descriptions), which of
issue #22's conditions hold, and how many of the two-image answers' tokens the base model never saw in training
(their embedding rows never learned: `--tokens` retrains them, the adapter's layers alone cannot write them).

    python scripts/lora_two_images.py runs/lora2 [--minutes 5] [--rank 8] [--lr 2e-3] [--seed 0] [--threads 1]
    python scripts/lora_two_images.py runs/lora3 --steps 4000 --threads 1 --minutes 90 [--qa-n 2000]

Issue #22's condition is the first form (a time budget, alone on the machine); the second compares settings at
a fixed step count, so that two runs can share the cores without the machine deciding how far each gets.

The defaults are the run docs/experiments.md reports: rank 8 on all seven targets, the adapter alone
(--freeze adapter), the rows of NEW_WORDS, LoRA+ at 4 and batch 8 (1.67x the steps of batch 16 in the same time).

Progress goes to stderr; each command's output to OUT/logs/. Data and the before-evaluations are reused from
--data-dir when they were made by the same commands (default OUT/data). `--threads N` sets OMP_NUM_THREADS for
every command (on a machine shared with other work, 1 thread ran 8x faster than 2 fighting for the cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent / "minimind-v"
"""The CLI of the environment running this script (its venv's bin/), else the one on PATH."""
if not BIN.is_file():
    BIN = Path(shutil.which("minimind-v") or "minimind-v")
QUICKSTART_WEIGHTS = "count=2,size=3,position=3,exist=3,left_of=5,above=5"
"""The quickstart's question mix (quickstart.Recipe.type_weights), for the single-image questions mixed in."""
QA_TEST = ["--n", "2000", "--kind", "qa", "--lang", "mix", "--split", "test", "--seed", "99", "--max-turns", "1",
           "--image-place", "before"]
"""The quickstart's held-out check, as the README and issue #22 state it."""
MULTI_TYPES = ("more", "both", "change")
NEW_WORDS = "first,second,neither,same,added,removed,turned,yes,no,第一张,第二张,一样多,相同,新增,移除,变成"
"""The two-image answers' words the quickstart never wrote (yes and no: a "both" answer starts with one, which
byte-level BPE spells without the leading space the quickstart's answers give it)."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(args: list[str], logs: Path, name: str, env: dict[str, str]) -> float:
    """Run `minimind-v ARGS`, its stdout and stderr into logs/NAME.{out,err}; the wall seconds it took."""
    logs.mkdir(parents=True, exist_ok=True)
    log(f"minimind-v {' '.join(args)}")
    began = time.perf_counter()
    with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
        code = subprocess.call([str(BIN), *args], stdout=out, stderr=err, env=env)
    wall = time.perf_counter() - began
    if code != 0:
        tail = (logs / f"{name}.err").read_text(errors="replace").strip().splitlines()[-5:]
        sys.exit(f"minimind-v {args[0]} failed (exit {code}) after {wall:.0f} s; {logs / name}.err ends:\n"
                 + "\n".join(tail))
    return wall


def synth_code() -> str:
    """A digest of the synthetic world's source: data written by other code is not reused."""
    import minimind_v.data.synth as package

    digest = hashlib.sha256()
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def synth(data_dir: Path, name: str, args: list[str], logs: Path, env: dict[str, str]) -> Path:
    """DATA_DIR/NAME/<split>.jsonl written by `synth --out DATA_DIR/NAME ARGS`, reused when ARGS and the
    synthetic world's code match."""
    out = data_dir / name
    split = args[args.index("--split") + 1] if "--split" in args else "train"
    stamp, data = out / "synth_args.json", out / f"{split}.jsonl"
    key = {"args": args, "synth_code": synth_code()}
    if data.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == key:
        log(f"reusing {data}")
        return data
    if out.exists():
        shutil.rmtree(out)
    run(["synth", "--out", str(out), *args], logs, f"synth_{name}", env)
    stamp.write_text(json.dumps(key))
    return data


def evaluate(model: Path, data: Path, out: Path, logs: Path, env: dict[str, str]) -> dict[str, Any]:
    """`minimind-v eval` of MODEL on DATA, its report saved to OUT and returned."""
    run(["eval", "--model", str(model), "--data", str(data), "--predictions", str(out.with_suffix(".preds.jsonl"))],
        logs, out.stem, env)
    report = json.loads((logs / f"{out.stem}.out").read_text())
    out.write_text(json.dumps(report, ensure_ascii=False, indent=1))
    return report


def weights_sha(model: Path) -> str:
    digest = hashlib.sha256()
    with open(model / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def evaluate_cached(model: Path, sha: str, data: Path, out: Path, logs: Path, env: dict[str, str]) -> dict[str, Any]:
    """evaluate(), reused from OUT when it holds the report of the same weights on the same data file."""
    key = {"weights": sha, "data": str(data.resolve()), "data_mtime": data.stat().st_mtime}
    stamp = out.with_suffix(".key.json")
    if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == key:
        log(f"reusing {out}")
        return json.loads(out.read_text())
    report = evaluate(model, data, out, logs, env)
    stamp.write_text(json.dumps(key))
    return report


def mixed_training_set(data_dir: Path, parts: list[tuple[Path, int]], out: Path, seed: int) -> int:
    """OUT/train.jsonl: the first n records of each (jsonl, n), shuffled, their image names made relative to
    DATA_DIR (pass --images DATA_DIR); returns how many records."""
    records = []
    for path, n in parts:
        prefix = path.parent.relative_to(data_dir) / "images"
        with open(path, encoding="utf-8") as f:
            for line, _ in zip(f, range(n)):
                record = json.loads(line)
                record["image"] = ", ".join(str(prefix / name.strip()) for name in record["image"].split(","))
                records.append(record)
    random.Random(seed).shuffle(records)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return len(records)


def new_tokens(tokenizer_json: Path, new: Path, old: Path) -> dict[str, Any]:
    """How many of the token types (and what share of the tokens) the two-image answers are written in never occur
    in OLD, the data the base model learned from: their rows of the (tied) embedding never trained, and a LoRA
    run cannot train them (it trains the adapter and the projector only)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))

    def counts(path: Path, roles: tuple[str, ...]) -> dict[int, int]:
        found: dict[int, int] = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                for turn in json.loads(line)["conversations"]:
                    if turn["role"] in roles:
                        for i in tok.encode(turn["content"]).ids:
                            found[i] = found.get(i, 0) + 1
        return found

    seen, answers = counts(old, ("user", "assistant")), counts(new, ("assistant",))
    unseen = {i: n for i, n in answers.items() if i not in seen}
    return {"answer_token_types": len(answers), "never_in_base_data": len(unseen),
            "share_of_answer_tokens": round(sum(unseen.values()) / max(1, sum(answers.values())), 3),
            "base_data": str(old)}


def suffix(setting: str) -> str:
    """A data directory's suffix for a non-default setting ("" for the default "")."""
    return "_" + hashlib.sha1(setting.encode()).hexdigest()[:8] if setting else ""


def multi_scores(report: dict[str, Any]) -> dict[str, float]:
    scores = {"overall": report["exact_match"]}
    scores.update({t: report["by_type"][t]["exact_match"] for t in MULTI_TYPES if t in report["by_type"]})
    return scores


def qa_scores(report: dict[str, Any]) -> dict[str, float]:
    return {"short": report["short"]["exact_match"], "descriptions": report["long"]["exact_match"]}


def parameters(run_dir: Path) -> tuple[int, int, int]:
    """(model, trainable, adapter) parameters: the run's log line 'parameters: N total, M trainable' counts the
    adapter in N, so the model's own count is N less the adapter's tensors (OUT/model/adapter/)."""
    from safetensors import safe_open

    found = re.search(r"parameters: ([\d,]+) total, ([\d,]+) trainable", (run_dir / "train.log").read_text())
    if found is None:
        sys.exit(f"{run_dir / 'train.log'}: no parameter line")
    with safe_open(str(run_dir / "model" / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        adapter = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    total, trainable = int(found[1].replace(",", "")), int(found[2].replace(",", ""))
    return total - adapter, trainable, adapter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="Directory for everything (data, runs, logs, result.json).")
    p.add_argument("--base", type=Path, default=Path("runs/quickstart/model"), help="The trained quickstart model.")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="Budget of the whole `train` command (set-up, feature encoding and saving included).")
    p.add_argument("--setup-minutes", type=float, default=0.9,
                   help="Kept out of --minutes for what train does outside its loop: --max-minutes is the rest.")
    p.add_argument("--steps", type=int, default=None,
                   help="Stop at this many steps instead (the schedule spans them; --minutes then only caps the run), "
                        "for comparing settings on a shared machine.")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default: train's, 2 x rank).")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="--lora-targets.")
    p.add_argument("--tokens", default=NEW_WORDS,
                   help="--lora-tokens: words whose embedding rows also learn ('': none).")
    p.add_argument("--freeze", default="adapter",
                   help="--freeze: adapter trains the adapter alone, llm the projector beside it.")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lora-plus", type=float, default=4.0, help="--lora-plus: the B matrices' rate over --lr.")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="Seeds the two-image training data and the run.")
    p.add_argument("--multi-n", type=int, default=12000, help="Two-image training questions.")
    p.add_argument("--qa-n", type=int, default=6000,
                   help="Single-image quickstart conversations (up to 8 questions each) mixed in; 0: none.")
    p.add_argument("--qa-type-weights", default=QUICKSTART_WEIGHTS + ",describe=6",
                   help="synth --type-weights of the mixed-in single-image questions (default: the quickstart's, "
                        "descriptions 6 times as often: they are what a two-image run forgets first).")
    p.add_argument("--multi-weights", default="",
                   help="synth --type-weights of the two-image training questions (default: the three alike).")
    p.add_argument("--multi-test-n", type=int, default=1000, help="Held-out two-image questions.")
    p.add_argument("--val-n", type=int, default=0,
                   help="Also log a validation loss on the first N held-out two-image questions (every --eval-every "
                        "steps).")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--data-dir", type=Path, default=None, help="Data and before-evaluations (default OUT/data).")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every command.")
    a = p.parse_args()

    if a.minutes <= a.setup_minutes:
        sys.exit(f"--minutes {a.minutes} must exceed --setup-minutes {a.setup_minutes}")
    env = dict(os.environ)
    if a.threads is not None:
        env["OMP_NUM_THREADS"] = str(a.threads)
    out, logs = a.out, a.out / "logs"
    data_dir = a.data_dir or out / "data"
    out.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    if run_dir.exists():
        sys.exit(f"{run_dir}: exists; choose a new OUT (or remove it)")

    # The starting model, copied: training and evaluation read the copy only.
    base = out / "base"
    if not (a.base / "config.json").is_file():
        sys.exit(f"--base {a.base}: not a model directory (run `minimind-v quickstart` first)")
    if not base.exists():
        shutil.copytree(a.base, base)
    sha = weights_sha(base)
    image_size = str(json.loads((base / "config.json").read_text())["vision"]["image_size"])

    # The data, in the quickstart's world and image size; the two-image training seed differs from the test's.
    world = ["--lang", "mix", "--image-size", image_size]
    mix_of = ["--type-weights", a.multi_weights] if a.multi_weights else []
    multi_train = synth(data_dir, f"multi_train_s{a.seed}_{a.multi_n}{suffix(a.multi_weights)}",
                        ["--n", str(a.multi_n), "--kind", "multi", "--seed", str(1000 + a.seed), *mix_of, *world],
                        logs, env)
    multi_test = synth(data_dir, f"multi_test_{a.multi_test_n}",
                       ["--n", str(a.multi_test_n), "--kind", "multi", "--split", "test", "--seed", "7", *world],
                       logs, env)
    qa_test = synth(data_dir, "qa_test", [*QA_TEST, "--image-size", image_size], logs, env)
    parts = [(multi_train, a.multi_n)]
    if a.qa_n > 0:
        weights = "" if a.qa_type_weights == QUICKSTART_WEIGHTS else suffix(a.qa_type_weights)
        qa_train = synth(data_dir, f"qa_train_{a.qa_n}{weights}",
                         ["--n", str(a.qa_n), "--kind", "qa", "--seed", "1", "--max-turns", "8",
                          "--type-weights", a.qa_type_weights, *world], logs, env)
        parts.append((qa_train, a.qa_n))
    old = a.base.parent / "data" / "qa" / "train.jsonl"  # the quickstart's own training set, where it is
    coverage = None
    if old.is_file() or a.qa_n > 0:
        coverage = new_tokens(base / "tokenizer.json", multi_train, old if old.is_file() else parts[-1][0])
        log(f"two-image answers: {json.dumps(coverage)}")
    mix = out / "train_data"
    n_train = mixed_training_set(data_dir, parts, mix, a.seed)
    log(f"{n_train} training records in {mix / 'train.jsonl'}")

    # Before.
    before = {"multi": multi_scores(evaluate_cached(base, sha, multi_test, data_dir / "before_multi.json", logs, env)),
              "quickstart": qa_scores(evaluate_cached(base, sha, qa_test, data_dir / "before_qa.json", logs, env))}
    log(f"before: {json.dumps(before)}")

    # The LoRA run.
    train = ["train", "--stage", "sft", "--from", str(base), "--data", str(mix / "train.jsonl"),
             "--images", str(data_dir), "--out", str(run_dir), "--lora-rank", str(a.rank),
             "--lora-targets", a.targets, "--freeze", a.freeze, "--lr", str(a.lr), "--batch-size", str(a.batch_size),
             "--max-seq-len", str(a.max_seq_len), "--warmup-steps", str(a.warmup_steps), "--seed", str(a.seed),
             "--group-by-length", "--epochs", "20", "--max-minutes", f"{a.minutes - a.setup_minutes:g}",
             "--save-minutes", "0", "--keep-checkpoints", "1"]
    if a.steps is not None:
        train += ["--max-steps", str(a.steps)]
    if a.alpha is not None:
        train += ["--lora-alpha", str(a.alpha)]
    if a.lora_plus != 1:
        train += ["--lora-plus", str(a.lora_plus)]
    if a.tokens:
        train += ["--lora-tokens", a.tokens]
    if a.val_n > 0:  # its images must be found under --images too
        mixed_training_set(data_dir, [(multi_test, a.val_n)], out / "val_data", seed=0)
        train += ["--val-data", str(out / "val_data" / "train.jsonl"), "--eval-every", str(a.eval_every)]
    wall = run(train, logs, "train", env)
    base_params, trainable, adapter_params = parameters(run_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [m for m in metrics if "step" in m and "elapsed" in m][-1]

    # After: OUT/run/model applies its own adapter/.
    model = run_dir / "model"
    after = {"multi": multi_scores(evaluate(model, multi_test, out / "after_multi.json", logs, env)),
             "quickstart": qa_scores(evaluate(model, qa_test, out / "after_qa.json", logs, env))}

    result = {
        "trainable_share": round(trainable / base_params, 4), "trainable": trainable, "model_parameters": base_params,
        "adapter_parameters": adapter_params,
        "train_wall_minutes": round(wall / 60, 2), "train_loop_minutes": round(last["elapsed"] / 60, 2),
        "steps": last["step"], "train_records": n_train,
        "two_images": {"before": before["multi"], "after": after["multi"], "n": a.multi_test_n},
        "quickstart": {"before": before["quickstart"], "after": after["quickstart"], "n": 2000},
        "target_met": {
            "two_images_90": after["multi"]["overall"] >= 0.90,
            "quickstart_within_2_points": all(before["quickstart"][k] - after["quickstart"][k] <= 0.02
                                              for k in ("short", "descriptions")),
            "trainable_under_10_percent": trainable / base_params < 0.10,
            "train_within_minutes": wall / 60 <= a.minutes},
        "new_tokens": coverage,
        "settings": {"rank": a.rank, "alpha": a.alpha or 2 * a.rank, "targets": a.targets, "tokens": a.tokens,
                     "freeze": a.freeze, "lr": a.lr, "lora_plus": a.lora_plus,
                     "batch_size": a.batch_size, "max_seq_len": a.max_seq_len, "warmup_steps": a.warmup_steps,
                     "multi_n": a.multi_n, "qa_n": a.qa_n, "qa_type_weights": a.qa_type_weights, "seed": a.seed,
                     "threads": a.threads, "steps": a.steps, "multi_weights": a.multi_weights,
                     "max_minutes": round(a.minutes - a.setup_minutes, 3)},
        "train_command": "minimind-v " + " ".join(train),
    }
    (out / "result.json").write_text(json.dumps(result, ensure_ascii=False, indent=1))
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
