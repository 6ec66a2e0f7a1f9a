"""What a new user trips over, each a one-line error (exit 2) before anything is built, written or lost."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from minimind_v import cli
from minimind_v.data.synth import SynthOptions, write_dataset

CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def one_line_error(capsys, *parts: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for part in parts:
        assert part in err, err
    return err


def test_data_that_is_a_directory_says_so_and_lists_its_files(tmp_path, tiny_model_dir, capsys):
    write_dataset(SynthOptions(out=str(tmp_path / "d"), n=2, split="test"))
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "d")]) == 2
    one_line_error(capsys, f"--data {tmp_path / 'd'}: a directory, not a data file", "its data files: test.jsonl")


@pytest.mark.parametrize("flag, value", [("--data", "no/such.jsonl"), ("--val-data", "no/val.jsonl"),
                                         ("--images", "no/such/folder")])
def test_train_checks_its_inputs_before_building_or_writing(tmp_path, tokenizer_dir, capsys, flag, value):
    data = write_dataset(SynthOptions(out=str(tmp_path / "d"), n=2))
    argv = ["train", "--stage", "sft", "--preset", "tiny", "--from", "none", "--tokenizer", str(tokenizer_dir),
            "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1"]
    argv = [*argv, flag, str(tmp_path / value)] if flag != "--data" else \
        [str(tmp_path / value) if a == str(data) else a for a in argv]
    assert cli.main(argv) == 2
    one_line_error(capsys, f"{flag} {tmp_path / value}")
    assert not (tmp_path / "run").exists()  # refused before anything was built: no train.log, nothing half-made


@pytest.mark.parametrize("flag, value, said", [("--length-buckets", "0", "--length-buckets 0: must be at least 1"),
                                               ("--save-minutes", "-1", "--save-minutes -1.0 / --save-every 0")])
def test_train_checks_its_run_settings_before_building_or_writing(tmp_path, tokenizer_dir, capsys, flag, value,
                                                                  said):
    data = write_dataset(SynthOptions(out=str(tmp_path / "d"), n=2))
    argv = ["train", "--stage", "sft", "--preset", "tiny", "--from", "none", "--tokenizer", str(tokenizer_dir),
            "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1", flag, value]
    assert cli.main(argv) == 2
    one_line_error(capsys, said)
    assert not (tmp_path / "run").exists()


def test_export_onto_an_existing_file_is_one_line(tmp_path, tiny_model_dir, capsys):
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert cli.main(["convert", "export-hf", "--model", str(tiny_model_dir), "--out", str(target)]) == 2
    one_line_error(capsys, f"--out {target}: {target} exists and is not a directory")
    assert target.read_text() == "keep me"


def test_model_directories_get_the_permissions_of_a_normal_write(tmp_path, tokenizer_dir):
    """umask 022: everyone may read what train, export-hf and import-hf write (atomic writes included)."""
    data = write_dataset(SynthOptions(out=str(tmp_path / "d"), n=8))
    old = os.umask(0o022)
    try:
        assert cli.main(["train", "--stage", "sft", "--preset", "tiny", "--from", "none", "--tokenizer",
                         str(tokenizer_dir), "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1",
                         "--batch-size", "4", "--set", "model.lm.hidden_size=32", "--set",
                         "model.lm.num_hidden_layers=1"]) == 0
        saved = tmp_path / "run" / "model"
        private = tmp_path / "hf" / ".git" / "config"  # exporting into a clone of a hub repo
        private.parent.mkdir(parents=True)
        private.write_text("[core]\n")
        private.chmod(0o600)
        assert cli.main(["convert", "export-hf", "--model", str(saved), "--out", str(tmp_path / "hf")]) == 0
        assert cli.main(["convert", "import-hf", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600  # what the export did not write keeps its modes
    for root in ("run/model", "hf", "back"):
        paths = [p for p in [tmp_path / root, *(tmp_path / root).rglob("*")] if ".git" not in p.parts]
        assert any(p.name == "model.safetensors" for p in paths)
        for path in paths:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_from_pretrained_is_ready_for_inference(tiny_model_dir):
    from minimind_v.modeldir import MiniMindVLM

    model = MiniMindVLM.from_pretrained(tiny_model_dir)
    assert not model.training and not any(m.training for m in model.modules())


def test_engine_inputs_are_what_the_engine_answers_from(tiny_model_dir):
    import torch
    from PIL import Image

    from minimind_v import Engine, SamplingParams

    engine = Engine.load(tiny_model_dir, device="cpu")
    image = Image.new("RGB", (40, 30), (20, 200, 20))
    messages = [{"role": "user", "content": "what color\n<image>"}]
    input_ids, pixel_values = engine.inputs(messages, [image])
    cfg = engine.config
    assert input_ids.shape[0] == 1 and int((input_ids == cfg.image_token_id).sum()) == cfg.image_token_len
    with torch.inference_mode():
        first = int(engine.model(input_ids, pixel_values=pixel_values).logits[0, -1].argmax())
    assert engine.chat(messages, [image], SamplingParams(max_new_tokens=1)).token_ids[:1] in ([first], [])


def _taken_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("command", ["serve", "web"])
def test_a_taken_port_is_one_line_before_the_model_loads(command, tiny_model_dir):
    with _taken_port() as sock:
        port = sock.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "minimind_v.cli", command, "--model", "/no/model/needed",
                                 "--port", str(port)], capture_output=True, text=True, timeout=120, env=CHILD_ENV)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: --port {port}: already in use on 127.0.0.1 (another server? choose " \
                                    "another --port)"


def test_download_without_the_hub_fails_fast_and_names_the_cause(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as sock:  # a port that refuses connections: the Hub "down"
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed}")
    started = time.monotonic()
    assert cli.main(["download", "--what", "llm", "--out", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys, f"http://127.0.0.1:{closed} cannot be reached", "llm_512.pth")
    assert "HF_HUB_OFFLINE" not in err and constants.HF_HUB_OFFLINE is False
    assert time.monotonic() - started < 15  # huggingface_hub alone retries for ~24 s


def test_web_page_title_names_the_run_not_the_model_folder(monkeypatch, tmp_path, tiny_model_dir):
    import shutil

    from minimind_v.infer import web

    model_dir = tmp_path / "runs" / "quickstart" / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    titles: list[str] = []

    class Page:
        def queue(self, **_):
            return self

        def launch(self, **_):
            return None

    monkeypatch.setattr(web, "build_app", lambda engine, title: titles.append(title) or Page())
    port = _taken_port()
    free = port.getsockname()[1]
    port.close()
    assert cli.main(["web", "--model", str(model_dir), "--port", str(free)]) == 0
    assert cli.main(["web", "--model", str(model_dir), "--port", str(free), "--served-model-name", "mine"]) == 0
    assert titles == ["minimind-v · quickstart", "minimind-v · mine"]
