"""What kind of mistake a quickstart model makes on the relation questions ("Is A above B?" -> "top, middle: yes").

    python scripts/relation_misses.py RUN      # RUN: an OUT of scripts/quickstart_variant.py (its model/, order/before/)

Each wrong answer is sorted by its two lookups: swapped (B's line given first, then A's), first wrong, second
wrong, both wrong, or the verdict only; counted per type and language. docs/experiments.md ("The quickstart on a
fast day") has the figures.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

from minimind_v.evaluate import evaluate


def lookups(answer: str) -> list[str]:
    """"top, middle: yes" / "上行、中行：是" -> ["top", "middle"]."""
    found = answer.replace("：", ":").replace("、", ",").split(":")[0]
    return [part.strip() for part in found.split(",")]


def kind(reference: str, prediction: str) -> str:
    want, got = lookups(reference), lookups(prediction)
    if got == want:
        return "verdict only"
    if got == want[::-1]:
        return "swapped"
    if len(got) == len(want) == 2:
        return {(False, True): "first wrong", (True, False): "second wrong"}.get(
            (got[0] == want[0], got[1] == want[1]), "both wrong")
    return "both wrong"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="An OUT of scripts/quickstart_variant.py.")
    run = p.parse_args().run
    data = run / "order" / "before" / "test.jsonl"
    if not (run / "model").is_dir() or not data.is_file():
        sys.exit(f"{run}: not a quickstart_variant.py OUT (needs model/ and {data.relative_to(run)})")
    _, items = evaluate(run / "model", data)
    asked: collections.Counter[tuple[str, str]] = collections.Counter()
    missed: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for item in items:
        if item.type not in ("left_of", "above"):
            continue
        lang = "zh" if "：" in item.reference else "en"
        asked[item.type, lang] += 1
        if item.prediction != item.reference:
            missed[item.type, lang, kind(item.reference, item.prediction)] += 1
    for (qtype, lang), n in sorted(asked.items()):
        wrong = {k: v for (t, la, k), v in missed.items() if (t, la) == (qtype, lang)}
        print(f"{qtype:8} {lang}: {n - sum(wrong.values())}/{n} right; misses {dict(sorted(wrong.items()))}")


if __name__ == "__main__":
    main()
