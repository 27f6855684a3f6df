"""The figures of a run folder's card: pairs per source, correct rate, response lengths and the
pass-rate histogram (with how many responses were undecided), drawn with matplotlib from the run's
stats.json, shards and unit files."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq

from mmpr_pipeline.errors import CardError
from mmpr_pipeline.records import PAIR_TYPES
from mmpr_pipeline.storage import ObjectPath, parquet_source

FIGURES = {
    "pairs": "figures/pairs_per_source.png",
    "correct_rate": "figures/correct_rate.png",
    "lengths": "figures/response_lengths.png",
    "pass_rate": "figures/pass_rate.png",
}
PASS_RATE_BAND = (0.2, 0.8)  # MMPR-Tiny keeps these prompts for online RL (shaded in the pass-rate figure)
LENGTH_SAMPLE = 20_000  # pairs read for the length plot; keeps the card quick on big runs


def _word_lengths(shards: list[Path], limit: int = LENGTH_SAMPLE) -> tuple[dict, int]:
    """Word counts of chosen and rejected per pair type, over at most `limit` pairs spread over shards."""
    out = {t: {"chosen": [], "rejected": []} for t in PAIR_TYPES}
    per_shard, seen = max(1, limit // max(1, len(shards))), 0
    for path in shards:
        # pre_buffer on, pyarrow reads the shard's texts at once
        f = pq.ParquetFile(parquet_source(path), pre_buffer=False)
        taken = 0
        for batch in f.iter_batches(batch_size=2048, columns=["pair_type", "chosen", "rejected"]):
            d = batch.to_pydict()
            for t, c, r in zip(d["pair_type"], d["chosen"], d["rejected"]):
                if taken >= per_shard:
                    break
                if t in out:
                    out[t]["chosen"].append(len((c or "").split()))
                    out[t]["rejected"].append(len((r or "").split()))
                taken += 1
            if taken >= per_shard:
                break
        seen += taken
    return out, seen


def pass_rates(run_dir: Path) -> dict[str, list[float]]:
    """Per correctness source, the pass rate (sampled accuracy) of each question, from samples/."""
    return pass_rate_counts(run_dir)[0]


def pass_rate_counts(run_dir: Path) -> tuple[dict[str, list[float]], dict[str, int]]:
    """pass_rates, and the responses they leave out: {"responses": n, "undecided": n, "unrated":
    questions} over the correctness sources (an undecided response counts for neither side)."""
    from mmpr_pipeline.selection import SelectError, rate_units

    rates: dict[str, list[float]] = {}
    counts = dict(responses=0, undecided=0, unrated=0)
    try:
        for rated in rate_units(run_dir):
            for _, _, source, n_correct, n_judged in rated.rows:
                rates.setdefault(source, []).append(n_correct / n_judged)
            counts["responses"] += sum(rated.responses.values())
            counts["undecided"] += sum(rated.undecided.values())
            counts["unrated"] += sum(rated.unrated.values())
    except SelectError as e:
        raise CardError(str(e)) from None
    return rates, counts


def undecided_text(counts: dict[str, int]) -> str:
    """E.g. "12 of 400 responses undecided (counted for neither side); 1 question without a pass rate"."""
    text = f"{counts['undecided']:,} of {counts['responses']:,} responses undecided"
    text += " (counted for neither side)"
    if counts["unrated"]:
        text += f"; {counts['unrated']:,} question{'s' * (counts['unrated'] != 1)} without a pass rate"
    return text


def pass_rate_note(rates: dict[str, list[float]], counts: dict[str, int] | None = None) -> str:
    """What the pass-rate figure shows, in numbers."""
    every = [r for rs in rates.values() for r in rs]
    if not every:
        return ""
    lo, hi = PASS_RATE_BAND
    band = sum(lo <= r <= hi for r in every)
    undecided = f" The judge left {undecided_text(counts)}." if counts else ""
    return (
        f"Pass rate: the share of a question's sampled responses judged correct (of those the judge "
        f"ruled on), over {len(every):,} "
        f"questions of correctness sources: {sum(r == 0 for r in every):,} all wrong, "
        f"{sum(r == 1 for r in every):,} all right, {band:,} ({band / len(every):.0%}) in {lo}-{hi}, "
        "the band "
        f"MMPR-Tiny keeps for online RL. `mmpr select RUN_DIR --pass-rate {lo}:{hi} --out DIR` writes those "
        f"prompts as a dataset (`--all-wrong`: the never-solved ones).{undecided}"
    )


_PAIR_COLORS = {"correctness": "#4C72B0", "format": "#DD8452", "dropout_ntp": "#55A868"}


def _figure(figsize: tuple[float, float]):
    """A new matplotlib Figure (no pyplot: no global state, no GUI backend)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _save(fig, path: Path) -> None:
    """Write `fig` as a PNG with the same settings for every figure (no Software tag: reproducible)."""
    if isinstance(path, ObjectPath):  # matplotlib writes local files: the PNG goes up as one object
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
        path.write_bytes(png.getvalue())
        return
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})


def _plot_pairs(path: Path, names: list[str], per_source: list[dict]) -> None:
    """Pairs per source, stacked by pair type."""
    fig = _figure((max(4.5, 1.2 * len(names) + 2), 3.4))
    ax = fig.subplots()
    bottom = [0] * len(names)
    for t in PAIR_TYPES:
        counts = [(s.get("pairs") or {}).get(t, 0) for s in per_source]
        ax.bar(names, counts, bottom=bottom, label=t, color=_PAIR_COLORS[t], width=0.6)
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_ylabel("pairs")
    ax.set_title("Pairs per source and pair type")
    ax.legend(frameon=False)
    if not names:
        ax.text(0.5, 0.5, "no sources", ha="center", transform=ax.transAxes)
    _save(fig, path)


def _plot_correct_rate(path: Path, names: list[str], per_source: list[dict]) -> None:
    """Correct rate per correctness source (DropoutNTP sources have no ground truth)."""
    scored = [
        (n, s.get("correct_rate"))
        for n, s in zip(names, per_source)
        if s.get("pipeline") != "dropout_ntp" and s.get("correct_rate") is not None
    ]
    fig = _figure((max(4.5, 1.2 * len(scored) + 2), 3.4))
    ax = fig.subplots()
    ax.bar([n for n, _ in scored], [100 * r for _, r in scored], color="#4C72B0", width=0.6)
    for i, (_, r) in enumerate(scored):
        ax.text(i, 100 * r + 1, f"{100 * r:.0f}%", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, 105)
    ax.set_ylabel("correct responses (%)")
    ax.set_title("Correct rate of sampled responses per source")
    if not scored:
        ax.text(0.5, 0.5, "no correctness-scored source", ha="center", transform=ax.transAxes)
    _save(fig, path)


def _plot_lengths(path: Path, lengths: dict) -> None:
    """Response lengths, chosen vs rejected, one panel per pair type present."""
    present = [t for t in PAIR_TYPES if lengths[t]["chosen"]]
    fig = _figure((4.2 * max(1, len(present)), 3.6))
    axes = fig.subplots(1, max(1, len(present)), squeeze=False)[0]
    for ax, t in zip(axes, present):
        top = max(lengths[t]["chosen"] + lengths[t]["rejected"]) + 1
        bins = min(40, max(5, top))
        for side, color in (("chosen", "#55A868"), ("rejected", "#C44E52")):
            ax.hist(
                lengths[t][side],
                bins=bins,
                range=(0, top),
                alpha=0.45,
                color=color,
                label=side,
                histtype="stepfilled",
                edgecolor=color,
            )
        ax.set_title(f"{t} ({len(lengths[t]['chosen']):,} pairs)")
        ax.set_xlabel("response length (words)")
        ax.legend(frameon=False)
    axes[0].set_ylabel("responses")
    if not present:
        axes[0].text(0.5, 0.5, "no pairs", ha="center", transform=axes[0].transAxes)
    fig.suptitle("Lengths of chosen and rejected responses")
    _save(fig, path)


def _plot_pass_rate(path: Path, rates: dict[str, list[float]], counts: dict[str, int] | None = None) -> None:
    """Pass rate (sampled accuracy) per question, stacked by correctness source; the subtitle says
    how many responses were undecided (they count for neither side)."""
    fig = _figure((6, 3.4))
    ax = fig.subplots()
    edges = [(k - 0.5) / 10 for k in range(12)]  # one bar per tenth, 0 and 1 in bars of their own
    ax.axvspan(*PASS_RATE_BAND, color="#CCCCCC", alpha=0.4, label="0.2-0.8 (MMPR-Tiny, online RL)")
    if rates:
        ax.hist(list(rates.values()), bins=edges, stacked=True, label=list(rates), rwidth=0.85)
    else:
        ax.text(0.5, 0.5, "no correctness-scored questions", ha="center", transform=ax.transAxes)
    ax.set_xlim(-0.05, 1.05)
    ax.set_xlabel("pass rate (share of a question's samples judged correct)")
    ax.set_ylabel("questions")
    ax.set_title("Pass rate per question" + (f"\n{undecided_text(counts)}" if counts else ""), fontsize=9)
    ax.legend(frameon=False, fontsize=8)
    _save(fig, path)


def plot_figures(run: dict) -> str:
    """Write the figures under RUN_DIR/figures/; return the notes about the length sample and pass rates."""
    run_dir, stats = run["run_dir"], run["stats"]
    (run_dir / "figures").mkdir(exist_ok=True)
    names = list((stats.get("sources") or {}).keys())
    per_source = [stats["sources"][n] for n in names]
    _plot_pairs(run_dir / FIGURES["pairs"], names, per_source)
    _plot_correct_rate(run_dir / FIGURES["correct_rate"], names, per_source)
    lengths, seen = _word_lengths(run["shards"])
    _plot_lengths(run_dir / FIGURES["lengths"], lengths)
    rates, counts = pass_rate_counts(run_dir)
    _plot_pass_rate(run_dir / FIGURES["pass_rate"], rates, counts)
    total = run["num_rows"]
    run["pass_rate_note"] = pass_rate_note(rates, counts)
    return (
        f"Response lengths are counted in words (whitespace-separated) over "
        f"{'all ' if seen >= total else f'a sample of {seen:,} of the '}{total:,} pairs."
    )
