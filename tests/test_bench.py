"""`minimind-v bench`: both loops train the same objective with the stage's trainable set; the JSON is complete."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig

from minimind_v import bench, cli
from minimind_v.data.batching import Collator, bucket_widths
from minimind_v.model.llm import IGNORE_INDEX

TINY = dict(preset="tiny", steps=1, warmup=0, batch_size=2, max_seq_len=160)


def test_both_modes_report_and_agree_on_the_first_loss() -> None:
    result = bench.run(bench.BenchOptions(stage="pretrain", **TINY))
    for mode in ("fast", "naive"):
        r = result[mode]
        assert r["samples_per_s"] > 0 and r["real_tokens_per_s"] > 0 and r["model_tflops_per_s"] > 0
        assert r["cpu_seconds_per_step"] > 0
        assert r["mfu"] is None  # no known peak on CPU
        assert r["peak_memory_mb"]["kind"] == "process_peak_rss"
    assert result["speedup_fast_over_naive"] == pytest.approx(
        result["fast"]["samples_per_s"] / result["naive"]["samples_per_s"], rel=0.01)
    # Padding, cached fp16 features and head-only-where-supervised leave the objective unchanged.
    assert result["first_step_loss_gap"] < 1e-3
    assert result["feature_cache"]["encoded_once_untimed"] is True
    generation = result["generation"]
    assert generation["new_tokens"] == 100 and generation["new_tokens_per_s"] > 0
    assert generation["prompt_tokens"] == bench.bench_config("tiny").image_token_len + 54  # placeholder run + text


def test_the_two_loops_supervise_the_same_targets() -> None:
    s = bench.setup(bench.BenchOptions(stage="sft", **{**TINY, "max_seq_len": 400}))
    batch = s.batches[0]
    x, y, mask = bench.naive_inputs(batch, s.max_len, torch.device("cpu"))
    lengths = np.array([len(x.input_ids) for x in batch.samples])
    inputs = bench.fast_inputs(batch, Collator(0, widths=bucket_widths(lengths, 1)))  # one width, a multiple of 8
    ids, labels = inputs["input_ids"], inputs["labels"]
    assert torch.equal(inputs["image_features"], batch.features)
    assert ids.shape[1] % 8 == 0 and ids.shape[1] < x.shape[1]
    for row in range(len(batch.samples)):
        naive = {(t, int(y[row, t])) for t in range(y.shape[1]) if mask[row, t]}
        fast = {(t, int(labels[row, t + 1])) for t in range(ids.shape[1] - 1) if labels[row, t + 1] != IGNORE_INDEX}
        assert naive == fast and naive
        assert torch.equal(x[row, :ids.shape[1]][ids[row] != 0], ids[row][ids[row] != 0])


@pytest.mark.parametrize("stage, llm_moves", [("pretrain", False), ("sft", True)])
@pytest.mark.parametrize("mode", ["naive", "fast"])
def test_each_mode_trains_the_stage_trainable_set(stage: str, llm_moves: bool, mode: str) -> None:
    opts = bench.BenchOptions(stage=stage, mode=mode, **TINY)
    s = bench.setup(opts)
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    bench.time_mode(mode, s, opts)
    after = s.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("projector.") for k in moved)
    assert not any(k.startswith("vision.") for k in moved)
    assert any(k.startswith("lm.") for k in moved) == llm_moves


def test_flop_count_matches_the_real_parameter_count() -> None:
    cfg = bench.bench_config("tiny")
    s = bench.setup(bench.BenchOptions(stage="sft", **TINY))
    sample = s.batches[0].samples[0]
    T = len(sample.input_ids)
    supervised = sum(t != IGNORE_INDEX for t in sample.labels)
    block_params = sum(p.numel() for p in s.model.lm.layers.parameters() if p.dim() == 2)
    head = s.model.lm.lm_head.weight.numel()
    projector = sum(p.numel() for p in s.model.projector.parameters() if p.dim() == 2)
    L, C = cfg.lm.num_hidden_layers, cfg.lm.hidden_size
    attention = L * 4 * C * T * (T + 1) / 2
    expected = 6 * (block_params * T + head * supervised) + 3 * attention + 6 * projector * cfg.image_token_len
    assert bench.sample_flops(cfg, sample, "sft") == pytest.approx(expected)
    # pretrain: the LLM's weight gradients are skipped, one third of its matmul work.
    pre = bench.sample_flops(cfg, sample, "pretrain")
    assert pre == pytest.approx(expected - 2 * (block_params * T + head * supervised))


def test_the_real_presets_get_a_random_clip_b16_of_the_true_shape() -> None:
    cfg = bench.bench_config("minimind2-small-v")
    init = dict(cfg.vision.init)
    clip = CLIPVisionConfig(**{k: v for k, v in init.items() if k != "model_type"})
    assert (clip.image_size // clip.patch_size) ** 2 == cfg.image_token_len == 196
    assert (clip.hidden_size, clip.num_hidden_layers, clip.num_attention_heads) == (768, 12, 12)


def test_cli_prints_json_and_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--preset", "tiny", "--stage", "pretrain", "--steps", "1", "--warmup", "0",
            "--batch-size", "1", "--max-seq-len", "128", "--mode", "fast", "--no-generate"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert "fast" in result and "naive" not in result and "speedup_fast_over_naive" not in result
    assert "generation" not in result
    assert cli.main(["bench", "--preset", "tiny", "--steps", "0"]) == 2
    no_room = bench.bench_config("tiny").image_token_len + 1  # the image fits, the prompt and answer do not
    assert cli.main(["bench", "--preset", "tiny", "--max-seq-len", str(no_room)]) == 2
    assert cli.main(["bench", "--preset", "nope"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def _standin(tmp_path, like: str, n: int):
    from minimind_v.data.synth import SynthOptions, write_dataset

    path = write_dataset(SynthOptions(out=str(tmp_path), n=n, seed=0, like=like))
    return path, path.parent / ("pretrain_images" if "pretrain" in like else "sft_images")


def test_data_samples_are_the_trainers_own(tmp_path, tokenizer_dir) -> None:
    from minimind_v.data.images import ImagePreprocessor
    from minimind_v.data.tokenizer import load_tokenizer
    from minimind_v.train.build import open_data

    path, images = _standin(tmp_path, "minimind-v-sft", 24)  # each image twice, some samples text-only
    opts = bench.BenchOptions(stage="sft", preset="tiny", steps=2, warmup=0, batch_size=4, data=str(path),
                              images=str(images), tokenizer=str(tokenizer_dir))
    s = bench.setup(opts)
    cfg = s.cfg
    dataset = open_data(str(path), str(images), load_tokenizer(tokenizer_dir), cfg,
                        ImagePreprocessor.for_image_size(cfg.vision.image_size), s.max_len, decode_images=True)
    own = {tuple(dataset[i].input_ids.tolist()): dataset[i] for i in range(len(dataset))}
    drawn = [x for b in s.batches for x in b.samples]
    assert len(drawn) == 8 and len({tuple(x.input_ids) for x in drawn}) == 8  # 8 of 24 records, no repeats
    for x in drawn:
        sample = own[tuple(x.input_ids)]
        assert x.labels == sample.labels.tolist()
        assert (x.pixel_values is None) == (sample.pixel_values is None)
        if x.pixel_values is not None:
            assert torch.equal(x.pixel_values, sample.pixel_values)
    for b in s.batches:  # the images in placeholder order, one feature row per image
        placeholders = sum(t == cfg.image_token_id for x in b.samples for t in x.input_ids)
        n_images = 0 if b.pixels is None else len(b.pixels)
        assert placeholders == n_images * cfg.image_token_len
        assert (b.features is None) == (b.pixels is None)
    assert s.data is not None and (s.data.records, s.data.usable) == (24, 24)
    assert s.data.images_per_sample == pytest.approx(len(list(images.iterdir())) / 24)


def test_a_data_run_reports_the_set_up_and_the_epochs_both_loops_imply(tmp_path, tokenizer_dir) -> None:
    path, images = _standin(tmp_path, "minimind-v-pretrain", 12)
    result = bench.run(bench.BenchOptions(stage="pretrain", preset="tiny", steps=2, warmup=1, batch_size=2,
                                          data=str(path), images=str(images), tokenizer=str(tokenizer_dir),
                                          epoch_samples=1000, generate=False))
    assert result["first_step_loss_gap"] < 1e-3  # real lengths and pixels: still one objective
    epoch = result["epoch"]
    assert (epoch["samples"], epoch["epochs"]) == (1000, 4)  # the pretrain stage's epochs
    fast, naive = result["fast"]["samples_per_s"], result["naive"]["samples_per_s"]
    assert epoch["naive_total_s"] == pytest.approx(4 * 1000 / naive, rel=0.01)
    set_up = (result["data"]["up_front_pass_s"] * 1000 / 12
              + 1000 * result["data"]["images_per_sample"] * result["feature_cache"]["seconds_per_image"])
    assert epoch["fast_set_up_s"] == pytest.approx(set_up, abs=0.1)
    assert epoch["fast_total_s"] == pytest.approx(set_up + 4 * 1000 / fast, rel=0.01, abs=0.2)
    assert epoch["naive_over_fast_total"] == pytest.approx(epoch["naive_total_s"] / epoch["fast_total_s"], rel=0.01)


def test_data_mistakes_are_one_line(tmp_path, tokenizer_dir, capsys: pytest.CaptureFixture[str]) -> None:
    path, images = _standin(tmp_path, "minimind-v-pretrain", 4)
    base = ["bench", "--preset", "tiny", "--stage", "pretrain", "--steps", "1", "--no-generate"]
    assert cli.main([*base, "--data", str(path)]) == 2  # no tokenizer
    assert "needs --tokenizer" in capsys.readouterr().err
    assert cli.main([*base, "--tokenizer", str(tokenizer_dir)]) == 2  # a tokenizer without data
    assert cli.main([*base, "--data", str(tmp_path / "nope.jsonl"), "--tokenizer", str(tokenizer_dir)]) == 2
    assert "no such file" in capsys.readouterr().err
    # the images left beside the data file instead of in their folder: the reason is in the line
    assert cli.main([*base, "--data", str(path), "--tokenizer", str(tokenizer_dir)]) == 2
    err = capsys.readouterr().err
    assert "no usable sample" in err and "missing_image" in err and "Traceback" not in err
    assert cli.main([*base, "--epochs", "0"]) == 2
