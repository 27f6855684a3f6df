"""The same build on a multi-node Ray cluster, and GPU placement planned before anyone pays for GPUs.

A `ray.cluster_utils.Cluster` on this machine: a head node that takes no work (num_cpus=0) and two
worker nodes. Every build here is a real `mmpr build` process (vLLM on CPU, the demo model), writing
to folders the nodes share (this machine's disk) or, as on Kubernetes where no file system is shared,
to a run folder on object storage (moto's S3 server; the nodes start after it, with its environment).
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import _build_process as build_process
import psutil
import pyarrow.parquet as pq
import pytest

from mmpr_pipeline import storage

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "data_cards" / "demo.yaml"
pytestmark = pytest.mark.slow

# 6 units, sampled one batch (one unit) at a time: when the first unit is finished, others are still
# to do, so removing the engine's node meets pending work.
RECIPE_OVERRIDES = [
    "sources[0].limit=16",
    "sources[1].limit=8",
    "sampling.n=4",
    "sampling.max_tokens=40",
    "unit_size=4",
    "batch_size=4",
    "engine.max_concurrent_batches=1",
    "shard_rows=25",
]
UNITS = 6


def _pairs(run) -> dict[str, tuple[str, str]]:
    """A run's pairs by id; `run` a local folder or a storage.ObjectPath."""
    rows = [
        r
        for p in sorted((run / "data").glob("train-*.parquet"))
        for r in pq.read_table(storage.parquet_source(p), columns=["id", "chosen", "rejected"]).to_pylist()
    ]
    return {r["id"]: (r["chosen"], r["rejected"]) for r in rows}


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Head and two worker nodes, started after the S3 server: their workers read and write the run
    folder on it."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False))
    workers = [c.add_node(num_cpus=2), c.add_node(num_cpus=2)]
    c.wait_for_nodes()
    yield c, workers
    c.shutdown()


@pytest.fixture(scope="module")
def single_node(tmp_path_factory, trained_model, cluster):
    """A plain build (no RAY_ADDRESS) while the cluster runs and this machine's Ray address file
    names it (where a plain `ray.init()` would join it): it must start its own local Ray, whose GCS
    server is then a child of the build. Returns the run and whether that child was seen."""
    from ray._private.utils import write_ray_address

    write_ray_address(cluster[0].address)
    run = tmp_path_factory.mktemp("single") / "run"
    log = run.parent / "build.log"
    p = build_process.start(DEMO, run, log, model=trained_model, sets=RECIPE_OVERRIDES)
    try:
        own_ray, deadline = False, time.time() + 900
        while p.poll() is None and time.time() < deadline:
            try:
                own_ray = own_ray or any(
                    "gcs_server" in c.name() for c in psutil.Process(p.pid).children(recursive=True)
                )
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.5)
        p.wait(timeout=60)
    finally:
        build_process.kill_group(p)
    assert p.returncode == 0, log.read_text()[-3000:]
    return run, own_ray


def test_a_plain_build_starts_its_own_ray_beside_a_running_cluster(single_node):
    run, own_ray = single_node
    assert own_ray, "the build joined the running cluster instead of starting its own Ray"
    stats = json.loads((run / "stats.json").read_text())
    assert stats["totals"]["rows"] == 24 == stats["totals"]["questions"] + stats["totals"]["rejects"]
    assert sum(stats["totals"]["pairs"].values()) == len(_pairs(run)) > 0


# A line that Ray or vLLM print at warning or error level: Python logging's level names (Ray's
# "\tWARNING file.py:12 --", vLLM's "WARNING 12-03 ..."), glog's "W1203"/"E1203" prefixes, and Ray's
# C++ "[date time,ms E pid tid] file.cc:N" lines; and the notices a newcomer read as failures.
FOREIGN_LINE = re.compile(
    r"\b(WARNING|ERROR|CRITICAL|FATAL)\b|^\[?[WEF]\d{4} |\] \w+\.cc:\d+|core_worker|Token authentication"
)
SAMPLE_BAR = re.compile(r"sample:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) .*?(?:([\d,]+) tok/s)?\]?$")


def test_build_output_shows_progress_and_no_ray_or_vllm_warnings(single_node):
    """What a successful `mmpr build` prints (the plain build above: a real CLI run, nothing killed):
    per-question progress with tokens per second, the unit bar, the summary naming the preview, logs
    and next commands, and no Ray or vLLM line at warning or error level (those go to RUN_DIR/logs/)."""
    run = single_node[0]
    out = (run.parent / "build.log").read_text()
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", out) if ln.strip()]
    foreign = [ln for ln in lines if FOREIGN_LINE.search(ln)]
    assert not foreign, foreign[:5]
    bars = [m for m in (SAMPLE_BAR.search(ln) for ln in lines) if m]
    assert bars, "no sample progress bar in the output"
    counts = [int(m.group(1)) for m in bars]
    total = int(bars[-1].group(2))
    stats = json.loads((run / "stats.json").read_text())
    assert counts[-1] == total == sum(s["rows"] for s in stats["sources"].values())
    assert any(0 < c < total for c in counts), counts  # it moved before the end, not all at once
    assert counts == sorted(counts)
    assert any(m.group(3) and int(m.group(3).replace(",", "")) > 0 for m in bars), "no tokens per second"
    units = stats["resume"]["units"]
    assert any(re.search(rf"judge\+pair\+write:\s+100%.*\b{units}/{units}\b", ln) for ln in lines)
    logs = run / "logs"
    assert f"look at the pairs: {run / 'preview.html'}" in out
    assert f"logs: {logs}/" in out and "next: train on them: mmpr train" in out and "mmpr publish" in out
    # what Ray printed went to the run's logs instead (its actor-pool notice comes with every build)
    assert "core_worker" in (logs / "driver.log").read_text()
    assert list((logs / "ray").glob("worker-*"))


def _engine_node(workers) -> object | None:
    """The worker node whose raylet runs the sampling actor (its process title names the stage)."""
    for node in workers:
        raylet = node.all_processes["raylet"][0].process
        for child in psutil.Process(raylet.pid).children(recursive=True):
            try:
                if "SampleStage" in " ".join(child.cmdline()):
                    return node
            except psutil.NoSuchProcess:
                continue
    return None


def test_cluster_build_on_s3_equals_single_node_even_when_the_engine_node_dies(
    cluster, single_node, trained_model, s3_server, tmp_path
):
    """The same recipe on the cluster, its run folder on object storage (no shared file system), and
    the node that holds the engine removed once the first unit is finished and others are not: the
    build finishes by itself with every unit and gives the single-node pairs, ids and texts. (One
    build for both: each costs a Ray and an engine start.)"""
    c, workers = cluster
    expected = _pairs(single_node[0])
    s3_server[1].create_dir("cluster-runs")
    run = storage.as_path("s3://cluster-runs/run")
    log = tmp_path / "build.log"
    p = build_process.start(DEMO, run, log, model=trained_model, sets=RECIPE_OVERRIDES, ray_address=c.address)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not run.glob("samples/*/unit-*.json"):
            assert p.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        node = _engine_node(workers)
        assert node is not None, "no node runs the sampling actor"
        c.remove_node(node)
        pending = UNITS - len(run.glob("samples/*/unit-*.json"))
        assert pending > 0, "every unit was finished before the node was removed: nothing was tested"
        c.add_node(num_cpus=2)  # the cluster stays two workers strong
        p.wait(timeout=900)
    finally:
        build_process.kill_group(p)
    # Ray Data restarts the engine's actor on a live node and retries the units it held: the same
    # build finishes by itself, with every unit
    assert p.returncode == 0, log.read_text()[-3000:]
    assert json.loads((run / "stats.json").read_text())["resume"]["units"] == UNITS
    assert _pairs(run) == expected


PLACEMENT_PROBE = """
import json, ray
from ray.util.placement_group import placement_group_table
from mmpr_pipeline.pipeline import init_ray, cluster_gpus
from mmpr_pipeline.engine import actor_options, replica_plan
init_ray(None)  # joins the cluster named by RAY_ADDRESS
out = {}
for tp in (2, 4):
    # what the build does (pipeline.run_units): the plan, then one placement per engine actor
    plan = replica_plan(cluster_gpus(), {"tensor_parallel_size": tp})
    options = actor_options(plan)
    groups = [options["ray_remote_args_fn"]()["scheduling_strategy"].placement_group
              for _ in range(plan.replicas)]
    placed = all(g.wait(timeout_seconds=20) for g in groups)
    tables = [placement_group_table(g) for g in groups]
    extra = options["ray_remote_args_fn"]()["scheduling_strategy"].placement_group
    out[tp] = dict(
        replicas=plan.replicas, placed=placed, one_more_fits=extra.wait(timeout_seconds=2),
        actor=dict(num_gpus=options["num_gpus"], num_cpus=options["num_cpus"]),
        strategies=[t["strategy"] for t in tables],
        bundles=[list(t["bundles"].values()) for t in tables],
        nodes_per_group=[len(set(t["bundles_to_node_id"].values())) for t in tables],
        nodes=len({n for t in tables for n in t["bundles_to_node_id"].values()}),
    )
    for g in groups + [extra]:
        ray.util.remove_placement_group(g)
print("PLAN" + json.dumps(out))
"""


def test_gpu_replicas_and_bundles_are_planned_per_node():
    """Two nodes declaring 4 (logical) GPUs each: TP 2 and 4 give 4 and 2 replicas, each placed by the
    build's own `actor_options` as one STRICT_PACK placement group of TP single-GPU bundles, all on
    one node; all of them fit, over both nodes, and one more does not."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, num_gpus=0, include_dashboard=False))
    try:
        for _ in range(2):
            c.add_node(num_cpus=8, num_gpus=4)
        c.wait_for_nodes()
        proc = subprocess.run(
            [sys.executable, "-c", PLACEMENT_PROBE],
            cwd=REPO,
            env=build_process.environment(ray_address=c.address),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        c.shutdown()
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PLAN")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    plan = {int(k): v for k, v in json.loads(line[4:]).items()}
    for tp, replicas in ((2, 4), (4, 2)):
        p = plan[tp]
        assert p["replicas"] == replicas and p["actor"] == {"num_gpus": 0, "num_cpus": 0}
        assert p["strategies"] == ["STRICT_PACK"] * replicas
        assert p["bundles"] == [[{"GPU": 1.0, "CPU": 1.0}] * tp] * replicas
        assert p["nodes_per_group"] == [1] * replicas and p["nodes"] == 2
        assert p["placed"] and not p["one_more_fits"]


def test_replica_plan_rules(monkeypatch):
    import importlib

    from ray.util.placement_group import PlacementGroup
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from mmpr_pipeline.engine import actor_options, replica_plan

    assert replica_plan([3, 4], {"tensor_parallel_size": 2}).replicas == 1 + 2  # never across nodes
    assert replica_plan([8], {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}).replicas == 2
    cpu = replica_plan([0, 0], {})
    assert (cpu.replicas, cpu.gpus_per_replica) == (1, 0) and actor_options(cpu) == {"num_cpus": 1}
    assert actor_options(replica_plan([4], {})) == {"num_gpus": 1}
    tp2 = actor_options(replica_plan([4], {"tensor_parallel_size": 2}))
    assert (tp2["num_gpus"], tp2["num_cpus"]) == (0, 0)  # the placement group holds the replica's GPUs
    # each call (one per engine actor) reserves one placement group of two GPU bundles on ONE node
    made = []

    def placement_group(bundles, strategy):
        made.append((bundles, strategy))
        return object.__new__(PlacementGroup)

    # the module, not the function of the same name that ray.util exports
    monkeypatch.setattr(
        importlib.import_module("ray.util.placement_group"), "placement_group", placement_group
    )
    first, second = tp2["ray_remote_args_fn"](), tp2["ray_remote_args_fn"]()
    assert made == [([{"GPU": 1, "CPU": 1}] * 2, "STRICT_PACK")] * 2
    strategy = first["scheduling_strategy"]
    assert isinstance(strategy, PlacementGroupSchedulingStrategy)
    assert strategy.placement_group_capture_child_tasks  # vLLM's own workers join the group
    assert strategy.placement_group is not second["scheduling_strategy"].placement_group
    with pytest.raises(ValueError, match="no node has the 8 GPUs"):
        replica_plan([4, 4], {"tensor_parallel_size": 8})
