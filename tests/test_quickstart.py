"""`minimind-v quickstart` end to end on a very small world and budget, and its guard rails."""

import json

import torch
from safetensors.torch import load_file

from minimind_v import cli
from minimind_v.modeldir import MiniMindVLM
from minimind_v.quickstart import QuickstartOptions, Recipe, main, prepare_out
from minimind_v.train import budget
from minimind_v.train.budget import steps_for


def test_quickstart_runs_end_to_end_and_writes_a_model(tmp_path, capsys):
    out = tmp_path / "qs"
    recipe = Recipe(qa_samples=24, tower_samples=16, test_samples=12, curve_samples=6, batch_size=8,
                    checkpoints=1, vocab_size=400, tower_steps=5)
    threads = torch.get_num_threads()
    assert main(QuickstartOptions(out=str(out), minutes=0.3, seed=1, recipe=recipe)) == 0
    assert torch.get_num_threads() == threads  # the run's thread choice does not leak out

    model = MiniMindVLM.from_pretrained(out / "model")
    assert model.cfg.image_token_len == model.cfg.vision.num_patches
    # The tower was pretrained on its own, saved as a Hugging Face tower, stayed frozen in training, and
    # travels inside the final model (the trainer's model references OUT/vision).
    assert model.cfg.vision.freeze and model.cfg.vision.name_or_path == "vision"
    assert json.loads((out / "sft" / "model" / "config.json").read_text())["vision"]["name_or_path"] == str(
        (out / "vision").resolve())
    tower = load_file(out / "model" / "vision" / "model.safetensors")
    reference = load_file(out / "vision" / "model.safetensors")
    assert tower.keys() == reference.keys() and all(torch.equal(tower[k], reference[k]) for k in tower)
    assert model.cfg.lm.num_hidden_layers == recipe.layers
    assert recipe.qk_norm and model.cfg.lm.qk_norm and model.lm.layers[0].attn.q_norm is not None  # the recipe's choice reaches the model
    assert recipe.images_first and model.cfg.images_first
    summary = json.loads((out / "quickstart.json").read_text(encoding="utf-8"))
    assert summary["tower"]["steps"] == 5
    assert set(summary["tower"]["held_out_accuracy"]) == {"color", "shape", "size", "color_shape", "cell"}
    assert summary["training"]["name"] == "sft" and summary["training"]["steps"] >= 1
    assert 0 < summary["plan"]["shape"]["supervised"] < 1 and summary["plan"]["step_s"] > 0
    assert summary["eval"]["scored"] == 12 and summary["eval"]["by_type"]
    curve = json.loads((out / "accuracy.json").read_text())
    assert [p["stage"] for p in curve] == ["sft", "final"]
    assert all(0 <= p["minutes"] <= summary["minutes"] + 0.01 for p in curve)
    for name in ("accuracy.png", "loss.png", "eval.json", "predictions.jsonl"):
        assert (out / name).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "held-out exact match" in printed and str(out / "model") in printed

    # A later run may replace this directory: it carries the quickstart marker.
    prepare_out(out)
    assert [p.name for p in out.iterdir()] == ["quickstart.json"]


def test_quickstart_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    assert cli.main(["quickstart", "--out", str(tmp_path), "--minutes", "1"]) == 2
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert cli.main(["quickstart", "--out", str(tmp_path / "new"), "--minutes", "0"]) == 2


def test_step_budget_shrinks_with_a_slower_machine():
    fast, slow = steps_for(600, 0.25, 20), steps_for(600, 0.75, 20)
    assert fast == 2320 and slow == 773
    assert steps_for(10, 5.0, 30) == 1  # never zero: a stage always trains at least one step


def test_thread_choice_survives_a_moment_of_contention(monkeypatch):
    # Round by round, in turn 1 thread then 2: the first 2-thread timing is slowed by another process.
    timings = iter([0.50, 0.90, 0.50, 0.30, 0.50, 0.30])
    seen = []

    def fake_step(cfg, batch_size, seq_len, supervised):
        assert supervised == 0.25
        seen.append(torch.get_num_threads())
        return next(timings)

    monkeypatch.setattr(budget, "time_one_step", fake_step)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert budget.fastest_threads(None, 8, 64, 0.25) == (2, 0.30)
        assert seen == [1, 2, 1, 2, 1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
