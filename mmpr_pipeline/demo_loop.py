"""Close the loop on one machine: build pairs -> train with MPO (and SFT) -> measure the gain.

    python -m mmpr_pipeline.demo_loop --out runs/demo-loop      (make demo-loop)

1. build MMPR pairs with the loop's base policy, the demo model stopped at 120 steps
   (`demo_model.ensure_loop_base`, build/models/demo-loop-base; data_cards/demo_loop.yaml);
2. train one copy with MPO (weights 0.8/0.2/1.0) and one with SFT on the chosen responses only
   (weights 0/0/1), same data, steps and seed (data_cards/train_mpo.yaml + overrides);
3. evaluate base, SFT and MPO on the same held-out questions (data_cards/eval_heldout.yaml),
   greedy and sampled, through `mmpr eval`'s stages;
4. write report.md (a table and a plot) and report.json, with how long each step took.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path

from mmpr_pipeline import recipe as recipe_mod
from mmpr_pipeline import shards

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
CARDS = REPO / "data_cards"


# The loop's training on top of data_cards/train_mpo.yaml, for both runs, at the settings chosen on
# validation questions of the loop's own generator, never on its held-out test questions
# (benchmarks/demo_loop_ablation.py, results/demo_loop_ablation_sweep.json): lr 3e-4 was best for
# both SFT (89.5%) and MPO; at 1e-4 both stayed near 72%. One epoch; eval_every pinned.
LOOP_TRAIN = {"learning_rate": 3e-4, "eval_fraction": 0.1, "epochs": 1, "eval_every": 50}
# The two runs over LOOP_TRAIN: the MPO mix and SFT on the chosen responses only. MPO's best validated
# mix doubles the SFT term (78.9% against 74.9% for the paper's 0.8/0.2/1.0 at the same lr).
LOOP_RUNS = {"mpo": {"weights": [0.8, 0.2, 2.0]}, "sft": {"weights": [0.0, 0.0, 1.0]}}


@dataclasses.dataclass
class LoopSettings:
    build_limit: int | None = None  # questions to build pairs from (None: the recipe's)
    eval_limit: int | None = None  # held-out questions (None: the recipe's)
    eval_modes: tuple[str, ...] = ("greedy", "sampled")
    # MPOConfig keys for both runs (over LOOP_TRAIN)
    train_overrides: dict = dataclasses.field(default_factory=dict)
    sampling_n: int | None = None  # build: samples per question (None: the recipe's)
    build_overrides: dict = dataclasses.field(default_factory=dict)  # recipe keys, e.g. sampling.temperature
    # per run ("mpo", "sft"): MPOConfig keys over LOOP_RUNS[run] (None: LOOP_RUNS as they are)
    run_overrides: dict | None = None
    model: str | None = None  # base model folder (None: the demo model at 120 steps)


def build_pairs(out: Path, overrides: dict) -> dict:
    """The loop's pairs (data_cards/demo_loop.yaml with recipe `overrides`) built into `out`; the
    build's stats."""
    from mmpr_pipeline import pipeline

    return pipeline.build(recipe_mod.load(CARDS / "demo_loop.yaml", overrides), out)


def train_config(base: str, data: Path, output_dir: Path, overrides: dict):
    """The loop's training config: data_cards/train_mpo.yaml, LOOP_TRAIN, then `overrides`."""
    from mmpr_pipeline.train import load_config

    over = {"model": base, "data": str(data), "output_dir": str(output_dir), **LOOP_TRAIN, **overrides}
    return load_config(CARDS / "train_mpo.yaml", over)


def run_loop(out: str | Path, settings: LoopSettings | None = None) -> dict:
    settings = settings or LoopSettings()
    from mmpr_pipeline import demo_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    step = _timed_steps(timings)
    with step("demo model"):
        base = settings.model or str(demo_model.ensure_loop_base())
    with step("build pairs"):
        stats = build_pairs(out / "build", {**_build_overrides(base, settings), **settings.build_overrides})
    models = {"base": base, **_train_runs(out, base, settings, step)}
    results = _evaluate_models(out, models, settings, step)
    report = loop_report(stats, timings, results, settings)
    report["pair_analysis"] = pair_analysis(out / "build", LOOP_GENERATOR)
    shards.write_json(out / "report.json", report)
    write_report(out, report)
    return report


def _timed_steps(timings: dict[str, float]):
    """A context manager factory: step(name) logs the step and records its seconds in `timings`."""

    @contextlib.contextmanager
    def step(name):
        log.info("demo-loop: %s", name)
        t0 = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - t0, 1)

    return step


def _build_overrides(base: str, settings: LoopSettings) -> dict:
    """The recipe keys the loop's settings set for the build (before settings.build_overrides)."""
    build_over = {"model": base}
    if settings.build_limit:
        build_over["limit"] = settings.build_limit
    if settings.sampling_n:
        build_over["sampling.n"] = settings.sampling_n
    return build_over


def _train_runs(out: Path, base: str, settings: LoopSettings, step) -> dict[str, str]:
    """Train each of LOOP_RUNS from `base` on the built pairs; {run: its final model folder}."""
    from mmpr_pipeline.demo_model import one_thread
    from mmpr_pipeline.train import train

    models = {}
    for name, run in LOOP_RUNS.items():
        run = {**run, **(settings.run_overrides or {}).get(name, {}), **settings.train_overrides}
        cfg = train_config(base, out / "build", out / name, run)
        # One torch thread whatever the machine's cores: another thread count sums floats in another
        # order (make train's eval loss 1.4200444 on two threads, 1.4200446 on one), and a greedy
        # answer on the edge would then differ between machines.
        with step(f"train {name}"), one_thread():
            summary = train(cfg)
        models[name] = str(Path(cfg.output_dir) / "final")
        (out / f"{name}_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return models


def _evaluate_models(out: Path, models: dict[str, str], settings: LoopSettings, step) -> dict:
    """Each model's evaluation on data_cards/eval_heldout.yaml, in out/eval/<name>."""
    from mmpr_pipeline import evaluate

    eval_over = {"limit": settings.eval_limit} if settings.eval_limit else {}
    results = {}
    for name, path in models.items():
        with step(f"eval {name}"):
            rec = recipe_mod.load(CARDS / "eval_heldout.yaml", {**eval_over, "model": path})
            results[name] = evaluate.evaluate(rec, out / "eval" / name, modes=settings.eval_modes)
    return results


def loop_report(stats: dict, timings: dict, results: dict, settings: LoopSettings) -> dict:
    """report.json's figures (all but the pair analysis): the build's counts, each model's held-out
    accuracy overall and per task, and the gains between them."""
    report = dict(
        pairs=stats["totals"]["pairs"],
        questions=stats["totals"]["questions"],
        correct_rate=stats["sources"]["shapes"]["correct_rate"],
        timings_s=timings,
        accuracy={
            name: {m: r["modes"][m]["accuracy"]["heldout/*"] for m in settings.eval_modes}
            for name, r in results.items()
        },
        per_task={
            name: {m: r["modes"][m]["accuracy"] for m in settings.eval_modes} for name, r in results.items()
        },
        settings=dataclasses.asdict(settings),
    )
    if "sampled" in settings.eval_modes:
        report["eval_samples"] = results["base"]["modes"]["sampled"]["sampling"]["n"]
    report["comparisons"] = {
        f"{a} vs {b}": {
            m: gain(report["accuracy"][a][m], report["accuracy"][b][m]) for m in settings.eval_modes
        }
        for a, b in (("mpo", "base"), ("mpo", "sft"), ("sft", "base"))
    }
    report["mpo_vs_sft"] = mpo_vs_sft_line(report)
    return report


# The demo tasks' chains (mmpr_pipeline/tasks.py): "... In total there are K." (count) and "I count A
# circles and B squares. X is [not] more than Y." (compare), each then "Final answer: ...".
LOOP_GENERATOR = {"seed": 1, "families": ["count", "compare"]}  # data_cards/demo_loop.yaml's generator
_TOTAL = re.compile(r"In total there are (\d+)")
_ITEM = re.compile(r"\bone (\w+)")
_COUNTS = re.compile(r"I count (\d+) circles and (\d+) squares")
_VERDICT = re.compile(r"(\d+) is (not more|more) than (\d+)")
_FINAL = re.compile(r"(?i)final answer")


def split_final(text: str) -> tuple[str, str]:
    """(chain, final-answer line) of a response: the split is at its last "Final answer"."""
    at = [m.start() for m in _FINAL.finditer(text)]
    return (text[: at[-1]], text[at[-1] :]) if at else (text, "")


def chain_check(task: str, text: str, truth: str = "") -> dict:
    """What a demo chain says, read with the task's own phrasing: `contradicts` when the chain's
    conclusion (count: its total; compare: "is more" -> Yes) differs from the final answer it gives;
    `chain_sound` when the chain before the final answer is the reference chain `truth` word for word
    (the demo tasks have one right chain), or, without a reference, when its steps agree (count: as
    many "one X" as the total, every X the shape asked; compare: both sentences' numbers agree and
    the comparison is right). None for a chain the task's phrasing does not parse."""
    chain, final = split_final(text)
    final = final.split(":", 1)[-1].strip().rstrip(".").lower()
    counts, verdict, total = _COUNTS.search(chain), _VERDICT.search(chain), _TOTAL.findall(chain)
    if task == "count" and total:
        contradicts = total[-1] != final
        asked, _, items = chain.partition(":")
        shapes = _ITEM.findall(items)
        steps_agree = len(shapes) == int(total[-1]) and all(asked.endswith(f" {x}s") for x in shapes)
    elif task == "compare" and counts and verdict:
        a, b, x, y = int(counts[1]), int(counts[2]), int(verdict[1]), int(verdict[3])
        contradicts = ("yes" if verdict[2] == "more" else "no") != final
        steps_agree = (x, y) == (a, b) and (verdict[2] == "more") == (a > b)
    else:
        return {"contradicts": None, "chain_sound": None}
    sound = chain.split() == split_final(truth)[0].split() if truth else steps_agree
    return {"contradicts": contradicts, "chain_sound": sound}


def first_difference(chosen: str, rejected: str) -> str:
    """Where a pair's two chains part: "final answer only" (the same chain), or the first differing
    word's place in the chosen chain, by thirds."""
    a, b = split_final(chosen)[0].split(), split_final(rejected)[0].split()
    if a == b:
        return "final answer only"
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return ("chain, first third", "chain, second third", "chain, last third")[
        min(2, 3 * same // max(1, len(a)))
    ]


def pair_analysis(run_dir: str | Path, generator: dict | None = None) -> dict:
    """What the loop's correctness pairs teach: the share whose chains agree up to the final answer,
    where the chains first differ, and how many chosen chains contradict their own final answer or are
    unsound; by task. `generator`: the source's generator options, to read the reference chains of
    the questions (by row index) and check the chains' counts against the truth."""
    import pyarrow.parquet as pq

    from mmpr_pipeline import tasks

    run_dir = Path(run_dir)
    files = sorted((run_dir / "data").glob("*.parquet"))
    columns = ["qid", "task", "chosen", "rejected", "pair_type"]
    pairs = pq.read_table(files, columns=columns).to_pylist() if files else []
    truth: dict[str, str] = {}
    sample_files = sorted((run_dir / "samples").rglob("*.parquet"))
    if generator and sample_files:
        samples = pq.read_table(sample_files, columns=["qid", "row_index"])
        index = dict(zip(samples["qid"].to_pylist(), samples["row_index"].to_pylist()))
        opts = {k: v for k, v in generator.items() if k != "n"}
        rows = list(tasks.generate(max(index.values()) + 1, **opts)) if index else []
        truth = {q: rows[i]["response"] for q, i in index.items()}
    out: dict[str, dict] = {}
    for task in sorted({p["task"] for p in pairs if p["pair_type"] == "correctness"}) + ["*"]:
        mine = [p for p in pairs if p["pair_type"] == "correctness" and task in ("*", p["task"])]
        where: dict[str, int] = {}
        contra = unsound = unparsed = rejected_sound_chain = 0
        for p in mine:
            w = first_difference(p["chosen"], p["rejected"])
            where[w] = where.get(w, 0) + 1
            c = chain_check(p["task"], p["chosen"], truth.get(p["qid"], ""))
            contra += c["contradicts"] is True
            unparsed += c["contradicts"] is None
            unsound += not (c["chain_sound"] and c["contradicts"] is False)
            r = chain_check(p["task"], p["rejected"], truth.get(p["qid"], ""))
            rejected_sound_chain += bool(r["chain_sound"])
        n = max(1, len(mine))
        out[task] = dict(
            pairs=len(mine),
            chains_agree_to_final_answer=round(where.get("final answer only", 0) / n, 3),
            first_difference={k: round(v / n, 3) for k, v in sorted(where.items())},
            chosen_contradicts_final_answer=round(contra / n, 3),
            chosen_chain_unsound=round(unsound / n, 3),
            chosen_unparsed=round(unparsed / n, 3),
            rejected_chain_sound=round(rejected_sound_chain / n, 3),
        )
    return out


GOAL_OVER_SFT = 3.0  # points greedy, with disjoint 95% intervals (the loop's goal)


def mpo_vs_sft_line(report: dict) -> str:
    """The loop's answer in one line: MPO against SFT-on-chosen, per mode, and whether the goal
    (MPO >= SFT + 3 points greedy with disjoint 95% intervals) is met."""
    acc, by_mode = report["accuracy"], report["comparisons"]["mpo vs sft"]
    parts = [
        f"{m} {g['points']:+.1f} points ({acc['mpo'][m]['accuracy']:.1%} vs {acc['sft'][m]['accuracy']:.1%}, "
        f"{'95% intervals disjoint' if g['intervals_disjoint'] else 'intervals overlap'})"
        for m, g in by_mode.items()
    ]
    greedy = by_mode.get("greedy")
    met = bool(greedy) and greedy["points"] >= GOAL_OVER_SFT and greedy["intervals_disjoint"]
    return (
        f"mpo vs sft: {'; '.join(parts)}; goal (greedy >= +{GOAL_OVER_SFT:.0f}, disjoint) "
        f"{'met' if met else 'not met'}"
    )


def gain(a: dict, b: dict) -> dict:
    """Accuracy a minus b in points, and whether their 95% Wilson intervals are disjoint (a clear
    difference at these question counts) rather than overlapping (within noise)."""
    return dict(
        points=round(100 * (a["accuracy"] - b["accuracy"]), 1),
        intervals_disjoint=a["ci95"][0] > b["ci95"][1] or b["ci95"][0] > a["ci95"][1],
    )


def write_report(out: Path, report: dict) -> Path:
    """report.md and accuracy.png in `out`: base, SFT and MPO accuracy per evaluation mode."""
    modes = list(next(iter(report["accuracy"].values())))
    names = list(report["accuracy"])
    plot_accuracy(out / "accuracy.png", report, names, modes)
    return shards.write_text(out / "report.md", "\n".join(report_lines(report, names, modes)))


def plot_accuracy(path: Path, report: dict, names: list[str], modes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        accs = [report["accuracy"][n][mode]["accuracy"] for n in names]
        errs = [
            [a - report["accuracy"][n][mode]["ci95"][0] for a, n in zip(accs, names)],
            [report["accuracy"][n][mode]["ci95"][1] - a for a, n in zip(accs, names)],
        ]
        ax.bar([i + j * width for i in range(len(names))], accs, width, yerr=errs, capsize=3, label=mode)
    ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(names))], names)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("demo model: base vs SFT-on-chosen vs MPO")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report_lines(report: dict, names: list[str], modes: list[str]) -> list[str]:
    sampled = "sampled" in modes
    lines = [
        "# Demo loop: MMPR pairs + MPO on the demo model",
        "",
        *([report["mpo_vs_sft"], ""] if "mpo_vs_sft" in report else []),
        f"Pairs built: {' + '.join(f'{v:,} {k}' for k, v in report['pairs'].items() if v)} from "
        f"{report['questions']} questions "
        f"(sampled correct rate {report['correct_rate']:.1%}).",
        "",
        "| model | "
        + " | ".join(f"{m} accuracy (95% CI)" for m in modes)
        + (f" | pass@{report.get('eval_samples', 'n')}" if sampled else "")
        + " | questions |",
        "| --- | " + " | ".join("---" for _ in modes) + (" | ---" if sampled else "") + " | --- |",
    ]
    for n in names:
        cells = [
            f"{report['accuracy'][n][m]['accuracy']:.1%} ({report['accuracy'][n][m]['ci95'][0]:.1%}-"
            f"{report['accuracy'][n][m]['ci95'][1]:.1%})"
            for m in modes
        ]
        if sampled:
            cells.append(f"{report['accuracy'][n]['sampled']['pass_at_n']:.1%}")
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {report['accuracy'][n][modes[0]]['questions']} |")
    tasks = [
        k for k in report.get("per_task", {}).get(names[0], {}).get(modes[0], {}) if not k.endswith("/*")
    ]
    if tasks:  # per task family: where the gain (or the loss) comes from
        lines += [
            "",
            f"{modes[0]} accuracy per task: "
            + "; ".join(
                f"{t.split('/')[-1]} "
                + ", ".join(f"{n} {report['per_task'][n][modes[0]][t]['accuracy']:.1%}" for n in names)
                for t in tasks
            ),
        ]
    lines.append("")
    for pair, by_mode in report.get("comparisons", {}).items():
        lines.append(
            f"- {pair}: "
            + "; ".join(
                f"{m} {g['points']:+.1f} points "
                f"({'95% intervals disjoint' if g['intervals_disjoint'] else 'intervals overlap'})"
                for m, g in by_mode.items()
            )
        )
    lines += [
        "",
        "![accuracy](accuracy.png)",
        "",
        "Time per step (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()),
        "",
    ]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo-loop")
    ap.add_argument("--build-limit", type=int, default=None)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument(
        "--model",
        default=None,
        help="base model folder (default: the demo model stopped at 120 steps, build/models/demo-loop-base)",
    )
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="MPOConfig override for both runs")
    args = ap.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    from mmpr_pipeline.cli import _overrides

    run_loop(
        args.out,
        LoopSettings(
            build_limit=args.build_limit,
            eval_limit=args.eval_limit,
            model=args.model,
            train_overrides=_overrides(args.set),
        ),
    )
    print((Path(args.out) / "report.md").read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
