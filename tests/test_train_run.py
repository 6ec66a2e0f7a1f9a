"""The real `minimind-v train` command end to end: outputs, bad data, SIGKILL + resume, DDP on CPU (gloo).

Runs happen in-process through cli.main where a subprocess adds nothing, so the suite pays for
only one killed subprocess and one pair of DDP workers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minimind_v import cli
from minimind_v.data.synth import SynthOptions
from minimind_v.data.synth import main as synth_main
from minimind_v.data.tokenizer import load_tokenizer
from minimind_v.modeldir import MiniMindVLM

SMALL_LM = ["--set", "model.lm.hidden_size=32", "--set", "model.lm.num_hidden_layers=2",
            "--set", "model.lm.num_attention_heads=4", "--set", "model.lm.num_key_value_heads=2"]
SMALL_VISION = ["--set", 'model.vision.init={"model_type": "clip_vision_model", "hidden_size": 32, '
                '"intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, '
                '"patch_size": 8, "num_channels": 3}',
                "--set", "model.vision.hidden_size=32", "--set", "model.vision.image_size=32",
                "--set", "model.vision.num_patches=16", "--set", "model.image_token_len=16"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    synth_main(SynthOptions(out=str(out), n=48, seed=1, split="train", kind="mixed", image_size=33))
    return out


def train(*args: str) -> int:
    return cli.main(["train", *args])


def lm_args(world: Path, tokenizer_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--stage", "lm", "--data", str(world / "train.jsonl"), "--out", str(out), "--preset", "tiny",
            "--tokenizer", str(tokenizer_dir), "--max-seq-len", "256", "--log-every", "1", *SMALL_LM, *extra]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_stages_chain_and_write_model_metrics_plot(world, tokenizer_dir, tmp_path):
    pre, sft = tmp_path / "pre", tmp_path / "sft"
    common = ["--data", str(world / "train.jsonl"), "--tokenizer", str(tokenizer_dir), "--batch-size", "4",
              "--max-steps", "3", "--log-every", "1", "--val-data", str(world / "train.jsonl")]
    # A frozen tower: features come from the cache; then the whole model learns from pixels, packed.
    assert train("--stage", "pretrain", "--from", "none", "--preset", "tiny", "--out", str(pre), *common,
                 *SMALL_LM, *SMALL_VISION, "--set", "model.vision.freeze=true") == 0
    assert train("--stage", "sft", "--from", str(pre / "model"), "--out", str(sft), "--freeze", "all",
                 "--packing", "--max-seq-len", "256", *common) == 0
    vocab = len(load_tokenizer(tokenizer_dir))
    for out in (pre, sft):
        model = MiniMindVLM.from_pretrained(out / "model")
        assert model.cfg.lm.vocab_size == vocab and model.cfg.image_token_len == 16
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2, 3]
        assert {"step", "epoch", "loss", "lr", "tokens", "tokens_per_s", "elapsed"} <= set(records[0])
        assert "val_loss" in records[-1] and records[-1]["lr"] == pytest.approx(records[0]["lr"] * 0.1)
        assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        log = (out / "train.log").read_text()
        assert "trainable" in log and "usable samples" in log
    assert any((pre / "feature_cache").rglob("int8/shard-*.q")) and not (sft / "feature_cache").exists()
    sft_vision = load_file(str(sft / "model" / "vision" / "model.safetensors"))
    pre_vision = load_file(str(pre / "model" / "vision" / "model.safetensors"))
    key = next(k for k in pre_vision if "q_proj.weight" in k)
    assert not torch.equal(sft_vision[key], pre_vision[key])  # --freeze all: the tower learned


def test_a_feature_cache_with_no_room_encodes_on_the_fly(world, tokenizer_dir, tmp_path, monkeypatch):
    from minimind_v.data import feature_cache

    full = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda path: full)
    out = tmp_path / "full"
    assert train("--stage", "pretrain", "--from", "none", "--preset", "tiny", "--out", str(out), "--data",
                 str(world / "train.jsonl"), "--tokenizer", str(tokenizer_dir), "--batch-size", "4", "--max-steps",
                 "2", *SMALL_LM, *SMALL_VISION, "--set", "model.vision.freeze=true") == 0
    log = (out / "train.log").read_text()
    assert "1000.0 B free: the images are encoded by the tower at every step instead" in log
    assert not any((out / "feature_cache").rglob("shard-*")) and (out / "model" / "model.safetensors").is_file()


def test_max_minutes_stops_early_and_still_writes_the_model(world, tokenizer_dir, tmp_path):
    out = tmp_path / "timed"
    # A limit far below one step's time: the run stops after its first step, saved like any finished run.
    assert train(*lm_args(world, tokenizer_dir, out, "--max-steps", "5", "--max-minutes", "1e-6")) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (out / "model" / "model.safetensors").is_file() and (out / "loss.png").is_file()
    assert train(*lm_args(world, tokenizer_dir, tmp_path / "x", "--max-minutes", "0")) == 2


def test_a_time_capped_run_still_decays_to_the_floor(world, tokenizer_dir, tmp_path):
    out = tmp_path / "capped"
    # Far more steps than fit in 4 seconds: the learning rate follows the clock and ends near the floor.
    assert train(*lm_args(world, tokenizer_dir, out, "--max-steps", "100000", "--epochs", "100000",
                          "--max-minutes", "0.067", "--lr", "1e-3", "--set", "warmup_steps=1")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] < 100000 and records[-1]["lr"] < 1e-3 * (0.1 + 0.05)


def test_too_many_bad_samples_stop_with_exit_2(world, tokenizer_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    lines = (world / "train.jsonl").read_text().splitlines()[:18] + ["{not json", '{"conversations": 3}']
    data.write_text("\n".join(lines) + "\n")
    code = train(*lm_args(world, tokenizer_dir, tmp_path / "run", "--max-steps", "1"), "--data", str(data),
                 "--max-bad-fraction", "0.05")
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # the lines before it are the run log's echo
    assert code == 2 and last.startswith("error: 2 of 20 samples unusable (10.0% > --max-bad-fraction 0.05)")
    assert "bad.jsonl:19" in last and "Traceback" not in err


def test_batches_by_a_token_budget(world, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "budget"
    assert train(*lm_args(world, tokenizer_dir, out, "--tokens-per-step", "700", "--batch-size", "16",
                          "--max-steps", "3")) == 0
    assert "700 padded tokens (at most 16 samples per micro-batch)" in (out / "train.log").read_text()
    assert len(losses(out)) == 3
    code = train(*lm_args(world, tokenizer_dir, tmp_path / "p", "--tokens-per-step", "700", "--packing"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: --tokens-per-step: packed batches are already budgeted")


def test_sigkill_after_checkpoint_then_resume_is_bit_identical(world, tokenizer_dir, tmp_path):
    args = ["--batch-size", "2", "--max-steps", "40", "--save-every", "4", "--set", "model.lm.dropout=0.2"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert train(*lm_args(world, tokenizer_dir, reference, *args)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minimind_v.cli", "train",
                             *lm_args(world, tokenizer_dir, killed, *args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not (killed / "checkpoints" / "step-00000004").exists():
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        code = proc.wait()
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "model").exists()
    assert train(*lm_args(world, tokenizer_dir, killed, *args, "--resume")) == 0
    expected, got = weights(reference), weights(killed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert losses(killed) == losses(reference)  # metrics past the checkpoint were rewritten, not duplicated


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, ports: list[int], runs: list[list[str]]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    for port, argv in zip(ports, runs):
        os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous per run: the last one may linger
        if cli.main(["train", *argv]) != 0:
            raise SystemExit(f"rank {rank}: train {argv} failed")


@pytest.fixture(scope="module")
def ddp_runs(world, tokenizer_dir, tmp_path_factory):
    """one: 1 process, 2 micro-batches of 2 per step; two: 2 processes, 1 micro-batch of 2 each (the same
    global batch); resumed: `one`'s step-2 checkpoint continued by 2 processes."""
    root = tmp_path_factory.mktemp("ddp")
    one, two, resumed = root / "one", root / "two", root / "resumed"
    args = ["--batch-size", "2", "--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "5"]
    assert train(*lm_args(world, tokenizer_dir, one, *args, "--accumulation-steps", "2")) == 0
    resumed.mkdir()
    shutil.copytree(one / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    # `two` saves by the clock (every log step, here every step), which both processes must read alike.
    by_clock = [*args, "--save-every", "0", "--save-minutes", "1e-9"]
    runs = [lm_args(world, tokenizer_dir, two, *by_clock), lm_args(world, tokenizer_dir, resumed, *args, "--resume")]
    torch.multiprocessing.spawn(_ddp_worker, args=([_free_port() for _ in runs], runs), nprocs=2)
    return one, two, resumed


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(ddp_runs):
    one, two, _ = ddp_runs
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    for key, value in weights(one).items():
        torch.testing.assert_close(weights(two)[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_checkpoints_by_the_clock_come_at_log_steps_on_every_process(ddp_runs):
    _, two, _ = ddp_runs
    saved = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert saved == [f"step-{i:08d}" for i in (1, 2, 3, 4)]


def test_checkpoints_by_the_clock_wait_for_their_minutes(world, tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    # The default: every 10 minutes, which a run of seconds never reaches, so only the end is saved.
    assert train(*lm_args(world, tokenizer_dir, out, "--batch-size", "2", "--max-steps", "3",
                          "--keep-checkpoints", "5")) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]


def test_resume_with_another_world_size_continues_from_the_same_global_sample(ddp_runs):
    one, _, resumed = ddp_runs
    log = (resumed / "train.log").read_text()
    assert "step 2, epoch 0, batch 4 (8 samples of that epoch consumed), saved by 1 process(es), now 2" in log
    assert losses(resumed)[-2:] == pytest.approx(losses(one)[-2:], rel=1e-5)
    for key, value in weights(one).items():
        torch.testing.assert_close(weights(resumed)[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_from_an_original_pth_starts_from_its_weights(world, tokenizer_dir, tiny_model_dir, tmp_path):
    from minimind_v.convert.upstream import upstream_name
    from minimind_v.modeldir import weights_to_save

    source = MiniMindVLM.from_pretrained(tiny_model_dir)
    llm = {k: v for k, v in weights_to_save(source).items() if k.startswith("lm.")}
    original = {upstream_name(k): v.half() for k, v in llm.items()}
    original["lm_head.weight"] = original["model.embed_tokens.weight"].clone()  # stored twice upstream
    torch.save(original, tmp_path / "llm_64.pth")
    cfg = source.cfg
    shapes = [f"model.lm.{k}={getattr(cfg.lm, k)}" for k in ("vocab_size", "hidden_size", "num_hidden_layers")]
    shapes += [f"model.vision.{k}={getattr(cfg.vision, k)}" for k in ("hidden_size", "image_size", "num_patches")]
    shapes += [f"model.image_token_len={cfg.image_token_len}"]
    out = tmp_path / "run"
    assert train("--stage", "pretrain", "--from", str(tmp_path / "llm_64.pth"), "--preset", "tiny",
                 "--vision", str(tiny_model_dir / "vision"), "--tokenizer", str(tokenizer_dir),
                 "--data", str(world / "train.jsonl"), "--out", str(out), "--batch-size", "2", "--max-steps", "2",
                 *[arg for s in shapes for arg in ("--set", s)]) == 0
    trained = weights(out)
    assert all(torch.equal(trained[k], v.half().float()) for k, v in llm.items())  # frozen: exactly the file's
    assert "projector.net.0.weight" in trained and "fresh" in (out / "train.log").read_text()


def test_every_knob_that_changes_the_result_is_recorded_and_checked_on_resume(world, tokenizer_dir, tmp_path,
                                                                                capsys):
    out = tmp_path / "run"
    assert train(*lm_args(world, tokenizer_dir, out, "--max-steps", "1", "--lr", "0", "--max-minutes", "5")) == 0
    saved = json.loads(next((out / "checkpoints").glob("step-*/state.json")).read_text())["config"]
    assert saved["lr"] == 0 and saved["max_minutes"] == 5 and saved["feature_cache"] is False  # 0 is not "unset"
    assert [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0]
    capsys.readouterr()
    assert train(*lm_args(world, tokenizer_dir, out, "--max-steps", "2", "--lr", "0", "--max-minutes", "9",
                          "--resume")) == 2
    assert "max_minutes: 5.0 -> 9.0" in capsys.readouterr().err


def test_the_3v_augmentations_reach_the_training_data(world, tokenizer_dir, tmp_path, capsys):
    # The 2025 tokenizer writes no think block: asking to drop empty ones is refused, naming the flag.
    assert train(*lm_args(world, tokenizer_dir, tmp_path / "run", "--max-steps", "1",
                          "--drop-empty-think-ratio", "0.8")) == 2
    assert "--drop-empty-think-ratio 0.8" in capsys.readouterr().err
    out = tmp_path / "sys"
    assert train(*lm_args(world, tokenizer_dir, out, "--max-steps", "1", "--system-prompt-ratio", "1")) == 0
    saved = json.loads(next((out / "checkpoints").glob("step-*/state.json")).read_text())["config"]
    assert saved["augment"] == {"system_prompt_ratio": 1.0, "drop_empty_think_ratio": 0.0}
