"""`minimind-v eval`: scoring by hand-made predictions, and the command end to end on a tiny random model."""

import json

import pytest

from minimind_v import cli
from minimind_v.data.images import load_image
from minimind_v.data.synth import SynthOptions, write_dataset
from minimind_v.evaluate import Item, normalise, score
from minimind_v.infer.engine import Engine, SamplingParams


def test_score_per_type_short_and_long_with_known_answers():
    items = [
        Item(0, "color", "red", prediction="red"),
        Item(1, "color", "blue", prediction=" blue. "),  # whitespace and a trailing period are forgiven
        Item(2, "color", "green", prediction="Green"),  # case is not
        Item(3, "count", "3", prediction="three"),
        Item(4, "describe", "top: big red circle.", prediction="top: big red circle"),
        Item(5, "describe", "左上：小红色圆形。", prediction="左上：小蓝色圆形。"),
        Item(6, "count", None, prediction="2"),  # blank reference: answered, not scored
        Item(7, "shape", "circle", error="bad_image: cannot decode"),  # could not be asked: an error, not a score
    ]
    report = score(items)
    assert (report["samples"], report["scored"], report["unscored"], report["errors"]) == (8, 6, 1, 1)
    assert report["by_type"]["color"] == {"exact_match": round(2 / 3, 4), "correct": 2, "n": 3}
    assert report["by_type"]["count"] == {"exact_match": 0.0, "correct": 0, "n": 1}
    assert report["by_type"]["describe"]["correct"] == 1
    assert "shape" not in report["by_type"]
    assert report["short"] == {"exact_match": 0.5, "correct": 2, "n": 4}
    assert report["long"] == {"exact_match": 0.5, "correct": 1, "n": 2}
    assert report["exact_match"] == 0.5


def test_untyped_data_is_split_by_reference_length():
    items = [Item(0, "untyped", "yes", prediction="yes"),
             Item(1, "untyped", "a cat sitting on a red mat", prediction="a cat"),
             Item(2, "untyped", "一只猫坐在红色的垫子上面", prediction="一只猫坐在红色的垫子上面")]
    report = score(items)
    assert report["short"]["n"] == 1 and report["long"]["n"] == 2 and report["long"]["correct"] == 1


def test_normalise_is_trivial():
    assert normalise("  yes.\n") == "yes" and normalise("是。") == "是"
    assert normalise("Yes") != normalise("yes") and normalise("top  left") != normalise("top left")


def _blank_answers(path, lines_to_blank):
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for i in lines_to_blank:
        rows[i]["conversations"][1]["content"] = ""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_eval_command_answers_first_turns_and_indexes_lines(tmp_path, tiny_model_dir, capsys, fmt):
    data = write_dataset(SynthOptions(out=str(tmp_path / "d"), n=7, seed=3, split="test", lang="mix",
                                      format=fmt, image_size=48))
    if fmt == "jsonl":
        rows = _blank_answers(data, [1, 4])
    else:
        import pyarrow.parquet as pq
        rows = [dict(r, conversations=json.loads(r["conversations"])) for r in pq.read_table(data).to_pylist()]
    predictions = tmp_path / "pred.jsonl"
    argv = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--predictions", str(predictions),
            "--batch-size", "3", "--max-new-tokens", "6"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    written = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    assert [w["index"] for w in written] == list(range(7))
    blank = [i for i, r in enumerate(rows) if not r["conversations"][1]["content"]]
    assert report["scored"] == 7 - len(blank) and report["unscored"] == len(blank)
    assert set(report["by_type"]) == {r["type"] for i, r in enumerate(rows) if i not in blank}
    hits = sum(normalise(w["prediction"]) == normalise(rows[w["index"]]["conversations"][1]["content"])
               for w in written if w["index"] not in blank)
    assert report["by_type"] and sum(t["correct"] for t in report["by_type"].values()) == hits

    # Each prediction is what the engine says to the first user turn alone, whatever the later turns.
    engine = Engine.load(tiny_model_dir, "cpu")
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    for w in written[:3]:
        row = rows[w["index"]]
        image = load_image(data.parent / "images" / row["image"]) if fmt == "jsonl" else load_image(row["image_bytes"])
        expected = engine.chat(row["conversations"][:1], [image], params).text
        assert w["prediction"] == expected


def test_eval_limit_and_bad_flags(tmp_path, tiny_model_dir, capsys):
    data = write_dataset(SynthOptions(out=str(tmp_path / "d"), n=5, seed=1, split="test", image_size=48))
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--limit", "2",
                     "--max-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 2
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--limit", "0"]) == 2
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2


def test_eval_where_nothing_can_be_asked_exits_2_with_one_line(tmp_path, tiny_model_dir, capsys):
    data = write_dataset(SynthOptions(out=str(tmp_path / "d"), n=4, seed=3, split="test", image_size=48))
    for image in (tmp_path / "d" / "images").iterdir():
        image.unlink()
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--device", "cpu"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    assert f"{data}: none of its 4 sample(s) could be asked" in out.err and "not found" in out.err


def test_eval_on_a_missing_gpu_is_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = write_dataset(SynthOptions(out=str(tmp_path / "d"), n=2, seed=3, split="test", image_size=48))
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err


def test_a_prompt_too_long_for_the_model_is_one_samples_error(tmp_path, tiny_model_dir, capsys):
    rows = [{"conversations": [{"role": "user", "content": "red " * 3000}, {"role": "assistant", "content": "x"}]},
            {"conversations": [{"role": "user", "content": "what color"}, {"role": "assistant", "content": "red"}]}]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert (report["errors"], report["scored"]) == (1, 1) and "positions" in captured.err
