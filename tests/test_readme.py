"""The README's sections 3-5 (chat, serve, convert) run as written, in order, against a quickstart-size model.

The working directory holds what `make quickstart` leaves there: runs/quickstart/model and held-out images
under runs/quickstart/data/test/images/. Servers get a free port instead of 7860/8000 (the test machine
may use those); the commands that need the Hugging Face Hub (download, and import-upstream of what it
downloads) are the only ones not run, and are named so that a new one cannot slip in unrun.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from minimind_v import cli

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS_THE_HUB = ("minimind-v download", "minimind-v convert import-upstream")
LONG_RUNNING = ("minimind-v web", "minimind-v serve")
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tour_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block from "### 3. Chat" to the next "## " heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index("### 3. Chat")
    end = text.index("\n## ", start)
    return re.findall(r"```(bash|python)\n(.*?)```", text[start:end], flags=re.S)


def commands(code: str) -> list[str]:
    """Shell lines of a bash block: continuations joined, trailing comments dropped."""
    joined = code.replace("\\\n", " ")
    return [shlex.join(shlex.split(line, comments=True)) for line in joined.splitlines()
            if shlex.split(line, comments=True)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(process: subprocess.Popen, port: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listened on port {port}")


@pytest.fixture
def quickstart_dir(tmp_path, tiny_model_dir, monkeypatch):
    shutil.copytree(tiny_model_dir, tmp_path / "runs" / "quickstart" / "model")
    images = tmp_path / "runs" / "quickstart" / "data" / "test" / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (48, 48), (220, 30, 30)).save(images / "test_000000.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_tour_runs_as_written(quickstart_dir):
    blocks = tour_blocks()
    assert [lang for lang, _ in blocks].count("python") >= 3
    servers: list[subprocess.Popen] = []
    ran: list[str] = []
    try:
        for lang, code in blocks:
            if lang == "python":
                port = next((p for name, p in ran if name.startswith("minimind-v serve")), None)
                exec(compile(code.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), "README.md", "exec"), {})
                continue
            for line in commands(code):
                if line.startswith(NEEDS_THE_HUB):
                    continue
                argv = shlex.split(line)
                assert argv[0] == "minimind-v", line
                if line.startswith(LONG_RUNNING):
                    port = free_port()
                    server = subprocess.Popen([sys.executable, "-m", "minimind_v.cli", *argv[1:], "--port", str(port)],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                              env=CHILD_ENV)
                    servers.append(server)
                    wait_for_port(server, port)
                    ran.append((line, port))
                elif "--prompt" not in argv and argv[1] == "chat":  # the interactive session: end it at once
                    done = subprocess.run([sys.executable, "-m", "minimind_v.cli", *argv[1:]], input="", text=True,
                                          capture_output=True, timeout=300, env=CHILD_ENV)
                    assert done.returncode == 0, done.stderr
                    ran.append((line, None))
                else:
                    assert cli.main(argv[1:]) == 0, line
                    ran.append((line, None))
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
    names = [" ".join(line.split()[:3]) for line, _ in ran]
    for expected in ("minimind-v chat --model", "minimind-v web --model", "minimind-v serve --model",
                     "minimind-v convert export-hf", "minimind-v convert import-hf"):
        assert expected in names, names
    assert (quickstart_dir / "models" / "back" / "model.safetensors").is_file()
