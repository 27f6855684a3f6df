"""`mmpr eval`: a model's accuracy on a recipe's correctness sources, reusing the pipeline.

It runs the same load -> sample -> score stages as a build (so the same prompts, engine and judge),
without pairing, twice: greedy (temperature 0, one sample) and sampled (the recipe's sampling).
Accuracy is reported per source and task family with a 95% Wilson interval over questions
(sampled accuracy averages each question's samples first, so questions weigh equally).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mmpr_pipeline import recipe as recipe_mod
from mmpr_pipeline import shards

log = logging.getLogger(__name__)


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound for small n and p near 0 or 1)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_table(run: Path) -> dict[str, dict[str, Any]]:
    """{"source/task": {questions, accuracy, ci95, pass_at_n}} (and "source/*" for the whole source).

    `pass_at_n` is the share of questions with at least one right sample (pass@n, n = samples per
    question): far above `accuracy` means the model's errors are ones it sometimes avoids.
    """
    per_group: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for path in shards.unit_files(run):
        for row in pq.read_table(
            path, columns=["source", "task", "pipeline", "correct", "error"]
        ).to_pylist():
            if row["pipeline"] != "correctness":
                continue
            q_acc = (
                (sum(row["correct"]) / len(row["correct"])) if row["correct"] else 0.0
            )  # errors count wrong
            q = (q_acc, any(row["correct"] or []))
            per_group[f"{row['source']}/{row['task'] or '-'}"].append(q)
            per_group[f"{row['source']}/*"].append(q)
    out = {}
    for key in sorted(per_group):
        accs = [a for a, _ in per_group[key]]
        lo, hi = wilson(sum(accs), len(accs))
        out[key] = dict(
            questions=len(accs),
            accuracy=round(sum(accs) / len(accs), 4),
            ci95=[round(lo, 4), round(hi, 4)],
            pass_at_n=round(sum(p for _, p in per_group[key]) / len(accs), 4),
        )
    return out


def evaluate(
    recipe: recipe_mod.Recipe, out: str | Path, *, modes=("greedy", "sampled"), ray_address: str | None = None
) -> dict[str, Any]:
    from mmpr_pipeline.pipeline import collect_samples
    from mmpr_pipeline.run_folder import prepare_run_dir
    from mmpr_pipeline.units import BuildStats

    out = Path(out)
    correctness = [s for s in recipe.sources if s.pipeline == "correctness"]
    if not correctness:
        raise recipe_mod.RecipeError(recipe.file, "sources", "eval needs at least one correctness source")
    base = dataclasses.replace(recipe, sources=correctness)
    results: dict[str, Any] = {"model": recipe.model, "recipe": recipe.name, "modes": {}}
    for mode in modes:
        sampling = (
            dataclasses.replace(recipe.sampling, n=1, temperature=0.0)
            if mode == "greedy"
            else recipe.sampling
        )
        r = dataclasses.replace(base, sampling=sampling)
        if (
            mode == "greedy"
        ):  # a source's own sampling may set its max_tokens, never greedy's n or temperature
            r.sources = [
                dataclasses.replace(s, sampling={**s.sampling, "n": 1, "temperature": 0.0})
                if s.sampling
                else s
                for s in r.sources
            ]
        run = out / mode
        prepare_run_dir(run, r, overwrite=True)  # same recipe: resumes; another model: starts over
        collect_samples(r, run, BuildStats.for_recipe(r), ray_address)
        results["modes"][mode] = dict(sampling=dataclasses.asdict(sampling), accuracy=accuracy_table(run))
    shards.write_json(out / "eval.json", results)
    print_table(results)
    return results


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    modes = list(results["modes"])
    table = Table(title=f"accuracy of {results['model']} ({results['recipe']})", title_justify="left")
    table.add_column("source/task")
    table.add_column("questions", justify="right")
    for m in modes:
        table.add_column(f"{m} (95% CI)", justify="right")
    keys = results["modes"][modes[0]]["accuracy"]
    for key in keys:
        cells = []
        for m in modes:
            a = results["modes"][m]["accuracy"].get(key)
            cells.append(f"{a['accuracy']:.1%} ({a['ci95'][0]:.0%}-{a['ci95'][1]:.0%})" if a else "-")
        table.add_row(key, str(keys[key]["questions"]), *cells)
    Console(width=None if Console().is_terminal else 140).print(table)


if __name__ == "__main__":  # python -m mmpr_pipeline.evaluate RUN_DIR: print a finished eval again
    import sys

    print_table(json.loads((Path(sys.argv[1]) / "eval.json").read_text()))
