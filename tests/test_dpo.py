"""`train --stage dpo`: the loss is DPO's formula, the reference is the starting model (LoRA: its base), bad pairs
are counted, RLAIF-V's parquet columns are read, and the command trains, logs its margins and resumes."""

from __future__ import annotations

import copy
import io
import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from minimind_v import adapters, cli
from minimind_v.constants import IGNORE_INDEX
from minimind_v.data.batching import Collator
from minimind_v.data.formats import open_preferences
from minimind_v.data.images import ImagePreprocessor, load_image
from minimind_v.data.preference import PairCollate, open_pairs
from minimind_v.data.synth import SynthOptions, write_dataset
from minimind_v.data.template import encode_conversation
from minimind_v.data.tokenizer import load_tokenizer
from minimind_v.modeldir import MiniMindVLM
from minimind_v.train import freezing
from minimind_v.train.dpo import DPOObjective, Reference, answer_logps
from minimind_v.train.step import Precision, host_prepared, train_step

CPU = torch.device("cpu")
FP32 = Precision.choose("fp32", CPU)
INPUTS = ("input_ids", "labels", "attention_mask", "pixel_values")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    return write_dataset(SynthOptions(out=str(out), n=24, seed=3, kind="pairs", image_size=32))


def _setup(model_dir: Path, data: Path, max_seq_len: int = 512):
    tokenizer = load_tokenizer(model_dir)
    model = MiniMindVLM.from_pretrained(model_dir).train()
    preprocess = ImagePreprocessor.for_image_size(model.cfg.vision.image_size)
    dataset = open_pairs(str(data), None, tokenizer, model.cfg, preprocess, max_seq_len, decode_images=True)
    return tokenizer, model, preprocess, dataset


def _batch(dataset, tokenizer, indices) -> dict[str, torch.Tensor]:
    batch = PairCollate(Collator(tokenizer.pad_token_id))([dataset[i] for i in indices])
    return {k: batch[k] for k in INPUTS if batch.get(k) is not None}


def _plain_logp(model, tokenizer, record: dict, answer: str, pixels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(log p(answer | prompt), its tokens) from one unpadded forward pass, the tokens found by the template alone."""
    messages = [*record["conversations"], {"role": "assistant", "content": answer}]
    enc = encode_conversation(tokenizer, messages, model.cfg, 1)
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor(enc.labels)
    logps = F.log_softmax(model(ids, pixel_values=pixels).logits[0, :-1].double(), dim=-1)
    targets = labels[1:]
    keep = targets != IGNORE_INDEX
    return logps[keep].gather(1, targets[keep, None]).sum(), int(keep.sum())


def test_the_step_loss_is_the_dpo_formula_from_plain_forward_passes(pairs, tiny_model_dir):
    tokenizer, model, preprocess, dataset = _setup(tiny_model_dir, pairs)
    records = [json.loads(line) for line in pairs.read_text().splitlines()][:4]
    assert len(dataset) == 24
    reference = copy.deepcopy(model).eval()
    starting = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    torch.manual_seed(0)
    with torch.no_grad():  # the policy moves away from its start, so the rewards are not all zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    beta, sft_weight = 0.5, 0.3
    expected, with_sft, policy_sums = [], [], []
    with torch.no_grad():
        for record in records:
            pixels = preprocess.pixel_values([load_image(pairs.parent / "images" / record["image"])])
            (pc, n_chosen), (pr, _) = (_plain_logp(model, tokenizer, record, record[s], pixels)
                                       for s in ("chosen", "rejected"))
            (rc, _), (rr, _) = (_plain_logp(reference, tokenizer, record, record[s], pixels)
                                for s in ("chosen", "rejected"))
            expected.append(-F.logsigmoid(beta * ((pc - rc) - (pr - rr))))
            with_sft.append(expected[-1] - sft_weight * pc / n_chosen)
            policy_sums.append((pc, pr))
    batch = _batch(dataset, tokenizer, range(4))
    with torch.no_grad():
        logps = answer_logps(model, host_prepared(batch, model), FP32)[0]
    torch.testing.assert_close(logps.double(), torch.stack([torch.stack(s) for s in policy_sums]).T.flatten(),
                               rtol=0, atol=1e-4)  # each row: exactly its answer's tokens
    objective = DPOObjective(Reference(model, starting), beta, CPU)
    loss_sum, _ = train_step(model, [batch], torch.optim.SGD(model.parameters(), lr=0.0), FP32, 1.0, CPU, objective)
    # 1e-5: a batch and one sample at a time sum in different orders in fp32; on an AVX-512 machine the loss then
    # differs by 1.7e-6 (a wrong formula differs by more than 1e-3).
    assert float(loss_sum) / 4 == pytest.approx(float(torch.stack(expected).mean()), abs=1e-5)
    assert abs(float(torch.stack(expected).mean()) - 0.6931) > 1e-3  # not the trivial log 2
    metrics = objective.window_metrics()
    assert set(metrics) == {"reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected"}
    rpo = DPOObjective(Reference(model, starting), beta, CPU, sft_weight)  # DPO + the chosen answers' cross-entropy
    loss_sum, _ = train_step(model, [batch], torch.optim.SGD(model.parameters(), lr=0.0), FP32, 1.0, CPU, rpo)
    assert float(loss_sum) / 4 == pytest.approx(float(torch.stack(with_sft).mean()), abs=1e-5)


def test_with_lora_the_reference_is_the_base_model_with_its_adapter_off(pairs, tiny_model_dir):
    tokenizer, model, _, dataset = _setup(tiny_model_dir, pairs)
    base = copy.deepcopy(model).eval()
    adapters.inject(model, adapters.lora_config(4, 8, ["q_proj", "v_proj", "down_proj"], 0.0))
    freezing.apply_policy(model, "llm", train_vision=True, uses_images=True, lora=True)
    starting = {n: p.detach().clone() for n, p in model.named_parameters()
                if p.requires_grad and not adapters.is_adapter_weight(n)}
    with torch.no_grad():  # the adapter and the projector have moved since the start
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("projector."):
                p.add_(torch.randn_like(p) * 0.3)
    learns = {n for n, p in model.named_parameters() if p.requires_grad}
    batch = host_prepared(_batch(dataset, tokenizer, range(3)), model)
    reference = Reference(model, starting).logps(batch, FP32)
    with torch.no_grad():
        torch.testing.assert_close(reference, answer_logps(base, batch, FP32)[0], rtol=0, atol=1e-5)
        policy = answer_logps(model, batch, FP32)[0]
    assert (policy - reference).abs().max() > 1e-2  # the adapter is on again after the reference's call
    assert model.training and learns == {n for n, p in model.named_parameters() if p.requires_grad}


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def _bad_pairs(pairs: Path, out: Path) -> Path:
    """The synthetic pairs' first 16 records, and one of each kind of bad pair after them."""
    records = [json.loads(line) for line in pairs.read_text().splitlines()][:16]
    shutil.copytree(pairs.parent / "images", out / "images")
    (out / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    good = records[0]
    bad = [{**good, "chosen": " "}, {**good, "rejected": good["chosen"]}, {**good, "image": "gone.png"},
           {**good, "conversations": [{"role": "user", "content": "<image>\n" + "red " * 400}]},
           {**good, "image": "broken.png"}]
    path = out / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records + bad) + "{not json\n")
    return path


def test_bad_pairs_are_skipped_and_counted(pairs, tiny_model_dir, tmp_path, capsys):
    data = _bad_pairs(pairs, tmp_path)
    tokenizer, _, _, dataset = _setup(tiny_model_dir, data, max_seq_len=256)
    reasons = {b.source.rsplit(":", 1)[1]: b.reason for b in dataset.bad_upfront}
    assert reasons == {"17": "empty_answer", "18": "identical_answers", "19": "missing_image", "20": "too_long",
                       "22": "bad_json"}
    assert len(dataset) == 17 and dataset.tracker(1.0).bad == 5
    found = dataset[16]  # the corrupt image: found when it is decoded
    assert found.reason == "bad_image" and found.source.endswith(":21")
    batch = PairCollate(Collator(tokenizer.pad_token_id))([dataset[15], found])
    assert batch["input_ids"].shape[0] == 2 and [b.reason for b in batch["bad"]] == ["bad_image"]
    code = cli.main(["train", "--stage", "dpo", "--data", str(data), "--from", str(tiny_model_dir), "--out",
                     str(tmp_path / "run"), "--max-seq-len", "256", "--max-steps", "1", "--max-bad-fraction", "0.2"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: 5 of 22 samples unusable (22.7% > --max-bad-fraction 0.2)")


def test_rlaif_v_parquet_columns_are_read(tiny_model_dir, tmp_path):
    rows = {"ds_name": ["a", "b"], "question": ["What color is the image?", "Describe the image."],
            "chosen": ["red", "A blue square."], "rejected": ["green", "A red circle."], "origin_dataset": ["x", "y"]}
    struct = pa.array([{"bytes": _png("red"), "path": "r.png"}, {"bytes": _png("blue"), "path": "b.png"}])
    for name, image in [("struct", struct), ("raw", pa.array([_png("red"), _png("blue")]))]:
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({**rows, "image": image}), path)
        record = open_preferences(path)[1]
        assert record.prompt == [{"role": "user", "content": "Describe the image."}]
        assert (record.chosen, record.rejected) == ("A blue square.", "A red circle.")
        tokenizer, model, _, dataset = _setup(tiny_model_dir, path)
        pair = dataset[1]
        assert pair.chosen.pixel_values.shape == (1, 3, 32, 32)
        assert torch.equal(pair.chosen.pixel_values, pair.rejected.pixel_values)
        answer = tokenizer.decode(pair.rejected.labels[pair.rejected.labels != IGNORE_INDEX])
        assert answer == "A red circle.<|im_end|>"
        assert list(pair.chosen.input_ids).count(model.cfg.image_token_id) == model.cfg.image_token_len


def test_only_the_last_answer_is_supervised_after_a_multi_turn_prompt(pairs, tiny_model_dir, tmp_path):
    record = json.loads(pairs.read_text().splitlines()[0])
    record["conversations"] = [{"role": "user", "content": "<image>\nIs it red?"},
                               {"role": "assistant", "content": "no"}, {"role": "user", "content": "Is it blue?"}]
    record.update(chosen="yes", rejected="no")
    path = pairs.parent / "multi_turn.jsonl"
    path.write_text(json.dumps(record) + "\n")
    tokenizer, _, _, dataset = _setup(tiny_model_dir, path)
    pair = dataset[0]
    for sample, answer in ((pair.chosen, "yes"), (pair.rejected, "no")):
        assert tokenizer.decode(sample.labels[sample.labels != IGNORE_INDEX]) == f"{answer}<|im_end|>"


def test_synth_pairs_as_parquet_are_read(tiny_model_dir, tmp_path):
    path = write_dataset(SynthOptions(out=str(tmp_path), n=4, seed=2, kind="pairs", image_size=32, format="parquet"))
    _, _, _, dataset = _setup(tiny_model_dir, path)
    assert len(dataset) == 4 and dataset[0].chosen.pixel_values.shape == (1, 3, 32, 32)


def _train(pairs: Path, model_dir: Path, out: Path, *extra: str) -> int:
    return cli.main(["train", "--stage", "dpo", "--data", str(pairs), "--from", str(model_dir), "--out", str(out),
                     "--batch-size", "4", "--log-every", "1", "--lr", "1e-3", *extra])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_stage_dpo_writes_a_model_and_logs_its_margins(pairs, tiny_model_dir, tmp_path):
    out = tmp_path / "dpo"
    assert _train(pairs, tiny_model_dir, out, "--max-steps", "3", "--dpo-beta", "0.5") == 0
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"loss", "reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected"} <= set(records[0])
    assert records[0]["reward_margin"] == 0.0 and records[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert records[-1]["reward_margin"] != 0.0  # the model moved away from its reference
    before, after = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(out / "model" /
                                                                                           "model.safetensors"))
    assert not torch.equal(before["lm.layers.0.mlp.up_proj.weight"], after["lm.layers.0.mlp.up_proj.weight"])
    assert "dpo: beta 0.5; the reference is the starting model" in (out / "train.log").read_text()


def test_a_resumed_lora_dpo_run_continues_as_the_uninterrupted_one(pairs, tiny_model_dir, tmp_path):
    """The resumed run's reference is the start again (rebuilt from --from), not the checkpoint's weights."""
    one, resumed = tmp_path / "one", tmp_path / "resumed"
    args = ["--max-steps", "4", "--save-every", "2", "--lora-rank", "4", "--val-data", str(pairs)]
    assert _train(pairs, tiny_model_dir, one, *args) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(one / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    assert _train(pairs, tiny_model_dir, resumed, *args, "--resume") == 0
    assert "with its LoRA layers switched off" in (one / "train.log").read_text()
    expected, got = _metrics(one)[2:], _metrics(resumed)
    assert [r["loss"] for r in got] == [r["loss"] for r in expected] and "val_loss" in got[-1]
    assert [r["reward_margin"] for r in got] == [r["reward_margin"] for r in expected]
    adapter = "model/adapter/adapter_model.safetensors"
    a, b = load_file(str(one / adapter)), load_file(str(resumed / adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_dpo_stage_defaults_and_refusals():
    from minimind_v.errors import UserError
    from minimind_v.train.config import LoraSettings, TrainConfig, for_stage

    full, lora = for_stage(TrainConfig(stage="dpo")), for_stage(TrainConfig(stage="dpo", lora=LoraSettings(lora_rank=8)))
    assert (full.lr, lora.lr, full.epochs, full.freeze, full.dpo_beta) == (1e-5, 1e-4, 1, "llm", 0.1)
    assert math.isclose(for_stage(TrainConfig(stage="sft", lora=LoraSettings(lora_rank=8))).lr, 5e-5 * 2 ** 0.5)  # no LoRA rate
    for bad, flag in [({"dpo_beta": 0.0}, "--dpo-beta"), ({"dpo_sft_weight": -1.0}, "--dpo-sft-weight"),
                      ({"batching": "packed"}, "--batching packed")]:
        with pytest.raises(UserError, match=flag):
            for_stage(TrainConfig(stage="dpo", **bad))
