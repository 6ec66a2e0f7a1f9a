"""Exact match through the OpenAI API with the image part before the text and after it, on the same questions.

Starts `minimind-v serve` for MODEL on a free loopback port, asks every first question of DATA (a synth
jsonl with its images/ folder) twice with the official `openai` client at temperature 0, once as
[image, text] and once as [text, image], and prints both accuracies (short answers and descriptions apart).

    python scripts/api_order.py runs/quickstart/model T/test.jsonl --limit 400
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from openai import OpenAI

from minimind_v.data.synth import LONG_TYPES
from minimind_v.evaluate import normalise


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--limit", type=int, default=400)
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines()][:args.limit]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "minimind_v.cli", "serve", "--model", args.model,
                               "--port", str(port)], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        name = _wait(client, server)
        results = {"image first": {"short": [], "long": []}, "text first": {"short": [], "long": []}}
        for row in rows:
            question = row["conversations"][0]["content"].replace("<image>", "").strip()
            reference = row["conversations"][1]["content"]
            image = base64.b64encode((Path(args.data).parent / "images" / row["image"]).read_bytes()).decode()
            parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                     {"type": "text", "text": question}]
            kind = "long" if row["type"] in LONG_TYPES else "short"
            for order, content in (("image first", parts), ("text first", parts[::-1])):
                reply = client.chat.completions.create(model=name, temperature=0, max_tokens=128,
                                                       messages=[{"role": "user", "content": content}])
                results[order][kind].append(normalise(reply.choices[0].message.content) == normalise(reference))
    finally:
        server.terminate()
        server.wait(timeout=30)
    for order, kinds in results.items():
        shown = ", ".join(f"{kind} {100 * sum(hits) / len(hits):.1f}% ({sum(hits)}/{len(hits)})"
                          for kind, hits in kinds.items() if hits)
        print(f"{order}: {shown}")


def _wait(client: OpenAI, server: subprocess.Popen) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit("the server exited")
        try:
            return client.models.list().data[0].id
        except Exception:  # noqa: BLE001 (not up yet)
            time.sleep(0.5)
    sys.exit("the server did not start")


if __name__ == "__main__":
    main()
