"""Shared fixtures: a tiny model built once per session, and the environment the CLI sets."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two test files at once (pytest-xdist workers gw0, gw1). vLLM's automatic binding
# puts every engine's OpenMP thread on the same core (it keeps the other for its scheduler), so two
# workers' engines would take turns on one core while the other idles: each worker's engines (and the
# builds it starts, which inherit this) get a core of their own instead.
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    _cores = sorted(os.sched_getaffinity(0))
    _worker = int(os.environ["PYTEST_XDIST_WORKER"][2:])
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(_cores[_worker % len(_cores)]))

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random-weight tiny Qwen2-VL model folder (builds in a few seconds)."""
    from mmpr_pipeline import demo_model

    return str(demo_model.build(tmp_path_factory.mktemp("models") / "tiny", "tiny"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (starting Ray costs seconds); the pipeline reuses it."""
    import ray

    start_ray()
    yield ray
    ray.shutdown()


def start_ray() -> None:
    """The session's private local Ray (its workers get this process's environment as it is now)."""
    import ray

    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 (moto's server on 127.0.0.1, a free port) with this process's AWS environment pointed at
    it: AWS_ENDPOINT_URL_S3, test keys and a region, as a user sets them for MinIO. Yields (endpoint URL,
    a pyarrow S3 file system that may create buckets, for uploads). Ray workers take the environment of
    the Ray that started them: a Ray started before this fixture does not have it."""
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        uploads = pafs.S3FileSystem(
            endpoint_override=f"{host}:{port}", scheme="http", allow_bucket_creation=True
        )
        yield endpoint, uploads
    server.stop()


@pytest.fixture(scope="session")
def trained_model() -> str:
    """The bundled demo model, trained to answer the generated tasks a little (so the correctness
    pipeline finds both right and wrong answers). `make test` builds it first; it is cached in
    build/models/demo."""
    from mmpr_pipeline import demo_model

    return str(demo_model.ensure_trained())


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a busy shared machine two OpenMP threads
    wait on each other (10-30x slower here); restored afterwards. Modules opt in with
    `pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (MMPR_CI=1, set by .ci/run) a skipped test fails, saying why it skipped: CI's machine
    has everything the suite needs (root for `mount -t tmpfs`, Chromium, Ray), so a skip there
    means a check silently stopped running. Elsewhere a skip stays a skip (`-rs` lists the reasons)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("MMPR_CI") == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where every test must run: {reason}"


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first (stable otherwise): `make test` runs files on two workers
    (pytest-xdist, --dist loadfile), and a long file started last would run alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
