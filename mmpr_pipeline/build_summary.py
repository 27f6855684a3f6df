"""What `mmpr build` prints at its end: a table per source, every response or pair it lost and why,
where the shards are and where the time went, and what to do next."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = (
    "source",
    "pipeline",
    "rows",
    "rejects",
    "questions",
    "samples",
    "correct",
    "all right",
    "all wrong",
    "pairs corr/fmt/dntp",
)


def sources_table(stats: dict[str, Any], run: Path):
    """stats.json's sources as a rich Table, one row per source."""
    from rich.table import Table

    table = Table(title=f"MMPR build: {stats['recipe']} -> {run}", title_justify="left")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("source", "pipeline") else "right")
    for name, s in stats["sources"].items():
        rate = f"{s['correct_rate']:.1%}" if s["correct_rate"] is not None else "-"
        p = s["pairs"]
        counts = (s["rows"], s["rejects"], s["questions"], s["samples"])
        table.add_row(
            name,
            s["pipeline"],
            *map(str, counts),
            rate,
            str(s["all_right"]),
            str(s["all_wrong"]),
            f"{p['correctness']}/{p['format']}/{p['dropout_ntp']}",
        )
    return table


def losses(stats: dict[str, Any]) -> list[str]:
    """Never silent: each line is responses or pairs a source lost, and why."""
    lines = []
    for name, s in stats["sources"].items():
        if s.get("judge_errors"):
            lines.append(
                f"[yellow]{name}: the judge failed on {s['judge_errors']} response(s), never paired "
                "(reason 'judge error: ...' in samples/)[/]"
            )
        if s.get("same_text_pairs"):
            lines.append(
                f"{name}: {s['same_text_pairs']} pair(s) dropped: chosen and rejected the same text "
                "up to white space"
            )
    return lines


def print_summary(run: Path, stats: dict[str, Any], logs: Path | None = None) -> None:
    from rich.console import Console

    console = Console(width=None if Console().is_terminal else 140)
    console.print(sources_table(stats, run))
    for line in losses(stats):
        console.print(line)
    t = stats["stage_seconds"]
    console.print(
        f"pairs: {sum(stats['totals']['pairs'].values())} in {len(stats['shards'])} shard(s) under "
        f"{run / 'data'}; time: total {t['total']:.1f}s (plan {t['plan']:.1f}s, "
        f"load+sample+score+pair {t['generate_wall']:.1f}s, shards {t.get('shards', 0):.1f}s)"
    )
    if (run / "preview.html").exists():
        console.print(f"look at the pairs: {run / 'preview.html'}")
    if logs is not None:
        console.print(f"Ray's and vLLM's logs: {logs}/ (--verbose shows them here)")
    data = "" if run.resolve() == Path("runs/demo").resolve() else f" --set data={run}"
    console.print(
        f"next: train on them: mmpr train data_cards/train_mpo.yaml{data} (make train for runs/demo); "
        f"share them: mmpr publish {run} --repo-id USER/NAME"
    )
