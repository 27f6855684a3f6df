"""The README's measured figures are the stored outputs under benchmarks/results/: a figure that
changes must change in both (re-run the command, store its output, update the README)."""

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def _readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def _one(pattern: str, text: str) -> re.Match:
    found = list(re.finditer(pattern, text))
    assert len(found) == 1, f"{pattern!r} occurs {len(found)} times in README.md"
    return found[0]


def test_resume_timings_are_bench_resumes_stored_output():
    stored = json.loads((RESULTS / "bench_resume.json").read_text())
    m = _one(
        r"demo recipe, (\d+) units, killed after (\d+)\): full run ([\d.]+) s,\s+killed run ([\d.]+) s, "
        r"resumed run ([\d.]+) s \(the (\d+) finished units",
        _readme(),
    )
    units, killed_after, full, killed, resumed, kept = m.groups()
    assert int(units) == stored["units"] and f"after_unit:{killed_after}" == stored["kill_at"]
    assert (float(full), float(killed), float(resumed)) == (
        stored["full_s"],
        stored["killed_s"],
        stored["resumed_s"],
    )
    assert int(kept) == stored["units_kept"]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _with_ci(a: dict) -> str:
    lo, hi = a["ci95"]
    return f"{_pct(a['accuracy'])} ({100 * lo:.1f}-{100 * hi:.1f})"


def test_demo_loop_table_is_the_stored_report():
    report = json.loads((RESULTS / "demo_loop_report.json").read_text())
    readme = _readme()
    rows = {"base": r"base \(\d+ steps\)", "mpo": r"MPO", "sft": r"SFT on chosen"}
    for name, label in rows.items():
        acc, tasks = report["accuracy"][name], report["per_task"][name]["greedy"]
        per_task = {k.split("/")[-1]: v["accuracy"] for k, v in tasks.items() if not k.endswith("/*")}
        expected = [
            _with_ci(acc["greedy"]),
            _with_ci(acc["sampled"]),
            _pct(acc["sampled"]["pass_at_n"]),
            _pct(per_task["count"]),
            _pct(per_task["compare"]),
        ]
        line = _one(rf"\n\| (\*\*)?{label}(\*\*)? \|[^\n]*", readme).group(0)
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")][1:]
        assert cells == expected, (name, cells, expected)
    greedy, sampled = (report["comparisons"]["mpo vs base"][m]["points"] for m in ("greedy", "sampled"))
    _one(re.escape(f"MPO vs base: greedy {greedy:+.1f} points, sampled {sampled:+.1f} points"), readme)
    greedy, sampled = (report["comparisons"]["mpo vs sft"][m]["points"] for m in ("greedy", "sampled"))
    g, s = re.escape(f"{greedy:+.1f}"), re.escape(f"{sampled:+.1f}")
    _one(rf"MPO vs\s+SFT-on-chosen: greedy {g}, sampled {s}", readme)
    pairs = report["pairs"]["correctness"]
    _one(rf"That gives {pairs} correctness\s+pairs", readme)
    _one(rf"The sampled correct rate is {_pct(report['correct_rate'])}", readme)


def test_make_train_figures_are_its_stored_output():
    stored = json.loads((RESULTS / "make_train.json").read_text())
    m = _one(r"default build: ([\d.]+) -> ([\d.]+); ([\d.]+) on (\d+) pairs", _readme())
    first, last, accuracy, pairs = m.groups()
    loss = stored["train_loss"]
    assert (first, last) == (f"{loss['first_quarter']:.2f}", f"{loss['last_quarter']:.2f}")
    assert accuracy == f"{stored['last_eval']['eval_reward_accuracy']:.3f}"
    assert int(pairs) == stored["last_eval"]["eval_pairs"]


def test_readme_says_no_sampling_gap_is_open_for_llava():
    readme = _readme()
    assert "without `<s>`" not in readme
    assert "test_sampling_starts_the_sequence_as_training_does_on_llava" in readme


def test_pipeline_cost_table_is_bench_e2es_stored_output():
    stored = json.loads((RESULTS / "bench_e2e_1000_final.json").read_text())
    readme = _readme()
    rounds = stored["rounds"]
    for row, side in ((r"\| bare: import [^|]+", "bare"), (r"\| `mmpr build`", "build")):
        m = _one(row + r" \| ([\d.]+) s \| ([\d,]+) \| ([\d,]+)", readme)
        mean = {k: sum(r[side][k] for r in rounds) / len(rounds) for k in ("seconds", "tokens")}
        assert m.groups() == (
            f"{mean['seconds']:.1f}",
            f"{mean['tokens']:,.0f}",
            f"{stored['tokens_per_s'][side]:,.0f}",
        )
    ratio = _one(r"\(\*\*([\d.]+)\*\* of bare; target >= 0\.9", readme).group(1)
    assert ratio == f"{stored['ratios']['build/bare']:.2f}"


def test_demo_loop_sweep_table_is_its_stored_output():
    """Every arm of the stored sweep is a README row, as the ablation script prints it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "demo_loop_ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    sweep = json.loads((RESULTS / "demo_loop_ablation_sweep.json").read_text())
    rows = [ln for ln in ablation.table(sweep).splitlines() if ln.startswith("| default |")]
    assert len(rows) == len(sweep["arms"]) == 13
    readme = _readme()
    for row in rows:
        assert row in readme, row


def _fsdp_figures(stored: dict) -> tuple[str, ...]:
    """ddp's and fsdp's measured peaks (lowest-highest process), the fsdp/ddp ratio, and plan/measured."""
    mib = {
        s: sorted(r["measured_mib"] for r in stored["processes"] if r["strategy"] == s)
        for s in ("ddp", "fsdp")
    }
    return (
        *(f"{v:,.0f}" for s in ("ddp", "fsdp") for v in (mib[s][0], mib[s][-1])),
        f"{stored['fsdp_over_ddp']:.2f}",
    )


def test_fsdp_memory_figures_are_bench_train_fsdps_stored_outputs():
    readme = _readme()
    pattern = (
        r"ddp\s+([\d,]+)-([\d,]+)\s+MiB,\s+fsdp\s+([\d,]+)-([\d,]+)\s+MiB\s+per\s+process,"
        r"\s+\*\*([\d.]+)x\*\*"
    )
    for name, lead in (("bench_train_fsdp.json", "After:"), ("bench_train_fsdp_before.json", "Before:")):
        stored = json.loads((RESULTS / name).read_text())
        assert _one(re.escape(lead) + r"\s+" + pattern, readme).groups() == _fsdp_figures(stored), name
    stored = json.loads((RESULTS / "bench_train_fsdp.json").read_text())
    m = _one(r"plan/measured: ddp ([\d.]+), fsdp ([\d.]+)", readme)
    assert m.groups() == tuple(f"{stored['plan_over_measured'][s]:.2f}" for s in ("ddp", "fsdp"))


def test_plan_table_is_what_the_plan_prints():
    from mmpr_pipeline.train.plan import presets_table

    assert presets_table() in _readme()
