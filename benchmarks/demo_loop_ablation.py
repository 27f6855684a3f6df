"""What makes MPO beat (or not) SFT-on-chosen in the demo loop: one command, `make demo-loop-ablation`.

    python benchmarks/demo_loop_ablation.py [--out runs/demo-loop-ablation] [--arms NAME,...]
        [--data default,reference] [--val-limit 200] [--result benchmarks/results/demo_loop_ablation.json]

On the loop's own pairs (data_cards/demo_loop.yaml with each data variant's overrides) it first
trains SFT-on-chosen and MPO on every data variant, then, on the variant whose better run did best
on validation, every other arm (DPO alone; DPO+SFT; the MPO mix at other learning rates and betas,
and without the BCO shift), each from the loop's base model with the loop's training
(demo_loop.train_config), and measures:
- greedy accuracy (95% Wilson interval, per task) on the *validation* questions
  (data_cards/demo_loop_validation.yaml: the loop's generator at an offset its builds never reach),
  never on the held-out test questions, which only `make demo-loop` evaluates;
- the held-out pairs' chosen and rejected log-probabilities (summed over the response, averaged over
  pairs) at the base model and at each checkpoint during training: is the chosen response's
  likelihood falling, the known failure of DPO-style losses?
- for each data variant, what its pairs are (demo_loop.pair_analysis).
Last it runs the loop itself (demo_loop.run_loop: base, MPO and SFT on the 400 held-out test questions,
greedy and sampled) with the best validated data and MPO and SFT settings, stored next to the result
as demo_loop_ablation_loop_report.json (--no-loop skips it).
Each arm's result is kept under OUT/arms/, so a rerun only does what is missing. Every build, training
and evaluation runs in this one process, one after the other (on a shared 2-core machine, wrap it in
`heavy`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mmpr_pipeline import demo_loop  # noqa: E402

# Data variants: recipe overrides of data_cards/demo_loop.yaml.
DATA = {
    "default": {},
    # the generator's reference chain ("I count 2 circles and 3 squares. 2 is not more than 3.") joins
    # the chosen candidates (pairing's reference rationale), so every question has a sound chosen chain
    "reference": {"sources[0].fields.rationale": "response"},
}
# Derived variants: another variant's pairs, keeping only those whose chosen chain is the question's
# reference chain word for word (demo_loop.chain_check) -- an upper bound on what sound chosen
# chains can do, not a recipe option.
SOUND_CHOSEN = {"reference_sound": "reference"}
MPO, SFT, DPO, DPO_SFT = [0.8, 0.2, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.8, 0.0, 1.0]
# name -> MPOConfig overrides over the loop's training (lr 1e-4, beta 0.1, BCO shift on)
ARMS = {
    "sft": {"weights": SFT},
    "sft lr 3e-4": {"weights": SFT, "learning_rate": 3e-4},
    "dpo": {"weights": DPO},
    "dpo+sft": {"weights": DPO_SFT},
    "mpo": {"weights": MPO},
    "mpo lr 3e-4": {"weights": MPO, "learning_rate": 3e-4},
    "mpo lr 3e-5": {"weights": MPO, "learning_rate": 3e-5},
    "mpo beta 0.05": {"weights": MPO, "beta": 0.05},
    "mpo beta 0.5": {"weights": MPO, "beta": 0.5},
    "mpo no bco shift": {"weights": MPO, "bco_shift": "none"},
    # after the sweep above (SFT at lr 3e-4 best by far): MPO at that lr with the best beta, or with
    # twice the SFT term; DPO+SFT at that lr
    "mpo lr 3e-4 beta 0.05": {"weights": MPO, "learning_rate": 3e-4, "beta": 0.05},
    "mpo lr 3e-4 sft x2": {"weights": [0.8, 0.2, 2.0], "learning_rate": 3e-4},
    "dpo+sft lr 3e-4": {"weights": DPO_SFT, "learning_rate": 3e-4},
}
CHECKPOINTS = 3  # held-out log-probs at this many points of training (and at the base)


def slug(name: str) -> str:
    return name.replace(" ", "_").replace("+", "_")


def keep_sound_chosen(src: Path, dst: Path) -> None:
    """dst/data/: the correctness pairs of the build `src` whose chosen chain is sound; dst/samples
    links to src's (for pair_analysis); dst/stats.json counts them."""
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((src / "data").glob("*.parquet")))
    index = {
        q: i
        for q, i in zip(
            *pq.read_table(sorted((src / "samples").rglob("*.parquet")), columns=["qid", "row_index"])
            .to_pydict()
            .values()
        )
    }
    from mmpr_pipeline import tasks

    rows = list(tasks.generate(max(index.values()) + 1, **demo_loop.LOOP_GENERATOR))
    keep = [
        t == "correctness"
        and demo_loop.chain_check(task, c, rows[index[q]]["response"])["chain_sound"] is True
        and not demo_loop.chain_check(task, c)["contradicts"]
        for q, task, c, t in zip(
            table["qid"].to_pylist(),
            table["task"].to_pylist(),
            table["chosen"].to_pylist(),
            table["pair_type"].to_pylist(),
        )
    ]
    kept = table.filter(keep)
    (dst / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(kept, dst / "data" / "pairs.parquet")
    (dst / "samples").symlink_to((src / "samples").resolve())
    totals = {"pairs": {"correctness": kept.num_rows}, "questions": len(set(kept["qid"].to_pylist()))}
    (dst / "stats.json").write_text(json.dumps({"totals": totals}))


def heldout_logps(base: str, data: Path, run_dir: Path, cfg) -> list[dict]:
    """Mean summed log-probability of the held-out pairs' chosen and rejected responses (the same
    held-out split as the trainer's: eval_fraction and seed of `cfg`), at the base model and at each
    checkpoint in `run_dir`."""
    import torch

    from mmpr_pipeline.train.batches import loader
    from mmpr_pipeline.train.data import PairDataset, PairEncoder, load_pairs, select, split_pairs
    from mmpr_pipeline.train.model import load_model, load_processor, response_logps

    _, held = split_pairs(select(load_pairs(str(data)), cfg.pair_types), cfg.eval_fraction, cfg.seed)
    processor = load_processor(base)
    pad_id = processor.tokenizer.pad_token_id
    dataset = PairDataset(held, PairEncoder(processor, cfg.max_length, with_rejected=True))
    model = load_model(base).eval()
    points = [(0, None)] + [
        (int(p.name.split("-")[1]), p / "state.pt") for p in sorted(run_dir.glob("checkpoint-*"))
    ]
    rows = []
    for step, state in points:
        if state is not None:
            model.load_state_dict(torch.load(state, weights_only=False)["trainable"], strict=False)
        chosen, rejected = [], []
        batches = [list(range(i, min(i + 8, len(dataset)))) for i in range(0, len(dataset), 8)]
        with torch.no_grad():
            for batch in loader(dataset, batches, pad_id, 0):
                if not batch["n_pairs"]:
                    continue
                n = batch["n_pairs"]
                seq, _ = response_logps(model, batch)
                chosen += seq[:n].tolist()
                rejected += seq[n:].tolist()
        rows.append(
            dict(
                step=step,
                pairs=len(chosen),
                chosen_logp=round(sum(chosen) / max(1, len(chosen)), 3),
                rejected_logp=round(sum(rejected) / max(1, len(rejected)), 3),
                margin=round((sum(chosen) - sum(rejected)) / max(1, len(chosen)), 3),
            )
        )
    return rows


def validation_accuracy(model: str, out: Path, limit: int) -> dict:
    from mmpr_pipeline import evaluate
    from mmpr_pipeline import recipe as recipe_mod

    rec = recipe_mod.load(demo_loop.CARDS / "demo_loop_validation.yaml", {"model": model, "limit": limit})
    return evaluate.evaluate(rec, out, modes=("greedy",))["modes"]["greedy"]["accuracy"]


def run_arm(name: str, overrides: dict, base: str, data: Path, out: Path, val_limit: int) -> dict:
    from mmpr_pipeline.train import train

    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(out / "train", ignore_errors=True)  # an unfinished arm starts over
    t0 = time.perf_counter()
    cfg = demo_loop.train_config(base, data, out / "train", overrides)
    from mmpr_pipeline.train.batches import run_length
    from mmpr_pipeline.train.distributed import Dist
    from mmpr_pipeline.train.splits import load_splits

    _, steps = run_length(len(load_splits(cfg, Dist())[0]), cfg, Dist())
    every = max(1, steps // CHECKPOINTS)  # checkpoints (held-out log-probs) at these steps
    extra = {"save_every": every, "save_total_limit": 100, "progress_bar": False}
    cfg = demo_loop.train_config(base, data, out / "train", {**overrides, **extra})
    summary = train(cfg)
    train_s = time.perf_counter() - t0
    logps = heldout_logps(base, data, out / "train", cfg)
    t1 = time.perf_counter()
    acc = validation_accuracy(str(out / "train" / "final"), out / "val", val_limit)
    result = dict(
        arm=name,
        overrides=overrides,
        steps=summary["steps"],
        checkpoint_every=every,
        last_eval={k: v for k, v in (summary.get("last_eval") or {}).items() if k != "split"},
        heldout_logps=logps,
        validation=acc,
        train_s=round(train_s, 1),
        eval_s=round(time.perf_counter() - t1, 1),
    )
    done.write_text(json.dumps(result, indent=1, default=str))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo-loop-ablation")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names")
    ap.add_argument("--data", default=",".join(DATA), help="comma-separated data variants")
    ap.add_argument("--val-limit", type=int, default=200)
    ap.add_argument(
        "--sweep-data", default=None, help="data variant of the sweep (default: the best validated)"
    )
    ap.add_argument(
        "--no-loop", action="store_true", help="stop before running the loop with the best settings"
    )
    ap.add_argument(
        "--stop-at", type=float, default=0, help="start no further sweep arm after this time (Unix seconds)"
    )
    ap.add_argument("--result", default=str(REPO / "benchmarks/results/demo_loop_ablation.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mmpr_pipeline import demo_model, shards

    out = Path(args.out)
    base = str(demo_model.ensure_loop_base())
    result: dict = {"val_limit": args.val_limit, "data": {}, "arms": []}
    base_acc = out / "base_val.json"
    if not base_acc.exists():
        base_acc.parent.mkdir(parents=True, exist_ok=True)
        base_acc.write_text(json.dumps(validation_accuracy(base, out / "base_val", args.val_limit)))
    result["base_validation"] = json.loads(base_acc.read_text())

    def run(variant: str, name: str) -> dict:
        arm = run_arm(
            name,
            ARMS[name],
            base,
            out / "build" / variant,
            out / "arms" / variant / slug(name),
            args.val_limit,
        )
        result["arms"].append({"data": variant, **arm})
        shards.write_json(Path(args.result), result)
        return arm

    # 1. the data: each variant's pairs, and SFT and MPO trained on them
    variants = args.data.split(",")
    for variant in variants:
        build = out / "build" / variant
        if variant in SOUND_CHOSEN and not (build / "stats.json").exists():
            keep_sound_chosen(out / "build" / SOUND_CHOSEN[variant], build)
        elif not (build / "stats.json").exists():
            t0 = time.perf_counter()
            demo_loop.build_pairs(build, {"model": base, **DATA[variant]})
            (out / "build" / f"{variant}_build_s.txt").write_text(f"{time.perf_counter() - t0:.1f}")
        stats = json.loads((build / "stats.json").read_text())
        result["data"][variant] = dict(
            overrides=DATA.get(variant, {"sound chosen chains of": SOUND_CHOSEN.get(variant)}),
            pairs=stats["totals"]["pairs"],
            questions=stats["totals"]["questions"],
            analysis=demo_loop.pair_analysis(build, demo_loop.LOOP_GENERATOR),
        )
    scores = {
        v: max(
            run(v, "sft")["validation"]["validation/*"]["accuracy"],
            run(v, "mpo")["validation"]["validation/*"]["accuracy"],
        )
        for v in variants
    }
    # 2. the losses and their settings, on the data whose better run did best on validation
    recipes = [v for v in variants if v in DATA]  # a derived variant is a measurement, not a recipe
    if not recipes and not args.sweep_data:  # derived variants only: nothing to sweep or run
        print(table(result))
        return 0
    best = args.sweep_data or max(recipes, key=lambda v: (scores[v], -variants.index(v)))
    result["sweep_data"] = best
    result["not_run"] = []
    for name in args.arms.split(","):
        if name in ("sft", "mpo"):
            continue
        if args.stop_at and time.time() > args.stop_at:
            result["not_run"].append(name)  # out of time: named, so the table says what is missing
            continue
        run(best, name)

    # 3. the loop itself (`make demo-loop`'s steps) with the best validated data, MPO and SFT settings,
    # on the held-out test questions
    def best_of(prefix: str) -> str:
        mine = [a for a in result["arms"] if a["data"] == best and a["arm"].split()[0] == prefix]
        return max(mine, key=lambda a: a["validation"]["validation/*"]["accuracy"])["arm"]

    chosen = {"data": best, "mpo": best_of("mpo"), "sft": best_of("sft")}
    result["chosen"] = chosen
    shards.write_json(Path(args.result), result)
    print(table(result))
    keep = ("learning_rate", "beta", "bco_shift")  # the loop's own weights stay MPO's and SFT's
    runs = {r: {k: v for k, v in ARMS[chosen[r]].items() if k in keep} for r in ("mpo", "sft")}
    if not any(runs.values()) and not DATA[best] and not args.no_loop:
        # the loop runs deterministically: its stored report (benchmarks/results/demo_loop_report.json)
        # is what a run with these settings, its defaults, prints
        print("the best validated settings are the loop's defaults: no loop run needed")
    elif not args.no_loop:
        settings = demo_loop.LoopSettings(build_overrides=DATA[best], run_overrides=runs)
        report = demo_loop.run_loop(out / "loop", settings)
        shards.write_json(Path(args.result).with_name("demo_loop_ablation_loop_report.json"), report)
        print(report["mpo_vs_sft"])
    return 0


def table(result: dict) -> str:
    def cell(acc: dict, key: str) -> str:
        a = acc[key]
        return f"{a['accuracy']:.1%} ({a['ci95'][0]:.1%}-{a['ci95'][1]:.1%})"

    lines = [
        "| data | arm | validation greedy (95% CI) | count | compare | held-out log p chosen (base, "
        "checkpoints) | rejected |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| - | base | {cell(result['base_validation'], 'validation/*')} | "
        f"{result['base_validation']['validation/count']['accuracy']:.1%} | "
        f"{result['base_validation']['validation/compare']['accuracy']:.1%} | | |",
    ]
    for a in result["arms"]:
        chosen = ", ".join(f"{x['chosen_logp']:.2f}" for x in a["heldout_logps"])
        rejected = ", ".join(f"{x['rejected_logp']:.2f}" for x in a["heldout_logps"])
        lines.append(
            f"| {a['data']} | {a['arm']} | {cell(a['validation'], 'validation/*')} | "
            f"{a['validation']['validation/count']['accuracy']:.1%} | "
            f"{a['validation']['validation/compare']['accuracy']:.1%} | {chosen} | {rejected} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
