"""Wire the stages for a recipe on Ray Data. The driver plans, tracks progress and commits; every
per-row step runs on Ray workers:

    plan    driver + Ray tasks: scan each input (row count, each row's qid) -> work units (units.py)
    load    Ray task per unit: read + check its rows; bad rows -> rejects/ (stages/load.py)
    sample  Ray actor, one vLLM engine per replica, several batches in flight (stages/sample.py);
            DropoutNTP cut + continue without the image (stages/dropout_ntp.py)
    score   \\
    pair     > Ray task per unit: judge, pair, write the unit's files (stages/score.py, pair.py, write.py)
    write   /
    shards  Ray task per shard: the units' pairs -> data/train-XXXXX-of-YYYYY.parquet; the driver
            renames them, sums the units' counts into stats.json and writes the card

A question's samples stay together in one row from sampling to pairing, and a unit stays one Ray
Data block from load to write, so no group-by or shuffle is needed. Resume falls out of the units:
a restart plans the same units and skips those whose counts file names the same plan.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa

from mmpr_pipeline import shards
from mmpr_pipeline.build_summary import print_summary
from mmpr_pipeline.peak_memory import phase_end
from mmpr_pipeline.recipe import Recipe
from mmpr_pipeline.records import PAIR_SCHEMA, QUESTION_SCHEMA, REJECT_SCHEMA
from mmpr_pipeline.run_folder import prepare_run_dir, run_lock
from mmpr_pipeline.sources import SourceError
from mmpr_pipeline.storage import ObjectPath, as_path, local_twin
from mmpr_pipeline.units import BuildStats, WorkUnit, is_done, plan_source, unit_file

log = logging.getLogger(__name__)


class BuildFailed(RuntimeError):
    """The run stopped part-way (a dead engine, a failing stage); finished units are kept."""


def _cause(e: BaseException) -> str:
    """The root cause of an error raised through Ray (which wraps it with the remote traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    engine = [ln.split("EngineStalled:", 1)[-1].strip() for ln in lines if "EngineStalled" in ln]
    named = [
        ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception")) and "UDF failed" not in ln
    ]
    return (engine or named or lines or [type(e).__name__])[-1][:400]


# -- Ray ----------------------------------------------------------------------------------------


def init_ray(address: str | None, verbose: bool = False) -> None:
    """A private local Ray by default, even when another cluster runs on this machine; a cluster
    only when `--ray-address` or RAY_ADDRESS names one. Workers' output (the engine's) is forwarded
    only with `verbose`: otherwise it stays in Ray's session logs (RUN_DIR/logs/ray)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=verbose)
    else:
        start_local_ray(verbose)
    from mmpr_pipeline import stopping

    stopping.install()  # ray.init replaced it with a handler that aborts and leaves processes behind
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours (per row) is the one users read
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset INFO lines break the bar


def start_local_ray(verbose: bool, attempts: int = 3) -> None:
    """Start a private local Ray. Ray waits a fixed 30 s for its raylet to register and then gives up
    ("The current node timed out during startup"): on a busy machine that is a slow start, not a broken
    one, so the start is tried again (after shutting down what the failed one left)."""
    import ray

    from mmpr_pipeline import stopping

    for attempt in range(1, attempts + 1):
        try:
            with stopping.ctrl_c_reaches_only_this_process():
                ray.init(
                    address="local",
                    num_cpus=os.cpu_count(),
                    include_dashboard=False,
                    log_to_driver=verbose,
                    configure_logging=False,
                )
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            log.warning(
                "Ray's start timed out (a busy machine?); starting it again (%d/%d)", attempt + 1, attempts
            )
            ray.shutdown()


def cluster_gpus() -> list[float]:
    """GPUs of each alive node of the Ray cluster."""
    import ray

    return [n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n["Alive"]]


# -- plan ---------------------------------------------------------------------------------------


def plan_units(recipe: Recipe) -> tuple[dict[str, list[WorkUnit]], int]:
    """Every source's work units, and the most images one question has, from a scan of each input
    on a Ray worker (the driver receives only qids, and each row's near-duplicate key). Sources are
    planned in recipe order, so of near-duplicate rows the first by source order is kept."""
    import ray

    from mmpr_pipeline.decontam import EarlierRows
    from mmpr_pipeline.sources import scan_input, source_inputs

    scan = ray.remote(num_cpus=0.25, max_retries=2)(scan_input)
    pending = {}
    for source in recipe.sources:
        try:
            inputs = source_inputs(source)
        except SourceError as e:
            raise SourceError(f"{recipe.file}: {e}") from None
        pending[source.name] = [
            scan.remote(source, path, source.limit, recipe.unit_size, recipe.near_duplicates)
            for path in inputs
        ]
    units, max_images = {}, 0
    earlier = EarlierRows(recipe.near_duplicates) if recipe.near_duplicates != "off" else None
    for source in recipe.sources:
        try:
            scans = ray.get(pending[source.name])
        except ray.exceptions.RayTaskError as e:
            # the source's own message: the wrapper's text also holds the worker's traceback
            if isinstance(e.cause, SourceError):
                raise SourceError(f"{recipe.file}: {e.cause}") from None
            raise
        units[source.name] = plan_source(source, scans, recipe.unit_size, earlier)
        max_images = max([max_images] + [s["max_images"] for s in scans])
    return units, max_images


# -- the Ray Data stages --------------------------------------------------------------------------


def _unit_options(recipe: Recipe, run: Path, model: str) -> dict[str, Any]:
    return dict(run=str(run), sources={s.name: s for s in recipe.sources}, seed=recipe.seed, model=model)


def load_units(batch: pa.Table, run: str, sources: dict, seed: int, model: str, benchmarks=None) -> pa.Table:
    """load (+ decontaminate, given the benchmark index's reference): work-unit plans -> their
    questions; rejects are written here. A unit with no question left is finished here too."""
    from stages.decontaminate import set_aside_leaks
    from stages.load import read_unit
    from stages.write import write_rejects

    out = []
    for item in batch.to_pylist():
        unit = WorkUnit.from_item(item)
        questions, rejects = read_unit(sources[unit.source], unit)
        questions, leaks = set_aside_leaks(questions, benchmarks)
        rejects = sorted(rejects + leaks, key=lambda r: r["row_index"])
        write_rejects(as_path(run), unit, rejects)
        if not questions:
            write_unit_files(run, unit, [], rejects, sources, seed, model)
        out += questions
    return pa.Table.from_pylist(out, schema=QUESTION_SCHEMA)


def finish_units(batch: pa.Table, run: str, sources: dict, seed: int, model: str) -> pa.Table:
    """score + pair + write: sampled questions of whole units -> the units' files; returns one small
    summary row per unit (the only thing the driver sees)."""
    from stages.score import is_scored, score_row
    from stages.write import summary_row

    by_unit: dict[str, list[dict]] = {}
    for row in batch.to_pylist():
        by_unit.setdefault(row["unit_plan"], []).append(row)
    summaries = []
    for plan, rows in by_unit.items():
        unit = WorkUnit.from_item({"unit_plan": plan})
        reject_path = unit_file(run, "rejects", unit.source, unit.unit)
        rejects = shards.read_file(reject_path).to_pylist() if reject_path.exists() else []
        if len(rows) + len(rejects) != unit.stop - unit.start:  # a unit must arrive whole
            raise RuntimeError(
                f"unit {unit.source}/{unit.unit} arrived split ({len(rows)} of "
                f"{unit.stop - unit.start - len(rejects)} questions); lower unit_size"
            )
        rows = [r if is_scored(r) else score_row(r) for r in rows]  # scored already where a judge model ran
        summaries.append(summary_row(write_unit_files(run, unit, rows, rejects, sources, seed, model)))
    return pa.Table.from_pylist(summaries)


def write_unit_files(
    run: str, unit: WorkUnit, rows: list[dict], rejects: list[dict], sources: dict, seed: int, model: str
) -> dict:
    """pair (stages/pair.py) + write (stages/write.py): a unit's scored rows -> its samples, pairs and
    counts file, with its source's pairing settings; returns the counts."""
    from stages.pair import pair_unit
    from stages.write import unit_stats, write_unit

    t0 = time.perf_counter()
    stats = unit_stats(unit, rejects)
    rows = sorted(rows, key=lambda r: r["row_index"])
    pairs, all_wrong_qids = pair_unit(rows, sources[unit.source], seed=seed, model=model, stats=stats)
    return write_unit(
        as_path(run),
        unit,
        rows,
        pairs,
        stats,
        all_wrong_qids,
        pair_seconds=time.perf_counter() - t0,
        pair_schema=pair_schema(),
    )


@functools.cache
def pair_schema() -> pa.Schema:
    """PAIR_SCHEMA with the `datasets` features in its metadata, so `load_dataset` decodes images."""
    from mmpr_pipeline.card import schema_metadata

    return PAIR_SCHEMA.with_metadata(schema_metadata())


# Load and finish tasks at once per engine replica. Uncapped, as many run as fit at 0.25 CPU, each in
# its own Ray worker process: every unit is loadable at the start, beside the engine's start, and
# on a busy machine Ray starts a new worker for each finished unit's task (bench_e2e: 7-9 finish-task
# processes for 10 units). Two keep a replica fed unless a unit's load or finish takes longer than
# half its sampling.
TASKS_PER_REPLICA = 2


def run_units(
    recipe: Recipe, run: Path, model: str, units: list[WorkUnit], max_images: int, benchmarks=None
) -> None:
    """load -> sample -> score/pair/write for `units`, streaming on Ray Data. `benchmarks`: a
    reference to the decontamination index (stages/decontaminate.py), or None."""
    import ray

    from mmpr_pipeline import runlogs
    from mmpr_pipeline.progress import BuildProgress, start_counter
    from mmpr_pipeline.stream import chain

    counter = start_counter()  # questions and tokens sampled so far, for the progress bar
    ds = ray.data.from_items([u.to_item() for u in units], override_num_blocks=len(units))
    ds = chain(ds, stream_stages(recipe, run, model, len(units), max_images, benchmarks, counter))
    total = sum(u.stop - u.start for u in units)
    done = 0
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    with BuildProgress(counter, total, len(units), runlogs.terminal()) as progress:
        try:
            for batch in batches:
                for summary in batch.to_pylist():
                    done += 1
                    progress.unit_done(summary)
                    shards.kill_point("after_unit", done)
        except Exception as e:  # noqa: BLE001 - whatever stopped the stream, say it and how to go on
            raise BuildFailed(
                f"the build stopped: {_cause(e)}. {done} of {len(units)} work units finished in "
                f"this run and are kept in {run}: run the same command again to resume"
            ) from e
        finally:
            # Stops Ray Data's executor now: left to the garbage collector (a Ctrl-C in this loop's
            # body leaves the iterator suspended), its thread could still call Ray as Ray shuts down.
            batches.close()


def stream_stages(recipe: Recipe, run: Path, model: str, n_units: int, max_images: int, benchmarks, counter):
    """The build's stream as stage descriptors (stream.py): load, sample, then (with a judge model)
    score and judge, then pair + write. One unit = one block = one batch from load to write."""
    from mmpr_pipeline.engine import MAX_CONCURRENT_BATCHES, actor_options, replica_plan
    from mmpr_pipeline.stream import QUESTION_COLUMNS, SAMPLE_COLUMNS, SUMMARY_COLUMNS, UNIT_COLUMNS
    from mmpr_pipeline.stream import StreamStage as Stage
    from stages.sample import SampleStage

    plan = replica_plan(cluster_gpus(), recipe.engine)
    concurrent = int(recipe.engine.get("max_concurrent_batches", MAX_CONCURRENT_BATCHES))
    options = _unit_options(recipe, run, recipe.model)
    # no more tasks than units: Ray Data warns when a cap exceeds the operator's inputs
    tasks = dict(
        batch_format="pyarrow",
        num_cpus=0.25,
        concurrency=max(1, min(TASKS_PER_REPLICA * plan.replicas, n_units)),
    )
    engine_options = {
        "limit_mm_per_prompt": {"image": max(1, max_images)},  # from the data, unless the recipe sets it
        "trust_remote_code": recipe.trust_remote_code,  # False: vLLM refuses custom code
        **recipe.engine,
    }
    sample_args = dict(model=model, seed=recipe.seed, engine_options=engine_options)
    sample_args.update(sources=recipe.sample_settings(), progress=counter)
    stages = [
        Stage("load", load_units, UNIT_COLUMNS, QUESTION_COLUMNS,
              dict(tasks, fn_kwargs=dict(options, benchmarks=benchmarks), batch_size=1)),
        # Ray Data restarts a replica whose process died and retries its batches.
        Stage("sample", SampleStage, ("qid", "source", "pipeline", "images", "question", "given_response"),
              SAMPLE_COLUMNS, actor_map_args(plan, concurrent, sample_args, **actor_options(plan))),
    ]  # fmt: skip
    if recipe.judge_modes():  # rules, then the judge model, then pairing
        stages += judge_stages(recipe, run, concurrent)
    finish_reads = ("unit_plan", "row_index", "responses", "correct", "reason", "extracted")
    stages.append(
        Stage(
            "pair+write",
            finish_units,
            finish_reads,
            SUMMARY_COLUMNS,
            dict(tasks, fn_kwargs=options, batch_size=None),
        )
    )
    return stages


def actor_map_args(plan, concurrent: int, constructor_kwargs: dict, **actor_args) -> dict:
    """map_batches arguments of an actor stage: a pool of `plan.replicas` engine actors, whole units
    at a time (one block = one batch), each actor working on up to `concurrent` of them at once."""
    import ray

    # Ray 2.60 deprecates passing actor options this way, but still has no other for max_concurrency.
    warnings.filterwarnings(
        "ignore", message=".*ray_remote_args.* is deprecated", category=DeprecationWarning
    )
    return dict(
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=plan.replicas, max_tasks_in_flight_per_actor=concurrent),
        max_concurrency=concurrent,
        fn_constructor_kwargs=constructor_kwargs,
        **actor_args,
    )


def score_units(batch: pa.Table) -> pa.Table:
    """score: the rules' verdicts, before the judge model's stage (which needs them)."""
    from stages.score import score_batch

    return score_batch(batch)


def judge_stages(recipe: Recipe, run: Path, concurrent: int) -> list:
    """score -> judge (stages/judge.py): the judge model's own engine replicas, placed as sampling's.
    On CPU the replica takes a fraction of a CPU, so the tasks around it still find one."""
    from mmpr_pipeline.engine import actor_options, replica_plan, resolve_model
    from mmpr_pipeline.stream import VERDICT_COLUMNS
    from mmpr_pipeline.stream import StreamStage as Stage
    from stages.judge import JudgeStage

    jm = recipe.judge_model
    plan = replica_plan(cluster_gpus(), jm.engine)
    options = actor_options(plan) if plan.gpus_per_replica else dict(num_cpus=0.5)
    judge_args = dict(
        model=resolve_model(jm.model),
        # one thread on CPU unless the recipe says otherwise: the sampling engine beside it has the cores
        engine_options={"trust_remote_code": recipe.trust_remote_code, "cpu_threads": 1, **jm.engine},
        seed=recipe.seed,
        modes=recipe.judge_modes(),
        judge_id=judge_id(jm.model),
        cache_dir=str(Path(jm.cache_dir) if jm.cache_dir else judge_cache(run)),
        min_probability=jm.min_probability,
        agreement_sample=jm.agreement_sample,
        timeout_s=jm.timeout_s,
    )
    score_reads = ("pipeline", "responses", "answer", "answers", "answer_type", "options", "prompt_template")
    return [
        Stage("score", score_units, score_reads, VERDICT_COLUMNS,
              dict(batch_size=None, batch_format="pyarrow", num_cpus=0.25)),
        Stage("judge", JudgeStage, ("qid", "question", "answer", "answers", "extracted", "correct", "reason"),
              VERDICT_COLUMNS, actor_map_args(plan, concurrent, judge_args, **options)),
    ]  # fmt: skip


JUDGE_CACHE = "judge_cache"  # the run folder's verdict cache (kept by --overwrite: verdicts stay valid)


def judge_cache(run) -> Path:
    """The run's verdict cache: in the run folder, or for a run on object storage in a local folder
    named after it (the cache is a local database)."""
    run = as_path(run)
    if isinstance(run, ObjectPath):
        return local_twin(run) / JUDGE_CACHE
    return run / JUDGE_CACHE


def judge_id(model: str) -> str:
    """The judge as the verdict cache names it: the recipe's model name (the demo judge with its
    training version, so a retrained demo judge asks again)."""
    from mmpr_pipeline.recipe import DEMO_JUDGE

    if model == DEMO_JUDGE:
        from mmpr_pipeline import demo_judge

        return f"{DEMO_JUDGE}@v{demo_judge.TRAIN_VERSION}"
    return model


# -- commit ---------------------------------------------------------------------------------------


def write_shards(run: Path, recipe: Recipe, counts: dict[str, list[dict]]) -> list[Path]:
    """The units' pairs, in (source, unit) order, cut into Hub-named shards by Ray tasks; the
    driver renames them. `counts`: each source's unit counts files, in unit order."""
    import ray

    slices = [
        (str(unit_file(run, "pairs", c["source"], c["unit"])), c["pair_rows"], c["pair_bytes"])
        for source_counts in counts.values()
        for c in source_counts
    ]
    plan = shards.plan_shards(slices, recipe.shard_rows)
    data = run / "data"
    data.mkdir(parents=True, exist_ok=True)
    write = ray.remote(num_cpus=0.25)(shards.write_shard)
    schema = pair_schema()
    written = ray.get(
        [write.remote(p, data / shards.shard_name(i, len(plan)), schema) for i, p in enumerate(plan)]
    )
    return shards.commit_shards(data, written)


def write_rejects_file(run: Path, source: str) -> None:
    """rejects/<source>.parquet: the units' rejects of a source in one file, for people to read (written
    unit by unit: the driver never holds a source's rejects)."""
    files = sorted((run / "rejects" / source).glob("unit-*.parquet"))
    target = run / "rejects" / f"{source}.parquet"
    if not files:
        target.unlink(missing_ok=True)
        return
    shards.write_tables((shards.read_file(f).cast(REJECT_SCHEMA) for f in files), REJECT_SCHEMA, target)


def read_unit_counts(run: Path, units: dict[str, list[WorkUnit]]) -> dict[str, list[dict]]:
    """Every finished unit's counts file, read once at commit (for stats.json and the shard plan)."""
    from stages.write import read_counts

    return {source: [read_counts(run, u) for u in source_units] for source, source_units in units.items()}


def sum_counts(counts: dict[str, list[dict]], stats: BuildStats) -> None:
    """stats.json's per-source numbers: the sum of the units' counts files."""
    for source, source_counts in counts.items():
        for c in source_counts:
            stats.add_unit(source, c)


def remove_stale_units(run: Path, units: dict[str, list[WorkUnit]]) -> None:
    """Files of units the plan no longer has (a smaller `limit`, a changed source)."""
    keep = {(u.source, u.unit) for us in units.values() for u in us}
    for kind in ("samples", "pairs", "rejects"):
        for p in (run / kind).glob("*/unit-*.*"):
            if (p.parent.name, int(p.name.split(".")[0].split("-")[1])) not in keep:
                p.unlink()


def collect_samples(
    recipe: Recipe, run: Path, stats: BuildStats, ray_address: str | None = None, verbose: bool = False
) -> dict[str, list[WorkUnit]]:
    """plan -> load -> sample -> score -> pair into `run`'s work units, skipping finished ones."""
    from mmpr_pipeline.engine import resolve_model

    init_ray(ray_address, verbose)
    t0 = time.perf_counter()
    index = None
    if recipe.decontamination:  # built by Ray tasks while the sources are scanned
        from stages.decontaminate import start_index

        try:
            index, summary = start_index(recipe.decontamination)
        except SourceError as e:
            raise SourceError(f"{recipe.file}: decontamination: {e}") from None
    units, max_images = plan_units(recipe)
    if index is not None:  # a changed benchmark (list or content) redoes every unit
        import ray

        summary = ray.get(summary)
        stats.benchmarks = summary["benchmarks"]
        units = {
            name: [dataclasses.replace(u, benchmarks=summary["identity"]) for u in source_units]
            for name, source_units in units.items()
        }
    stats.seconds["plan"] = time.perf_counter() - t0
    remove_stale_units(run, units)
    every = [u for us in units.values() for u in us]
    pending = [u for u in every if not is_done(run, u)]
    phase_end("plan")
    if pending:
        log.info(
            "%d of %d work units to do (%d already done)", len(pending), len(every), len(every) - len(pending)
        )
        t0 = time.perf_counter()
        run_units(recipe, run, resolve_model(recipe.model), pending, max_images, index)
        stats.seconds["generate_wall"] = time.perf_counter() - t0
        phase_end("stream")
        missing = [u for u in pending if not is_done(run, u)]
        if missing:
            raise RuntimeError(
                f"{len(missing)} work units did not complete (first: {missing[0].source}/"
                f"{missing[0].unit}); re-run the same command to resume"
            )
    else:
        log.info("all %d work units already done", len(every))
    for source in units:
        write_rejects_file(run, source)
    phase_end("rejects")
    stats.resume = dict(
        units=len(every),
        units_done_before=len(every) - len(pending),
        rows_sampled=sum(u.stop - u.start for u in pending),
    )
    return units


def build(
    recipe: Recipe,
    out: str | Path,
    *,
    overwrite: bool = False,
    ray_address: str | None = None,
    write_card: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """Build (or resume) a run folder for `recipe`; returns the stats also written to stats.json.
    Ray's and vLLM's output goes to RUN_DIR/logs/ (runlogs.py), or with `verbose` to the terminal."""
    from mmpr_pipeline import runlogs

    t_start = time.perf_counter()
    run = as_path(out)
    with run_lock(run), runlogs.RunLogs(run, verbose) as run_logs:
        prepare_run_dir(run, recipe, overwrite)
        run_logs.start()  # only now: --out is known to be a run folder of ours
        (run / "stats.json").unlink(missing_ok=True)  # written again at the end: until then, unfinished
        stats = BuildStats.for_recipe(recipe)
        units = collect_samples(recipe, run, stats, ray_address, verbose)
        counts = read_unit_counts(run, units)
        sum_counts(counts, stats)
        phase_end("counts")
        shards.kill_point("before_shards")
        t0 = time.perf_counter()
        paths = write_shards(run, recipe, counts)
        stats.shards = [str(p.relative_to(run)) for p in paths]
        phase_end("shards")
        stats.seconds["shards"] = time.perf_counter() - t0
        stats.seconds["total"] = time.perf_counter() - t_start
        stats.created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        shards.kill_point("before_stats")
        summary = stats.to_dict()
        shards.write_json(run / "stats.json", summary)
        phase_end("stats")
        if recipe.preview:  # before the card, which links to it
            from mmpr_pipeline.preview import write_preview

            write_preview(run)
            phase_end("preview")
        if write_card:
            from mmpr_pipeline.card import write_card as _write_card

            _write_card(run)
            phase_end("card")
    print_summary(run, summary, logs=None if verbose else runlogs.logs_dir(run))
    phase_end("summary")
    return summary
