"""Wire the stages for a recipe on Ray Data: load -> sample -> score -> (units) -> pair -> write.

    load    driver: sources -> Question rows; bad rows -> rejects/ (stages/load.py)
    sample  Ray actor stage, one vLLM engine per replica; DropoutNTP cut + continue (stages/sample.py)
    score   Ray task stage: judge every response (stages/score.py)
    units   driver: each finished work unit -> samples/<source>/unit-XXXXX.parquet (stages/write.py)
    pair    every unit's samples -> pairs (stages/pair.py, mmpr_pipeline/pairing.py)
    write   pairs -> data/train-XXXXX-of-YYYYY.parquet, stats.json, README.md

Resume falls out of the units: a restart loads the same questions, skips units whose file exists,
samples the rest, then re-pairs everything. Pairs are never stored apart from their samples, so
the output is always exactly what the pairing rules give on the kept samples.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmpr_pipeline import shards
from mmpr_pipeline.recipe import Recipe, to_json
from mmpr_pipeline.records import PAIR_SCHEMA, QUESTION_SCHEMA, REJECT_SCHEMA
from stages.load import SourceError, load_source

log = logging.getLogger(__name__)


class RunFolderError(RuntimeError):
    pass


def prepare_run_dir(run: Path, recipe: Recipe, overwrite: bool) -> None:
    """A run folder belongs to one recipe: resuming with a changed recipe would mix outputs."""
    recipe_file = run / "recipe.json"
    if recipe_file.exists():
        old = json.loads(recipe_file.read_text())
        if old != json.loads(to_json(recipe)):
            if not overwrite:
                changed = sorted(k for k in set(old) | set(recipe.to_dict()) if old.get(k) != recipe.to_dict().get(k))
                raise RunFolderError(
                    f"{run} was built with a different recipe (changed: {', '.join(changed)}). "
                    f"Use another --out, or --overwrite to discard its samples and start over.")
            log.warning("--overwrite: discarding the samples in %s", run)
            for sub in ("samples", "rejects", "data"):
                for f in sorted((run / sub).rglob("*"), reverse=True) if (run / sub).exists() else []:
                    f.unlink() if f.is_file() else f.rmdir()
    run.mkdir(parents=True, exist_ok=True)
    for tmp in run.rglob(".*.tmp"):  # temporary files of a run that was killed mid-write
        tmp.unlink()
    shards.write_text(recipe_file, to_json(recipe))


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours (per question) is the one users read
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset INFO lines break the bar


def _gpus_per_replica(recipe: Recipe) -> int:
    return int(recipe.engine.get("tensor_parallel_size", 1)) * int(recipe.engine.get("pipeline_parallel_size", 1))


def generate(recipe: Recipe, model: str, questions: list[dict], collector, ray_address: str | None) -> None:
    """Sample and score `questions` on Ray Data; finished units go to `collector` as they complete."""
    import ray
    from tqdm import tqdm

    from mmpr_pipeline.engine import has_gpu
    from stages.sample import SampleStage
    from stages.score import score_batch

    _init_ray(ray_address)
    by_unit: dict[tuple[str, int], list[dict]] = {}
    for q in questions:
        by_unit.setdefault((q["source"], q["unit"]), []).append(q)
    # One block per unit, so work streams unit by unit.
    ds = ray.data.from_arrow([pa.Table.from_pylist(rows, schema=QUESTION_SCHEMA) for rows in by_unit.values()])
    gpu = has_gpu() if not ray_address else bool(ray.cluster_resources().get("GPU"))
    if gpu:
        replicas = max(1, int(ray.cluster_resources().get("GPU", 1)) // _gpus_per_replica(recipe))
        resources = dict(num_gpus=_gpus_per_replica(recipe))
    else:
        replicas, resources = 1, dict(num_cpus=1)
    sources = {s.name: s for s in recipe.sources}
    ds = ds.map_batches(
        SampleStage, batch_size=recipe.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=replicas),
        fn_constructor_kwargs=dict(model=model, engine_options=recipe.engine, seed=recipe.seed,
                                   sampling=recipe.sampling,
                                   templates={n: recipe.template_for(s) for n, s in sources.items()},
                                   dropout={n: s.dropout for n, s in sources.items()}),
        # Ray Data restarts a crashed replica and retries its batch by default (max_restarts=-1).
        **resources)
    ds = ds.map_batches(score_batch, batch_size=recipe.batch_size, batch_format="pyarrow", num_cpus=0.25)
    with tqdm(total=len(questions), desc="sample+score", unit="q", dynamic_ncols=True) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            bar.update(collector.add(batch.to_pylist()))


def _source_stats(source) -> dict[str, Any]:
    return dict(pipeline=source.pipeline, rows=0, rejects=0, reject_reasons={}, questions=0, samples=0,
                engine_errors=0, correct=0, correct_rate=None, unparsable=0, all_right=0, all_wrong=0,
                questions_with_pairs=0, pairs=dict(correctness=0, format=0, dropout_ntp=0),
                dropout=dict(sampled=0, cut=0, too_short=0, continued=0, empty_continuation=0, identical=0))


def pair_and_write(run: Path, recipe: Recipe, model: str, stats: dict[str, Any]) -> list[Path]:
    """Re-pair every unit's samples (in source, unit order) and write the shards; fills `stats`."""
    from stages.pair import pair_rows

    sources = {s.name: s for s in recipe.sources}
    sampling = dataclasses.asdict(recipe.sampling)
    writer = shards.ShardWriter(run / "data", _pair_schema(), recipe.shard_rows)
    t_pair = 0.0
    for path in shards.unit_files(run):
        rows = pq.read_table(path).to_pylist()
        t0 = time.perf_counter()
        for row in rows:
            src, st = sources[row["source"]], stats["sources"][row["source"]]
            pairs, counts = pair_rows(row, src, seed=recipe.seed, model=model, sampling=sampling)
            n = len(row["responses"])
            st["samples"] += n
            st["engine_errors"] += bool(row["error"])
            st["correct"] += sum(row["correct"])
            st["unparsable"] += sum(1 for e in row["extracted"] if e is None)
            st["all_right"] += counts["all_right"]
            st["all_wrong"] += counts["all_wrong"]
            if counts["all_wrong"] and not row["error"]:
                stats["all_wrong_qids"].setdefault(row["source"], []).append(row["qid"])
            st["questions_with_pairs"] += bool(pairs)
            for kind in ("correctness", "format", "dropout_ntp"):
                st["pairs"][kind] += counts[kind]
            if "dropout" in counts:
                d = st["dropout"]
                d["sampled"] += n
                d["cut"] += sum(1 for k in row["prefix_words"] if k >= 0)
                for k, v in counts["dropout"].items():
                    d[k] += v
            for key in ("sample_seconds", "continue_seconds", "score_seconds"):
                stats["stage_seconds"][key.split("_")[0]] += row[key]
            writer.write(pairs)
        t_pair += time.perf_counter() - t0
    t0 = time.perf_counter()
    paths = writer.close()
    stats["stage_seconds"]["pair"] = round(t_pair, 3)
    stats["stage_seconds"]["write"] = round(time.perf_counter() - t0, 3)
    return paths


def _pair_schema() -> pa.Schema:
    """PAIR_SCHEMA with the `datasets` features in its metadata, so `load_dataset` decodes images."""
    from mmpr_pipeline.card import schema_metadata

    return PAIR_SCHEMA.with_metadata(schema_metadata())


def new_stats(recipe: Recipe) -> dict[str, Any]:
    return dict(recipe=recipe.name, model=recipe.model, fingerprint=recipe.fingerprint(), created=None,
                sources={s.name: _source_stats(s) for s in recipe.sources}, totals={}, all_wrong_qids={},
                stage_seconds={k: 0.0 for k in ("load", "sample", "continue", "score", "pair", "write",
                                                "generate_wall", "total")},
                shards=[])


def collect_samples(recipe: Recipe, run: Path, stats: dict[str, Any], ray_address: str | None = None) -> None:
    """load -> sample -> score into `run`'s work units, skipping units already there."""
    from mmpr_pipeline.engine import resolve_model
    from stages.write import UnitCollector

    # load: every source is opened before any engine starts, so a broken one fails fast
    t0 = time.perf_counter()
    questions, expected = [], Counter()
    for source in recipe.sources:
        try:
            qs, rejects, n_rows = load_source(source, recipe.unit_size)
        except SourceError as e:
            raise SourceError(f"{recipe.file}: {e}") from None
        st = stats["sources"][source.name]
        st.update(rows=n_rows, rejects=len(rejects), questions=len(qs),
                  reject_reasons=dict(Counter(r["reason"] for r in rejects)))
        reject_file = run / "rejects" / f"{source.name}.parquet"
        if rejects:
            shards.write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), reject_file)
            log.warning("%s: %d of %d rows set aside (see %s): %s", source.name, len(rejects), n_rows,
                        reject_file, dict(Counter(r["reason"] for r in rejects)))
        elif reject_file.exists():
            reject_file.unlink()
        questions += qs
        expected.update((q["source"], q["unit"]) for q in qs)
    stats["stage_seconds"]["load"] = round(time.perf_counter() - t0, 3)

    done = {k for k in expected if shards.unit_path(run, *k).exists()}
    pending = [q for q in questions if (q["source"], q["unit"]) not in done]
    if pending:
        log.info("%d questions in %d units to sample (%d units already done)", len(pending),
                 len(expected) - len(done), len(done))
        collector = UnitCollector(run, {k: v for k, v in expected.items() if k not in done})
        t0 = time.perf_counter()
        generate(recipe, resolve_model(recipe.model), pending, collector, ray_address)
        stats["stage_seconds"]["generate_wall"] = round(time.perf_counter() - t0, 3)
        missing = collector.incomplete()
        if missing:
            raise RuntimeError(f"{len(missing)} work units did not complete (first: {missing[0]}); "
                               f"re-run the same command to resume")
    else:
        log.info("all %d units already sampled", len(expected))
    for p in shards.unit_files(run):  # units of rows that a smaller `limit` no longer includes
        if (p.parent.name, int(p.stem.split("-")[1])) not in expected:
            p.unlink()
    stats["resume"] = dict(units=len(expected), units_done_before=len(done), questions_sampled=len(pending))


def build(recipe: Recipe, out: str | Path, *, overwrite: bool = False, ray_address: str | None = None,
          write_card: bool = True) -> dict[str, Any]:
    """Build (or resume) a run folder for `recipe`; returns the stats also written to stats.json."""
    t_start = time.perf_counter()
    run = Path(out)
    prepare_run_dir(run, recipe, overwrite)
    stats = new_stats(recipe)
    collect_samples(recipe, run, stats, ray_address)

    # pair + write (provenance names the model as the recipe does, not a resolved local path)
    shards.kill_point("before_pair")
    stats["shards"] = [str(p.relative_to(run)) for p in pair_and_write(run, recipe, recipe.model, stats)]
    for st in stats["sources"].values():
        if st["pipeline"] == "correctness" and st["samples"]:
            st["correct_rate"] = round(st["correct"] / st["samples"], 4)
    stats["totals"] = dict(
        rows=sum(s["rows"] for s in stats["sources"].values()),
        rejects=sum(s["rejects"] for s in stats["sources"].values()),
        questions=sum(s["questions"] for s in stats["sources"].values()),
        samples=sum(s["samples"] for s in stats["sources"].values()),
        pairs={k: sum(s["pairs"][k] for s in stats["sources"].values())
               for k in ("correctness", "format", "dropout_ntp")})
    for k in ("sample", "continue", "score"):
        stats["stage_seconds"][k] = round(stats["stage_seconds"][k], 3)
    stats["stage_seconds"]["total"] = round(time.perf_counter() - t_start, 3)
    stats["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    shards.kill_point("before_stats")
    shards.write_json(run / "stats.json", stats)
    if recipe.preview:  # before the card, which links to it
        from mmpr_pipeline.preview import write_preview
        write_preview(run)
    if write_card:
        from mmpr_pipeline.card import write_card as _write_card

        _write_card(run)
    print_summary(run, stats)
    return stats


def print_summary(run: Path, stats: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MMPR build: {stats['recipe']} -> {run}", title_justify="left")
    for col in ("source", "pipeline", "rows", "rejects", "questions", "samples", "correct",
                "all right", "all wrong", "pairs corr/fmt/dntp"):
        table.add_column(col, justify="left" if col in ("source", "pipeline") else "right")
    for name, s in stats["sources"].items():
        rate = f"{s['correct_rate']:.1%}" if s["correct_rate"] is not None else "-"
        p = s["pairs"]
        table.add_row(name, s["pipeline"], str(s["rows"]), str(s["rejects"]), str(s["questions"]),
                      str(s["samples"]), rate, str(s["all_right"]), str(s["all_wrong"]),
                      f"{p['correctness']}/{p['format']}/{p['dropout_ntp']}")
    console = Console(width=None if Console().is_terminal else 140)
    console.print(table)
    t = stats["stage_seconds"]
    console.print(f"pairs: {sum(stats['totals']['pairs'].values())} in {len(stats['shards'])} shard(s) under "
                  f"{run / 'data'}; time: total {t['total']:.1f}s (load {t['load']:.1f}s, "
                  f"generate {t['generate_wall']:.1f}s, pair {t['pair']:.1f}s, write {t['write']:.1f}s)")
