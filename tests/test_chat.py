"""`minimind-v chat`: one-shot, JSON, the interactive session in a real pseudo-terminal, and user mistakes."""

from __future__ import annotations

import json
import os
import sys

import pexpect
import pytest
from PIL import Image

from minimind_v import cli
from minimind_v.infer.engine import Engine, SamplingParams
from test_3v_template import think_model_dir  # noqa: F401 (a fixture)

GREEDY = SamplingParams(max_new_tokens=10)
CLI = [sys.executable, "-m", "minimind_v.cli", "chat"]
# One thread: a tiny model gains nothing from more, and the machines running the tests are shared.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("images") / "red.png"
    Image.new("RGB", (48, 40), (220, 20, 20)).save(path)
    return str(path)


def as_typed(text: str) -> str:
    """What a terminal shows for printed text (the pty turns \\n into \\r\\n)."""
    return text.replace("\n", "\r\n")


def asker(child: pexpect.spawn):
    """Send a line to the session; the model's answer as the terminal shows it."""

    def ask(line: str) -> str:
        child.sendline(line)
        child.expect_exact(as_typed(line + "\n") + "model> ")
        child.expect_exact("\r\nyou> ")
        return child.before
    return ask


def test_one_shot_json_is_the_engines_answer(tiny_model_dir, picture, engine, capsys):
    argv = ["chat", "--model", str(tiny_model_dir), "--image", picture, "--prompt", "what color", "--greedy",
            "--max-new-tokens", "10", "--json"]
    assert cli.main(argv) == 0
    answer = json.loads(capsys.readouterr().out)
    direct = engine.chat([{"role": "user", "content": "<image>\nwhat color"}], [Image.open(picture)], GREEDY)
    assert answer == {"text": direct.text, "finish_reason": direct.finish_reason,
                      "prompt_tokens": direct.prompt_tokens, "completion_tokens": direct.completion_tokens}


def test_one_shot_prints_the_answer(tiny_model_dir, engine, capsys):
    argv = ["chat", "--model", str(tiny_model_dir), "--prompt", "a blue circle", "--greedy", "--max-new-tokens", "10"]
    assert cli.main(argv) == 0
    direct = engine.chat([{"role": "user", "content": "a blue circle"}], [], GREEDY)
    assert capsys.readouterr().out == direct.text + "\n"


def test_interactive_session_feeds_history_and_images_back(tiny_model_dir, picture, engine):
    child = pexpect.spawn(CLI[0], [*CLI[1:], "--model", str(tiny_model_dir), "--greedy", "--max-new-tokens", "10"],
                          encoding="utf-8", timeout=300, env=CHILD_ENV)

    ask = asker(child)

    child.expect_exact("you> ")
    child.sendline(f"/image {picture}")
    child.expect_exact("you> ")
    first = ask("what color")
    second = ask("and its shape?")
    child.sendline("/reset")
    child.expect_exact("you> ")
    fresh = ask("and its shape?")
    child.sendline("/image /no/such/file.png")
    child.expect_exact("error: ")
    child.expect_exact("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    turn1 = {"role": "user", "content": "<image>\nwhat color"}
    reply1 = engine.chat([turn1], [Image.open(picture)], GREEDY).text
    turn2 = {"role": "user", "content": "and its shape?"}
    reply2 = engine.chat([turn1, {"role": "assistant", "content": reply1}, turn2], [Image.open(picture)], GREEDY).text
    assert first == as_typed(reply1)
    assert second == as_typed(reply2)
    assert fresh == as_typed(engine.chat([turn2], [], GREEDY).text)
    assert second != fresh  # the history and the image really changed the answer


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--image", "/no/such/picture.png"], "picture.png"),
])
def test_user_mistakes_are_one_line_errors(tiny_model_dir, args, message, capsys):
    assert cli.main(["chat", "--model", str(tiny_model_dir), "--prompt", "hi", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def blue_picture(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("images") / "blue.png"
    Image.new("RGB", (40, 48), (20, 20, 230)).save(path)
    return str(path)


def test_a_marker_typed_in_the_prompt_places_the_image(tiny_model_dir, picture, engine, capsys):
    for prompt in ("<image>\nwhat color", "what color\n<image>"):
        argv = ["chat", "--model", str(tiny_model_dir), "--image", picture, "--prompt", prompt, "--greedy",
                "--max-new-tokens", "10", "--json"]
        assert cli.main(argv) == 0
        answer = json.loads(capsys.readouterr().out)
        direct = engine.chat([{"role": "user", "content": prompt}], [Image.open(picture)], GREEDY)
        assert answer["text"] == direct.text and answer["prompt_tokens"] == direct.prompt_tokens
    argv = ["chat", "--model", str(tiny_model_dir), "--image", picture, "--prompt", "<image><image> two?"]
    assert cli.main(argv) == 2
    assert "2 <image> marker(s) for 1 image(s)" in capsys.readouterr().err


def test_new_image_starts_a_new_conversation_and_reset_keeps_the_command_line_image(
        tiny_model_dir, picture, blue_picture, engine):
    child = pexpect.spawn(CLI[0], [*CLI[1:], "--model", str(tiny_model_dir), "--image", picture, "--greedy",
                                   "--max-new-tokens", "10"], encoding="utf-8", timeout=300, env=CHILD_ENV)

    ask = asker(child)

    child.expect_exact("you> ")
    first = ask("what color")
    ask("and its shape?")
    child.sendline(f"/image {blue_picture}")
    child.expect_exact("(new conversation: the history is cleared")
    child.expect_exact("you> ")
    switched = ask("what color")
    child.sendline("/reset")
    child.expect_exact("the 1 --image image(s) go with your next message)")
    child.expect_exact("you> ")
    again = ask("what color")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    question = {"role": "user", "content": "<image>\nwhat color"}
    assert first == again == as_typed(engine.chat([question], [Image.open(picture)], GREEDY).text)
    assert switched == as_typed(engine.chat([question], [Image.open(blue_picture)], GREEDY).text)
    assert switched != first  # the new image, alone, is what the answer is about


def test_open_thinking_flag_reaches_the_prompt(think_model_dir, capsys):
    engine = Engine.load(think_model_dir, device="cpu")
    question = [{"role": "user", "content": "what color"}]
    answers = {}
    for flag, open_thinking in (("--open-thinking", True), ("--no-open-thinking", False)):
        argv = ["chat", "--model", str(think_model_dir), "--prompt", "what color", "--greedy", "--max-new-tokens", "10",
                "--json", flag]
        assert cli.main(argv) == 0
        answers[open_thinking] = json.loads(capsys.readouterr().out)
        direct = engine.chat(question, [], GREEDY, open_thinking=open_thinking)
        assert (answers[open_thinking]["text"], answers[open_thinking]["prompt_tokens"]) == (direct.text,
                                                                                            direct.prompt_tokens)
    assert answers[True]["prompt_tokens"] == len(engine.prompt(question, 0, open_thinking=True))
    assert answers[True]["prompt_tokens"] != answers[False]["prompt_tokens"]


def test_open_thinking_without_a_think_block_is_a_one_line_error(tiny_model_dir, capsys):
    assert cli.main(["chat", "--model", str(tiny_model_dir), "--prompt", "hi", "--open-thinking"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --open-thinking: ") and "no think block" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["chat", "--model", str(tiny_model_dir), "--prompt", "hi", "--no-open-thinking", "--greedy",
                     "--max-new-tokens", "2"]) == 0
