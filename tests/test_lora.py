"""LoRA adapters (peft) at tiny size: training only the adapter and what the policy trains, bit-exact resume,
merge-lora, --adapter for chat and eval, and the adapter of an export-hf model in transformers + peft."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from minimind_v import adapters, cli
from minimind_v.curves import checkpoint_engines
from minimind_v.data.synth import SynthOptions
from minimind_v.data.template import build_prompt
from minimind_v.data.synth import main as synth_main
from minimind_v.data.tokenizer import load_tokenizer
from minimind_v.infer.engine import Engine, SamplingParams
from minimind_v.modeldir import MiniMindVLM, weights_to_save
from minimind_v.train.config import LORA_TARGETS
from minimind_v.train.lora import token_ids

QUESTION = [{"role": "user", "content": "<image>\ndescribe the image"}]
TEXT_ONLY = [{"role": "user", "content": "describe the image"}]
GREEDY = SamplingParams(max_new_tokens=12)


def picture() -> Image.Image:
    return Image.new("RGB", (40, 40), (200, 40, 40))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    synth_main(SynthOptions(out=str(out), n=32, seed=3, split="train", kind="qa", max_turns=1, image_size=32))
    return out


TOKEN_ROWS = [5, 9, 40]
"""The embedding rows the test adapters retrain (and, tied, the output head's)."""


def write_adapter(model_dir: Path, out: Path) -> Path:
    """An adapter of `model_dir` on every target layer and TOKEN_ROWS, its B and rows drawn wide so that they
    change the answers."""
    model = MiniMindVLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    adapters.inject(model, adapters.lora_config(4, 8, list(LORA_TARGETS), 0.0, TOKEN_ROWS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
            elif "trainable_tokens_delta" in name:  # rows as wide as the embedding's own
                param.normal_(0.0, 0.02)
    adapters.save_adapter(model, out, weights_to_save(model))
    return out


def with_own_adapter(model_dir: Path, adapter: Path, out: Path) -> Path:
    """A model directory as a LoRA run writes it: the base files and adapter/."""
    shutil.copytree(model_dir, out)
    shutil.copytree(adapter, out / "adapter")
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return write_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def lora_model_dir(tiny_model_dir, adapter_dir, tmp_path_factory) -> Path:
    return with_own_adapter(tiny_model_dir, adapter_dir, tmp_path_factory.mktemp("lora-model") / "model")


@pytest.fixture(scope="module")
def plain_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """tiny_model_dir at the preset's own initialisation (std 0.02). Merged and unmerged differ by float32 rounding
    only, and that grows with the weights: ~1e-6 here, ~8e-5 at tiny_model_dir's deliberately wide ones."""
    model = MiniMindVLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(2)
    with torch.no_grad():
        for param in [*model.lm.parameters(), *model.projector.parameters()]:
            if param.dim() == 2:
                param.normal_(0.0, 0.02)
    out = tmp_path_factory.mktemp("plain") / "model"
    model.save_pretrained(out, tokenizer=load_tokenizer(tiny_model_dir))
    return out


@pytest.fixture(scope="module")
def plain_adapter_dir(plain_model_dir, tmp_path_factory) -> Path:
    return write_adapter(plain_model_dir, tmp_path_factory.mktemp("plain-adapter"))


def inputs(engine: Engine) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([engine.prompt(QUESTION, n_images=1)])
    return ids, engine.encode_images([picture()])


def test_the_adapter_is_in_peft_format(adapter_dir):
    from peft import PeftConfig

    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = PeftConfig.from_pretrained(str(adapter_dir))
    assert (config.peft_type, config.r, config.lora_alpha, config.inference_mode) == ("LORA", 4, 8, True)
    keys = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert "base_model.model.lm.layers.0.attn.q_proj.lora_A.weight" in keys
    rows = keys.pop("base_model.model.lm.embed_tokens.token_adapter.trainable_tokens_delta")
    assert rows.shape[0] == len(TOKEN_ROWS) and config.trainable_token_indices == TOKEN_ROWS
    assert all(k.startswith("base_model.model.lm.layers.") for k in keys)  # never the tower's q_proj
    assert len(keys) == 2 * len(LORA_TARGETS) * 2  # A and B, every target, both layers


def test_retrained_token_rows_change_the_embedding_and_the_head_alike(plain_model_dir, plain_adapter_dir, tmp_path):
    merged_dir = tmp_path / "merged"
    assert cli.main(["convert", "merge-lora", "--model", str(plain_model_dir), "--adapter", str(plain_adapter_dir),
                     "--out", str(merged_dir)]) == 0
    base, merged = (load_file(str(d / "model.safetensors")) for d in (plain_model_dir, merged_dir))
    rows = load_file(str(plain_adapter_dir / "adapter_model.safetensors"))[
        "base_model.model.lm.embed_tokens.token_adapter.trainable_tokens_delta"]
    embed = "lm.embed_tokens.weight"
    assert set(merged) == set(base)  # the head is still the embedding, saved once
    assert torch.equal(merged[embed][TOKEN_ROWS], rows)
    others = [i for i in range(base[embed].shape[0]) if i not in TOKEN_ROWS]
    assert torch.equal(merged[embed][others], base[embed][others])
    model = MiniMindVLM.from_pretrained(merged_dir)
    assert model.lm.lm_head.weight is model.lm.embed_tokens.weight


def test_merged_and_unmerged_give_the_same_logits(plain_model_dir, plain_adapter_dir, tmp_path):
    merged_dir = tmp_path / "merged"
    assert cli.main(["convert", "merge-lora", "--model", str(plain_model_dir), "--adapter", str(plain_adapter_dir),
                     "--out", str(merged_dir)]) == 0
    assert not (merged_dir / "adapter").exists()
    engine = Engine.load(plain_model_dir, "cpu", adapter=plain_adapter_dir)
    ids, pixels = inputs(engine)
    merged, base = MiniMindVLM.from_pretrained(merged_dir), MiniMindVLM.from_pretrained(plain_model_dir)
    with torch.inference_mode():
        unmerged_logits = engine.model(ids, pixel_values=pixels).logits
        merged_logits = merged(ids, pixel_values=pixels).logits
        base_logits = base(ids, pixel_values=pixels).logits
    torch.testing.assert_close(merged_logits, unmerged_logits, atol=1e-5, rtol=0)
    assert (base_logits - unmerged_logits).abs().max() > 0.3  # the adapter matters: the comparison means something
    assert not any("lora" in name for name, _ in merged.named_modules())


def test_chat_and_eval_apply_the_adapter(tiny_model_dir, adapter_dir, lora_model_dir, world, tmp_path, capsys):
    with_adapter = Engine.load(tiny_model_dir, "cpu", adapter=adapter_dir).chat(TEXT_ONLY, [], GREEDY)
    base = Engine.load(tiny_model_dir, "cpu").chat(TEXT_ONLY, [], GREEDY)
    assert with_adapter.token_ids != base.token_ids
    # A model directory's own adapter/ applies without the flag.
    assert Engine.load(lora_model_dir, "cpu").chat(TEXT_ONLY, [], GREEDY).token_ids == with_adapter.token_ids
    capsys.readouterr()
    chat = ["chat", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--prompt", "describe the image",
            "--greedy", "--max-new-tokens", "12", "--json"]
    assert cli.main(chat) == 0
    assert json.loads(capsys.readouterr().out)["text"] == with_adapter.text

    data, predictions = world / "train.jsonl", tmp_path / "predictions.jsonl"
    evaluate = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--limit", "4", "--max-new-tokens", "8"]
    assert cli.main([*evaluate, "--adapter", str(adapter_dir), "--predictions", str(predictions)]) == 0
    assert cli.main(["eval", "--model", str(lora_model_dir), *evaluate[3:], "--predictions",
                     str(tmp_path / "own.jsonl")]) == 0
    assert cli.main([*evaluate, "--predictions", str(tmp_path / "base.jsonl")]) == 0
    answers = {name: (tmp_path / name).read_text() for name in ("predictions.jsonl", "own.jsonl", "base.jsonl")}
    assert answers["predictions.jsonl"] == answers["own.jsonl"] != answers["base.jsonl"]


def test_a_bad_adapter_is_one_line(tiny_model_dir, adapter_dir, tmp_path, capsys):
    other = tmp_path / "other-base"  # the same shapes, other weights
    model = MiniMindVLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm.layers[0].attn.q_proj.weight.add_(0.01)
    model.save_pretrained(other, tokenizer=load_tokenizer(tiny_model_dir))
    shutil.copytree(adapter_dir, tmp_path / "bare")  # without the fingerprint: the shapes are what is checked
    tensors = load_file(str(tmp_path / "bare" / "adapter_model.safetensors"))
    key = "base_model.model.lm.layers.0.attn.q_proj.lora_A.weight"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(tmp_path / "bare" / "adapter_model.safetensors"), {"format": "pt"})
    cases = [(tiny_model_dir, tmp_path / "nowhere", "not a LoRA adapter directory"),
             (other, adapter_dir, "trained on other base weights"),
             (tiny_model_dir, tmp_path / "bare", "lora_A.weight has shape (4, 63), this model needs (4, 64)")]
    for model_dir, adapter, reason in cases:
        capsys.readouterr()
        code = cli.main(["chat", "--model", str(model_dir), "--adapter", str(adapter), "--prompt", "hi"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and reason in err and "Traceback" not in err, err


def lora_train(world: Path, model_dir: Path, out: Path, *extra: str) -> int:
    return cli.main(["train", "--stage", "sft", "--from", str(model_dir), "--data", str(world / "train.jsonl"),
                     "--out", str(out), "--batch-size", "4", "--log-every", "1", "--max-seq-len", "256",
                     "--set", "model.vision.freeze=true", "--lora-rank", "4", "--lora-targets", "q_proj,v_proj",
                     "--lora-dropout", "0.1", "--lr", "1", "--save-every", "3",
                     # A warmup longer than any of these runs: the same learning rate at each step, whatever
                     # --max-steps says, so a run stopped at 3 and resumed to 6 can equal one of 6 bit for bit.
                     "--set", "warmup_steps=1000", *extra])


LORA_WORDS = "red,square"
"""--lora-tokens of the LoRA runs: words of the world, so their rows see gradients."""


@pytest.fixture(scope="module")
def lora_runs(world, tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lora-runs")
    whole, resumed = root / "whole", root / "resumed"
    tokens = ("--lora-tokens", LORA_WORDS)
    assert lora_train(world, tiny_model_dir, whole, "--max-steps", "6", *tokens) == 0
    assert lora_train(world, tiny_model_dir, resumed, "--max-steps", "3", *tokens) == 0
    assert lora_train(world, tiny_model_dir, resumed, "--max-steps", "6", "--resume", *tokens) == 0
    return whole, resumed


def test_lora_tokens_are_every_token_of_each_word_at_a_line_start_and_after_a_space(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    def spell(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    assert spell("red") != spell(" red")[-len(spell("red")):]  # byte-level BPE: two spellings, both needed
    ids = token_ids(["red", "square"], tokenizer)
    assert set(ids) == {t for text in ("red", " red", "square", " square") for t in spell(text)} - set(spell(" "))
    assert ids == sorted(ids) and token_ids([], tokenizer) == []


def test_a_lora_run_trains_the_adapter_and_the_projector_only(lora_runs, tiny_model_dir):
    whole, _ = lora_runs
    base = MiniMindVLM.from_pretrained(tiny_model_dir)
    layers = base.lm.layers
    lora = sum(4 * (layer.attn.q_proj.in_features + layer.attn.q_proj.out_features
                    + layer.attn.v_proj.in_features + layer.attn.v_proj.out_features) for layer in layers)
    projector = sum(p.numel() for p in base.projector.parameters())
    rows = token_ids(LORA_WORDS.split(","), load_tokenizer(tiny_model_dir))
    row_params = len(rows) * base.lm.embed_tokens.weight.shape[1]
    log = (whole / "train.log").read_text()
    assert (f"{lora + projector + row_params:,} trainable (freeze=llm, LoRA rank 4 alpha 8 on q_proj,v_proj and "
            f"the embedding rows of {LORA_WORDS})") in log
    saved = load_file(str(whole / "checkpoints" / "step-00000006" / "trainable.safetensors"))
    assert sum(t.numel() for t in saved.values()) == lora + projector + row_params
    assert {k for k in saved if not k.startswith("projector.")} == {
        f"lm.layers.{i}.attn.{name}.{ab}.default.weight" for i in range(len(layers)) for name in ("q_proj", "v_proj")
        for ab in ("lora_A", "lora_B")} | {"lm.embed_tokens.token_adapter.trainable_tokens_delta.default"}
    # OUT/model: the frozen LLM as it was, the projector trained, the adapter (and its rows) in adapter/.
    before, after = weights_to_save(base), load_file(str(whole / "model" / "model.safetensors"))
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("lm."))
    assert not torch.equal(after["projector.net.1.weight"], before["projector.net.1.weight"])
    trained = load_file(str(whole / "model" / "adapter" / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # B left zero: it learned
    learned = trained["base_model.model.lm.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert not torch.equal(learned, before["lm.embed_tokens.weight"][rows])


def test_under_freeze_adapter_only_the_adapter_learns(world, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert lora_train(world, tiny_model_dir, out, "--max-steps", "2", "--freeze", "adapter") == 0
    base = MiniMindVLM.from_pretrained(tiny_model_dir)
    lora = sum(4 * (layer.attn.q_proj.in_features + layer.attn.q_proj.out_features
                    + layer.attn.v_proj.in_features + layer.attn.v_proj.out_features) for layer in base.lm.layers)
    assert f"{lora:,} trainable (freeze=adapter, LoRA rank 4" in (out / "train.log").read_text()
    before, after = weights_to_save(base), load_file(str(out / "model" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_killed_resumed_and_merged_equals_the_uninterrupted_run(lora_runs, tmp_path):
    whole, resumed = lora_runs
    assert "resumed from" in (resumed / "train.log").read_text()
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (whole, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        expected, got = (load_file(str(run / "model" / name)) for run in (whole, resumed))
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), name
    merged = []
    for run in (whole, resumed):
        out = tmp_path / run.name
        assert cli.main(["convert", "merge-lora", "--model", str(run / "model"), "--out", str(out)]) == 0
        merged.append(load_file(str(out / "model.safetensors")))
    assert merged[0].keys() == merged[1].keys() and all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])


def test_each_checkpoint_of_a_lora_run_loads_for_evaluation(lora_runs):
    whole, _ = lora_runs
    final = Engine.load(whole / "model", "cpu")
    ids, pixels = inputs(final)
    (_, first), (_, last) = checkpoint_engines(whole)
    with torch.inference_mode():
        logits = [engine.model(ids, pixel_values=pixels).logits for engine in (first, last, final)]
    assert torch.equal(logits[1], logits[2]) and not torch.equal(logits[0], logits[2])


def test_training_from_a_lora_model_starts_from_it_merged(world, plain_model_dir, plain_adapter_dir, tmp_path):
    lora_model_dir = with_own_adapter(plain_model_dir, plain_adapter_dir, tmp_path / "model")
    out = tmp_path / "next"
    assert cli.main(["train", "--stage", "sft", "--from", str(lora_model_dir), "--data", str(world / "train.jsonl"),
                     "--out", str(out), "--batch-size", "2", "--max-steps", "1", "--lr", "0",
                     "--set", "model.vision.freeze=true"]) == 0
    assert "LoRA adapter" in (out / "train.log").read_text() and not (out / "model" / "adapter").exists()
    engine = Engine.load(lora_model_dir, "cpu")
    ids, pixels = inputs(engine)
    with torch.inference_mode():
        expected = engine.model(ids, pixel_values=pixels).logits
        got = MiniMindVLM.from_pretrained(out / "model")(ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def exported(lora_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "export"
    assert cli.main(["convert", "export-hf", "--model", str(lora_model_dir), "--out", str(out)]) == 0
    return out


def peft_side(exported):
    """The export with its adapter, loaded the way a transformers + peft user would, minimind_v unimportable."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "minimind_v", None)  # any `import minimind_v...` now fails
        base = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
        return PeftModel.from_pretrained(base, exported / "adapter").eval()


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's, not ours
@pytest.mark.parametrize("n_images", [0, 1])
def test_peft_on_the_export_answers_as_our_engine_with_the_adapter(exported, lora_model_dir, n_images):
    assert sorted(p.name for p in (exported / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    engine = Engine.load(lora_model_dir, "cpu")
    images = [Image.new("RGB", (40, 40), (30, 30, 220))] * n_images
    messages = [{"role": "user", "content": "<image>\n" * n_images + "what color is it"}]
    ours = engine.chat(messages, images, SamplingParams(max_new_tokens=12))
    prompt = build_prompt(engine.tokenizer, messages, engine.config.image_token_id, engine.config.image_token_len)
    ids = torch.tensor([prompt])
    pixels = engine.encode_images(images) if images else None
    model = peft_side(exported)
    assert model.peft_config["default"].r == 4
    with pytest.MonkeyPatch.context() as patch, torch.inference_mode():
        patch.setitem(sys.modules, "minimind_v", None)
        logits = model(input_ids=ids, pixel_values=pixels).logits
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             max_new_tokens=12, do_sample=False)
    with torch.inference_mode():
        torch.testing.assert_close(logits, engine.model(ids, pixel_values=pixels).logits, atol=1e-5, rtol=0)
    new = out[0, len(prompt):].tolist()
    if ours.finish_reason == "stop":  # transformers keeps the stop token it ended on; ours does not
        new = new[:-1]
    assert new == ours.token_ids and len(set(new)) > 3
    assert hasattr(engine.model.lm.layers[0].attn.q_proj, "lora_A")  # the engine applied the directory's adapter


def test_import_hf_brings_the_adapter_back(exported, lora_model_dir, tmp_path):
    back = tmp_path / "back"
    assert cli.main(["convert", "import-hf", "--src", str(exported), "--out", str(back)]) == 0
    assert (back / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (lora_model_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    messages = [{"role": "user", "content": "a red square"}]
    params = SamplingParams(max_new_tokens=10)
    assert Engine.load(back, "cpu").chat(messages, [], params).token_ids == \
        Engine.load(lora_model_dir, "cpu").chat(messages, [], params).token_ids


def test_exporting_a_plain_model_leaves_no_adapter_behind(tiny_model_dir, exported, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(exported, out)
    assert cli.main(["convert", "export-hf", "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    assert not (out / "adapter").exists()


def test_lora_flags_no_run_can_use_are_refused(world, tiny_model_dir, tmp_path, capsys):
    for flags, reason in ((["--lora-targets", "q_proj,wq"], "--lora-targets 'q_proj,wq': expected some of q_proj"),
                          (["--lora-dropout", "1"], "--lora-dropout 1.0: must be at least 0 and below 1"),
                          (["--lora-rank", "0", "--lora-tokens", "red"], "--lora-tokens 'red': retrains embedding "
                                                                         "rows of a LoRA adapter; give --lora-rank"),
                          (["--lora-rank", "0", "--freeze", "adapter"], "--freeze adapter: trains a LoRA adapter "
                                                                        "alone; give --lora-rank"),
                          (["--lora-plus", "0"], "--lora-plus 0.0: must be positive"),
                          (["--lora-rank", "0", "--lora-plus", "16"], "--lora-plus 16.0: scales a LoRA adapter's "
                                                                      "rate; give --lora-rank")):
        capsys.readouterr()
        assert lora_train(world, tiny_model_dir, tmp_path / "run", *flags) == 2
        assert reason in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["chat", "web", "serve", "eval"])
def test_every_inference_command_takes_an_adapter(command, capsys):
    assert cli.main([command, "--help"]) == 0
    assert "--adapter ADAPTER" in capsys.readouterr().out
