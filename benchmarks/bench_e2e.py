"""The pipeline's own cost: a whole `mmpr build` against the bare engine on the same questions.

    python benchmarks/bench_e2e.py [--questions 1000] [--rounds 1] [--max-tokens 48]
                                   [--before DIR] [--sides bare,build] [--set KEY=VALUE ...]

One Parquet source of --questions distinct photo-sized JPEGs (bench_scale.write_source, ~86 KB each)
and bench_scale's recipe (the demo model, n = 4, temperature 1.0, `--max-tokens` tokens). Each round
runs, each in a fresh process:

  bare          `import vllm`, `vllm.LLM` with the build's own engine settings (engine.engine_kwargs
                with the options run_units gives the actor), then one `LLM.chat` over the same
                rendered conversations with the build's per-question sampling parameters; timed:
                import + engine start + generation (reading the source and decoding its images, done
                before the engine starts, is reported apart, untimed)
  build         `mmpr build` of this checkout; timed: stats.json's total (Ray start to card)
  build_before  (with --before DIR) `mmpr build` of another checkout (e.g. the commit before a cut)

alternating bare, build[, build_before] --rounds times, so a busy neighbour weighs on every side.
`--set` overrides the builds' recipe as `mmpr build --set` does (quote YAML words such as off:
`--set 'near_duplicates="off"'`). Printed: tokens/s of each side, the ratio build / bare (the issue's
target: >= 0.9) and build / build_before, the same ratios from each process's start (the bare side less
its data preparation, the build to the end of pipeline.build), and the build's profile:

  phases   the driver's wall per phase (peak_memory.phase_end's `seconds`, plus Ray's start, timed by
           wrapping pipeline.init_ray): ray start, plan, stream (load + sample + judge + write of every
           unit), rejects, counts, shards, stats, preview, card
  events   seconds from Ray's start to: the sampling actor's process (a Ray worker, maybe started
           before the actor), the engine core's process, the
           first sampled tokens the driver saw (its progress poll, every second or so), the first
           and last finished unit (their counts files' mtimes)
  cpu      CPU-seconds of each kind of process of the build's tree (psutil, every 0.5 s; a process's
           CPU between two reads goes to the task its title named at the read): driver, sampling
           actor, engine core, load / finish (score, pair, write) / shard / scan tasks, idle Ray
           workers, Ray's daemons; the number of processes of each kind; the driver's own CPU-seconds
           per phase; and the machine's CPU-seconds spent outside the tree (another job)
  stats    stats.json's stage_seconds (sample / score / pair / write are sums over questions or units)

Raw output: benchmarks/results/bench_e2e.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale  # noqa: E402 - the photo source and the recipe of the scale benchmark

PEAK_LOG_ENV = bench_scale.PEAK_LOG_ENV  # mmpr_pipeline/peak_memory.py logs each phase's seconds there
DRIVER_LOG_ENV = "BENCH_E2E_DRIVER_LOG"

# `mmpr build` with what the phases lack, written at exit: Ray's start (pipeline.init_ray, before the
# first phase), when the driver first saw sampled tokens (BuildProgress.first_tokens), the end of
# pipeline.build, and the driver's CPU-seconds per phase (wrapping pipeline.phase_end)
DRIVER = """
import atexit, json, os, sys, time, runpy
from mmpr_pipeline import pipeline, progress

marks = {"driver_cpu": {}}
_init_ray, _exit, _build = pipeline.init_ray, progress.BuildProgress.__exit__, pipeline.build
_phase_end, _cpu = pipeline.phase_end, [time.process_time()]

def phase_end(name):
    _phase_end(name)
    now = time.process_time()
    marks["driver_cpu"][name] = round(now - _cpu[0], 2)
    _cpu[0] = now

def init_ray(*a, **k):
    marks["ray_start"] = time.time()
    marks["driver_cpu"]["before ray"] = round(time.process_time(), 2)
    _init_ray(*a, **k)
    marks["ray_ready"] = time.time()
    marks["driver_cpu"]["ray start"] = round(time.process_time() - marks["driver_cpu"]["before ray"], 2)
    _cpu[0] = time.process_time()

def progress_exit(self, *exc):
    _exit(self, *exc)
    if self.first_tokens:
        marks["first_sampled"] = self.first_tokens[0] + time.time() - time.monotonic()

def build(*a, **k):
    out = _build(*a, **k)
    marks["build_end"] = time.time()
    return out

def dump():
    with open(os.environ["{env}"], "w") as f:
        json.dump(marks, f)

pipeline.init_ray, progress.BuildProgress.__exit__, pipeline.build = init_ray, progress_exit, build
pipeline.phase_end = phase_end
atexit.register(dump)
sys.argv = ["mmpr", *sys.argv[1:]]
runpy.run_module("mmpr_pipeline.cli", run_name="__main__", alter_sys=True)
""".replace("{env}", DRIVER_LOG_ENV)


def worker_kind(root_pid: int, pid: int, title: str) -> str:
    """What a process of the build's tree is, from its title (Ray names a worker after its task)."""
    if pid == root_pid:
        return "driver"
    for needle, kind in (
        # vLLM's engine core and its worker, spawned by multiprocessing, then renamed
        ("EngineCore", "engine core"),
        ("VLLM", "engine core"),
        ("multiprocessing.spawn", "engine core"),
        ("SampleStage", "sampling actor"),
        ("JudgeStage", "judge actor"),
        ("load_units", "load tasks"),
        ("finish_units", "finish tasks (score, pair, write)"),
        ("score_units", "score tasks"),
        ("write_shard", "shard tasks"),
        ("scan_input", "scan tasks"),
        ("row_keys", "scan tasks"),
        ("IDLE", "idle Ray workers"),
        ("SampleCounter", "Ray Data and progress actors"),
        ("_StatsActor", "Ray Data and progress actors"),
        ("Autoscaling", "Ray Data and progress actors"),
        ("ActorLocationTracker", "Ray Data and progress actors"),
        ("Agent", "Ray daemons"),
        ("ray::", "other Ray tasks"),
        ("site-packages/ray/", "Ray daemons"),
        ("multiprocessing.resource_tracker", "other"),
    ):
        if needle in title:
            return kind
    return "other"


class TreeCPU:
    """CPU-seconds of every process under `pid` (and it), by kind, read every `every` seconds; also
    when each kind's first process appeared, and the machine's CPU-seconds outside the tree."""

    def __init__(self, pid: int, every: float = 0.5):
        import psutil

        self.root = psutil.Process(pid)
        self.created = self.root.create_time()
        self.every = every
        self.last: dict[int, float] = {}  # pid -> its CPU-seconds at the last read
        self.cpu: dict[str, float] = {}
        self.titles: dict[str, float] = {}  # raw titles -> CPU-seconds (to check the kinds)
        self.first_seen: dict[str, float] = {}  # kind -> process create_time (epoch)
        self.pids: dict[str, set[int]] = {}  # kind -> the processes seen as that kind
        self.stop = threading.Event()
        self.machine0 = self._machine_busy()
        self.t0 = time.time()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    @staticmethod
    def _machine_busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq

    def _read(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    title = " ".join(p.cmdline())[:120] or p.name()
                    created = p.create_time()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            used = t.user + t.system
            delta = used - self.last.get(p.pid, 0.0)
            self.last[p.pid] = used
            kind = worker_kind(self.root.pid, p.pid, title)
            self.cpu[kind] = self.cpu.get(kind, 0.0) + delta
            self.titles[title[:60]] = self.titles.get(title[:60], 0.0) + delta
            self.first_seen[kind] = min(self.first_seen.get(kind, created), created)
            self.pids.setdefault(kind, set()).add(p.pid)

    def _follow(self) -> None:
        while not self.stop.is_set():
            self._read()
            self.stop.wait(self.every)

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        wall = time.time() - self.t0
        tree = sum(self.cpu.values())
        outside = self._machine_busy() - self.machine0 - tree
        return dict(
            wall_s=round(wall, 1),
            cpu_s={k: round(v, 1) for k, v in sorted(self.cpu.items(), key=lambda kv: -kv[1])},
            cpu_tree_s=round(tree, 1),
            # CPU the machine spent outside this tree while it ran (another job, this benchmark)
            cpu_outside_s=round(max(0.0, outside), 1),
            outside_cores=round(max(0.0, outside) / wall, 2),
            titles={k: round(v, 1) for k, v in sorted(self.titles.items(), key=lambda kv: -kv[1])[:25]},
            first_seen=self.first_seen,
            processes={k: len(v) for k, v in self.pids.items()},
        )


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", **(extra or {}))
    env.pop("RAY_ADDRESS", None)
    return env


def run_tree(cmd: list[str], cwd: Path, env: dict) -> tuple[str, dict]:
    t0 = time.time()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    tree = TreeCPU(proc.pid)
    output, _ = proc.communicate()
    cpu = tree.finish()
    cpu["start"] = t0
    cpu["created"] = tree.created
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed (rc {proc.returncode}):\n{output[-4000:]}")
    return output, cpu


# -- the bare side (in its own process) ----------------------------------------------------------


def bare_child(recipe_path: Path, result: Path, sets: list[str]) -> None:
    """`LLM(**engine_kwargs(...))` then one `LLM.chat` over the build's conversations and parameters.
    vLLM (and torch with it) is imported first, inside the timed part: the build's actor imports it
    too. The source is read and its images decoded before the engine starts, outside the timed part."""
    import psutil

    t0 = time.perf_counter()
    from vllm import LLM

    import_s = time.perf_counter() - t0
    from mmpr_pipeline import recipe as recipe_mod
    from mmpr_pipeline.engine import Engine, conversation, engine_kwargs, request_seed, resolve_model
    from stages.load import load_source
    from stages.sample import empty_sample_columns

    t0 = time.perf_counter()
    rec = recipe_mod.load(recipe_path, recipe_mod.parse_overrides(sets))
    model = resolve_model(rec.model)
    source = rec.sources[0]
    questions = load_source(source, 10**9)[0]
    template = rec.template_for(source)
    s = rec.sampling_for(source)
    conversations, params = [], []
    for q in questions:  # as SampleStage.sample_row and params_for make them
        row = empty_sample_columns(dict(q), template)
        conversations.append(conversation(row, True, tuple(source.image_background)))
        seed = request_seed(rec.seed, q["qid"]) if s.reproducible else None
        params.append(Engine.params(s.n, s.temperature, s.top_k, s.top_p, s.max_tokens, seed=seed))
    prepare = time.perf_counter() - t0

    # the options run_units gives the sampling actor's engine
    options = {"limit_mm_per_prompt": {"image": 1}, "trust_remote_code": rec.trust_remote_code, **rec.engine}
    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(model, options, rec.seed))
    start = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = llm.chat(conversations, params, use_tqdm=False)
    generate = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for out in outs for o in out.outputs)
    result.write_text(
        json.dumps(
            dict(
                questions=len(questions),
                prepare_s=round(prepare, 2),
                import_s=round(import_s, 2),
                engine_start_s=round(start, 2),
                generate_s=round(generate, 2),
                seconds=round(import_s + start + generate, 2),
                # from the process's start, less reading and decoding the source
                process_seconds=round(time.time() - psutil.Process().create_time() - prepare, 2),
                tokens=tokens,
            )
        )
    )
    llm.llm_engine.engine_core.shutdown()


def run_bare(recipe_path: Path, tmp: Path, sets: list[str]) -> dict:
    result = tmp / "bare.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bare-child", str(recipe_path), str(result)]
    _, cpu = run_tree(cmd + [a for s in sets for a in ("--set", s)], REPO, child_env())
    r = json.loads(result.read_text())
    r["tokens_per_s"] = round(r["tokens"] / r["seconds"], 1)
    r["process"] = cpu
    return r


# -- the build side ------------------------------------------------------------------------------


def run_build(repo: Path, recipe_path: Path, run: Path, sets: list[str]) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    peaks, driver_log = run.with_suffix(".phases.jsonl"), run.with_suffix(".driver.json")
    peaks.unlink(missing_ok=True)
    driver_log.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", DRIVER, "build", str(recipe_path), "--out", str(run)]
    for s in sets:
        cmd += ["--set", s]
    output, cpu = run_tree(cmd, repo, child_env({PEAK_LOG_ENV: str(peaks), DRIVER_LOG_ENV: str(driver_log)}))
    stats = json.loads((run / "stats.json").read_text())
    marks = json.loads(driver_log.read_text())
    phases = {"ray start": round(marks["ray_ready"] - marks["ray_start"], 2)}
    for line in peaks.read_text().splitlines():
        d = json.loads(line)
        phases[d["phase"]] = d["seconds"]
    # the first phase's seconds count from the module's import: take Ray's start out of it
    phases["plan"] = round(phases["plan"] - phases["ray start"], 2)
    t = marks["ray_start"]  # the build's clock starts with Ray's start (stats.json's total: a bit before)
    done = sorted(p.stat().st_mtime for p in (run / "samples").glob("*/unit-*.json"))
    events = {
        "sampling actor process": cpu["first_seen"].get("sampling actor"),
        "engine core process": cpu["first_seen"].get("engine core"),
        "first tokens seen by the driver": marks.get("first_sampled"),
        "first unit finished": done[0] if done else None,
        "last unit finished": done[-1] if done else None,
    }
    events = {k: (round(v - t, 1) if v else None) for k, v in events.items()}
    tokens = sum(_sample_tokens(run))  # the generated tokens, from the units' samples files
    total = stats["stage_seconds"]["total"]
    return dict(
        # from the process's start to the end of pipeline.build (the summary printed)
        process_seconds=round(marks["build_end"] - cpu["created"], 2),
        questions=stats["totals"]["questions"],
        pairs=sum(stats["totals"]["pairs"].values()),
        tokens=tokens,
        seconds=total,
        tokens_per_s=round(tokens / total, 1),
        phases=phases,
        events=events,
        driver_cpu=marks["driver_cpu"],
        stage_seconds=stats["stage_seconds"],
        process=cpu,
        summary=output.strip().splitlines()[-6:],
    )


def _sample_tokens(run: Path):
    import pyarrow.parquet as pq

    for f in sorted((run / "samples").glob("*/unit-*.parquet")):
        for n in pq.read_table(f, columns=["n_tokens"]).column("n_tokens").to_pylist():
            yield sum(n)


# -- the comparison ------------------------------------------------------------------------------


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def show(name: str, r: dict) -> None:
    p = r["process"]
    print(
        f"  {name:<13} {r['tokens']:>7} tokens in {r['seconds']:7.1f} s = {r['tokens_per_s']:6.0f} tok/s"
        f"  (from the process's start {r['process_seconds']} s; tree {p['cpu_tree_s']} CPU-s, outside the "
        f"tree {p['cpu_outside_s']} CPU-s = {p['outside_cores']} cores)",
        flush=True,
    )
    if name == "bare":
        print(
            f"    import {r['import_s']} s, engine start {r['engine_start_s']} s, generation "
            f"{r['generate_s']} s (untimed: reading + decoding the source {r['prepare_s']} s)",
            flush=True,
        )


def profile_lines(r: dict) -> list[str]:
    p = r["process"]
    lines = [
        "    phases (s): " + ", ".join(f"{k} {v}" for k, v in r["phases"].items()),
        "    events (s after Ray's start): " + ", ".join(f"{k} {v}" for k, v in r["events"].items()),
        "    CPU-s by worker: " + ", ".join(f"{k} {v}" for k, v in p["cpu_s"].items()),
        "    the driver's CPU-s by phase: " + ", ".join(f"{k} {v}" for k, v in r["driver_cpu"].items()),
        "    stats.json stage_seconds: " + ", ".join(f"{k} {v}" for k, v in r["stage_seconds"].items()),
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=1, help="alternations of the sides")
    ap.add_argument("--sides", default="bare,build", help="of bare, build (build_before with --before)")
    ap.add_argument("--before", type=Path, default=None, help="another checkout, built as build_before")
    ap.add_argument("--set", action="append", default=[], help="recipe override for the builds (mmpr --set)")
    ap.add_argument("--model", default=None, help="default: the trained demo model")
    ap.add_argument("--tmp", type=Path, default=None)
    ap.add_argument("--label", default="", help="a note stored with the results (e.g. what else ran)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_e2e.json")
    ap.add_argument("--bare-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_child:
        return bare_child(*args.bare_child, args.set)
    sides = args.sides.split(",") + (["build_before"] if args.before else [])
    if args.model is None:
        from mmpr_pipeline import demo_model

        args.model = str(demo_model.ensure_trained())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    results = dict(
        questions=args.questions,
        max_tokens=args.max_tokens,
        sets=args.set,
        commit=commit.stdout.strip(),
        before=str(args.before) if args.before else None,
        label=args.label,
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        load_average_at_start=os.getloadavg(),
        rounds=[],
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "photos.parquet"
        kb = bench_scale.write_source(src, args.questions)
        recipe = tmp / "e2e.yaml"
        recipe.write_text(bench_scale.RECIPE.format(model=args.model, path=src, max_tokens=args.max_tokens))
        results["image_kb"] = round(kb, 1)
        print(
            f"{args.questions} questions ({kb:.0f} KB JPEGs), n=4, max_tokens {args.max_tokens}; "
            f"load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        for i in range(args.rounds):
            rnd = {}
            print(f"round {i + 1}/{args.rounds}", flush=True)
            for side in sides:
                if side == "bare":
                    rnd[side] = run_bare(recipe, tmp, args.set)
                else:
                    repo = args.before if side == "build_before" else REPO
                    rnd[side] = run_build(repo, recipe, tmp / f"run-{side}", args.set)
                show(side, rnd[side])
                if side != "bare":
                    print("\n".join(profile_lines(rnd[side])), flush=True)
            results["rounds"].append(rnd)
            args.out.write_text(json.dumps(results, indent=1) + "\n")  # kept if a later round fails
    tps = {s: mean([r[s]["tokens_per_s"] for r in results["rounds"]]) for s in sides}
    # the same from each process's start (the bare side less reading its source)
    pps = {s: mean([r[s]["tokens"] / r[s]["process_seconds"] for r in results["rounds"]]) for s in sides}
    ratios = {}
    for key, rates in (("", tps), ("from process start: ", pps)):
        if "bare" in rates:
            for s in sides:
                if s != "bare":
                    ratios[f"{key}{s}/bare"] = round(rates[s] / rates["bare"], 3)
        if "build" in rates and "build_before" in rates:
            ratios[f"{key}build/build_before"] = round(rates["build"] / rates["build_before"], 3)
    results["tokens_per_s"] = {s: round(v, 1) for s, v in tps.items()}
    results["tokens_per_s_from_process_start"] = {s: round(v, 1) for s, v in pps.items()}
    results["ratios"] = ratios
    results["load_average_at_end"] = os.getloadavg()
    print(
        "mean tok/s: "
        + ", ".join(f"{s} {v:.0f}" for s, v in tps.items())
        + "; ratios: "
        + ", ".join(f"{k} {v}" for k, v in ratios.items())
        + ("  (target build/bare >= 0.9)" if "build/bare" in ratios else "")
    )
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
