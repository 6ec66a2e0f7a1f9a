"""One quickstart run with recipe fields changed, then held-out exact match with the image before and after the text.

    python scripts/quickstart_variant.py OUT [seed=N] [minutes=M] [FIELD=VALUE ...]   # FIELD: a quickstart.Recipe field
    python scripts/quickstart_variant.py runs/e1 image_place=mixed layers=3

The evaluation sets are 2,000 first questions about unseen scenes (seed 99, English and Chinese mixed), written
with `synth --image-place before` and `after`: the same questions, the marker moved. Results go to
OUT/order.json and are printed; docs/experiments.md records the runs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path

from minimind_v.data.synth import SynthOptions, write_dataset
from minimind_v.evaluate import evaluate
from minimind_v.options import parse_value
from minimind_v.quickstart import QuickstartOptions, Recipe, main


def run(out: Path, settings: dict[str, typing.Any]) -> dict[str, typing.Any]:
    seed, minutes = int(settings.pop("seed", 0)), float(settings.pop("minutes", 15.0))
    recipe = dataclasses.replace(Recipe(), **settings)
    assert main(QuickstartOptions(out=str(out), seed=seed, minutes=minutes, recipe=recipe)) == 0
    report = {"recipe": dataclasses.asdict(recipe), "seed": seed}
    for place in ("before", "after"):
        data = write_dataset(SynthOptions(out=str(out / "order" / place), n=2000, seed=99, split="test",
                                          lang="mix", kind="qa", max_turns=1, image_place=place))
        result, _ = evaluate(out / "model", data)
        report[place] = {"short": result["short"]["exact_match"], "long": result["long"]["exact_match"],
                         "by_type": {t: v["exact_match"] for t, v in result["by_type"].items()}}
        print(f"image {place} the text: short {result['short']['exact_match']:.3f}, "
              f"descriptions {result['long']['exact_match']:.3f}, by type {report[place]['by_type']}")
    (out / "order.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    out, *assignments = sys.argv[1:]
    run(Path(out), {k: parse_value(v) for k, v in (a.split("=", 1) for a in assignments)})
