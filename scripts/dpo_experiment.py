"""DPO on the quickstart model: does preference tuning make it prefer the right answer, without losing descriptions?

    .venv/bin/python scripts/dpo_experiment.py [--start /tmp/fresh/runs/quickstart/model] [--work /tmp/dpo-experiment]
        [--run NAME:FLAGS ...]

1. copies the starting model to WORK/start (the original is never written to); with --weights, a checkpoint's
   trainable.safetensors of the run that made it (e.g. the quickstart's sft/checkpoints/step-00001448, halfway)
   replaces its model.safetensors, for a start that still has something to learn;
2. writes preference pairs with `minimind-v synth --kind pairs`: WORK/pairs/train.jsonl (--split train) to train on,
   WORK/pairs-test/test.jsonl (--split test: scenes the training never saw) to measure on; and held-out description
   questions, WORK/describe/test.jsonl (`synth --kind qa --split test`, every type but describe weighted 0);
3. measures the starting model, then trains each --run (`minimind-v train --stage dpo` with its flags) and measures
   the result:
   - preference share: the held-out pairs where the model gives the chosen answer a higher log-probability than the
     rejected one, the plain sum of log-probs over the answer's supervised tokens (text and end-of-turn token, the
     sums the DPO reward uses; not length-normalised: the two answers differ in one fact and have about the same
     number of tokens); by pair type too; and the mean gap, log p(chosen) - log p(rejected), which still moves
     when the share is at 100%;
   - description exact match: `minimind-v eval` on WORK/describe/test.jsonl;
   - the quickstart's own held-out QA (its data/test/test.jsonl, when there): exact match overall.
Prints one JSON report (also WORK/report.json), with every command it ran.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

from minimind_v import modeldir
from minimind_v.data.batching import Collator
from minimind_v.data.preference import PairCollate, open_pairs
from minimind_v.data.synth.questions import QUESTION_TYPES
from minimind_v.data.tokenizer import load_tokenizer
from minimind_v.train.dpo import answer_logps
from minimind_v.train.step import Precision, host_prepared

CLI = [str(Path(sys.executable).with_name("minimind-v"))]
DEFAULT_RUNS = ["full:--lr 5e-6", "lora:--lora-rank 8 --lr 5e-5"]
COMMANDS: list[str] = []


def sh(*args: str) -> str:
    """Run a minimind-v command, record it, return its stdout."""
    COMMANDS.append(shlex.join(["minimind-v", *args]))
    done = subprocess.run([*CLI, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {COMMANDS[-1]}\n{done.stderr[-3000:]}")
    return done.stdout


def make_data(work: Path, n_train: int, n_test: int, n_describe: int) -> dict[str, Path]:
    no_others = ",".join(f"{t}=0" for t in QUESTION_TYPES if t != "describe")
    sh("synth", "--out", str(work / "pairs"), "--kind", "pairs", "--n", str(n_train), "--seed", "1", "--split", "train")
    sh("synth", "--out", str(work / "pairs-test"), "--kind", "pairs", "--n", str(n_test), "--seed", "2",
       "--split", "test")
    sh("synth", "--out", str(work / "describe"), "--kind", "qa", "--n", str(n_describe), "--seed", "3", "--split",
       "test", "--max-turns", "1", "--type-weights", no_others)
    return {"train": work / "pairs" / "train.jsonl", "test": work / "pairs-test" / "test.jsonl",
            "describe": work / "describe" / "test.jsonl"}


@torch.no_grad()
def preference_share(model_dir: Path, pairs: Path, batch_size: int = 32) -> dict[str, float]:
    """The share of pairs (overall and by type) whose chosen answer the model finds more probable, and the mean gap
    between the two answers' log-probs."""
    model = modeldir.load_model(model_dir, modeldir.own_adapter(model_dir)).eval()
    tokenizer = load_tokenizer(model_dir)
    preprocess = modeldir.load_image_processor(model_dir, model.cfg)
    dataset = open_pairs(str(pairs), None, tokenizer, model.cfg, preprocess, 2048, decode_images=True)
    types = [json.loads(line)["type"] for line in pairs.read_text().splitlines()]
    collate, precision = PairCollate(Collator(tokenizer.pad_token_id)), Precision.choose("fp32", torch.device("cpu"))
    wins: dict[str, list[bool]] = defaultdict(list)
    gaps: list[float] = []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        inputs = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "pixel_values")}
        logps = answer_logps(model, host_prepared(inputs, model), precision)[0]
        half = len(logps) // 2
        gaps += (logps[:half] - logps[half:]).tolist()
        for source, won in zip(batch["sources"], (logps[:half] > logps[half:]).tolist()):
            line = int(source.rsplit(":", 1)[1]) - 1
            wins["all"].append(won)
            wins[types[line]].append(won)
    shares = {kind: round(sum(w) / len(w), 4) for kind, w in sorted(wins.items())}
    return {**shares, "mean_logp_gap": round(sum(gaps) / len(gaps), 3)}


def exact_match(model_dir: Path, data: Path) -> dict[str, float]:
    report = json.loads(sh("eval", "--model", str(model_dir), "--data", str(data)))
    return {"overall": report["exact_match"], **{t: v["exact_match"] for t, v in report["by_type"].items()}}


def measure(model_dir: Path, data: dict[str, Path], quickstart_test: Path | None) -> dict[str, object]:
    result: dict[str, object] = {"preference_share": preference_share(model_dir, data["test"]),
                                 "description_exact_match": exact_match(model_dir, data["describe"])["overall"]}
    if quickstart_test is not None:
        result["quickstart_test_exact_match"] = exact_match(model_dir, quickstart_test)["overall"]
    return result


def train(work: Path, start: Path, data: Path, name: str, flags: str) -> tuple[Path, dict[str, object]]:
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    sh("train", "--stage", "dpo", "--data", str(data), "--from", str(start), "--out", str(out), "--log-every", "10",
       *shlex.split(flags))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    keep = ("step", "loss", "reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected", "elapsed")
    return out / "model", {k: round(last[k], 4) for k in keep if k in last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=Path, default=Path("/tmp/fresh/runs/quickstart/model"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/dpo-experiment"))
    parser.add_argument("--weights", type=Path, help="a checkpoint's trainable.safetensors to start from instead")
    parser.add_argument("--run", action="append", help="NAME:FLAGS for `train --stage dpo` (repeatable)")
    parser.add_argument("--skip-before", action="store_true", help="do not measure the start (tuning runs)")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--n-describe", type=int, default=300)
    args = parser.parse_args()
    work, start = args.work, args.work / "start"
    shutil.rmtree(start, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    shutil.copytree(args.start, start)
    if args.weights is not None:
        shutil.copyfile(args.weights, start / "model.safetensors")
    quickstart_test = args.start.parent / "data" / "test" / "test.jsonl"
    quickstart_test = quickstart_test if quickstart_test.is_file() else None
    data = make_data(work, args.n_train, args.n_test, args.n_describe)
    before = None if args.skip_before else measure(start, data, quickstart_test)
    report: dict[str, object] = {"start": str(args.start), "weights": str(args.weights or ""), "before": before,
                                 "runs": {}}
    for spec in args.run or DEFAULT_RUNS:
        name, _, flags = spec.partition(":")
        model, last = train(work, start, data["train"], name, flags)
        report["runs"][name] = {"flags": flags, "last_log": last, "after": measure(model, data, quickstart_test)}
        print(json.dumps({name: report["runs"][name]}), file=sys.stderr)
    report["commands"] = COMMANDS
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
