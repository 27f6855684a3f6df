"""Fail-safe behaviour of the `mmpr` command line (issue 17): no hang, no deleted user file, no
token in the output, and a one-line message (rc 2 for a user error, 1 for the environment) instead
of a traceback. Each test runs the real CLI in a fresh process, as a user would; none of them
starts vLLM, and every one is bounded by a subprocess timeout, so a regression fails, never hangs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import _build_process as build_process
import pytest
from _run_fixture import make_run

from mmpr_pipeline import card, cli, error_policy, errors, export

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_FAILSAFEtokenThatMustNeverBePrinted7"


def mmpr(
    *args, env: dict | None = None, timeout: float = 120, preexec_fn=None
) -> subprocess.CompletedProcess:
    """Run `mmpr ARGS` in a fresh process from the repository root."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "MMPR_"))}
    full_env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "mmpr_pipeline.cli", *map(str, args)],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def one_line_error(r: subprocess.CompletedProcess, rc: int, *needles: str) -> str:
    """Assert `r` ended with exit code `rc` and exactly one `error:` line holding every needle."""
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for needle in needles:
        assert needle in errors[0], r.stderr
    assert r.returncode == rc, r.stderr
    return errors[0]


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (root only); skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A folder nobody can write in: a read-only mount for root (who ignores modes), else mode 555."""
    if os.geteuid() == 0:
        with tmpfs(path, "ro,size=64k"):
            yield path
    else:
        path.mkdir(parents=True)
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


@contextlib.contextmanager
def full_disk(path: Path):
    """A folder on a file system with no space left: a small tmpfs filled up."""
    with tmpfs(path, "size=64k"):
        try:
            with open(path / "filler", "wb") as f:
                while True:
                    f.write(b"x" * 4096)
                    f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
        yield path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("failsafe") / "run")
    card.write_card(run)
    return run


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# --- case 3: export never deletes a user file --------------------------------------------------


def test_export_over_an_earlier_export_keeps_the_users_files(run_dir, tmp_path):
    out = tmp_path / "pairs"
    assert mmpr("export", run_dir, "--format", "trl", "--out", out).returncode == 0
    (out / "NOTES.md").write_text("my notes")
    (out / "ckpt").mkdir()
    (out / "ckpt" / "model.bin").write_bytes(b"\x00weights")
    before = _tree(out)

    r = mmpr("export", run_dir, "--format", "internvl", "--out", out)
    one_line_error(r, 2, str(out), "NOTES.md", "ckpt/model.bin", "did not write")
    assert _tree(out) == before  # the user's files and the earlier export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]  # no temporary folder or lock left

    (out / "NOTES.md").unlink()
    shutil.rmtree(out / "ckpt")
    r = mmpr("export", run_dir, "--format", "internvl", "--out", out)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / export.MARKER).read_text())["format"] == "internvl"
    assert not (out / "data").exists()  # the earlier export's own files were replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]


def test_export_out_that_is_a_file_or_under_one(run_dir, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    one_line_error(mmpr("export", run_dir, "--format", "trl", "--out", a_file), 2, str(a_file), "is a file")
    one_line_error(
        mmpr("export", run_dir, "--format", "trl", "--out", a_file / "sub"), 2, f"{a_file} is a file"
    )
    assert a_file.read_text() == "keep"
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    one_line_error(mmpr("export", run_dir, "--format", "trl", "--out", link), 2, str(link), "symbolic link")
    assert link.is_symlink()


def test_export_out_read_only(run_dir, tmp_path):
    with read_only_folder(tmp_path / "ro") as ro:
        one_line_error(
            mmpr("export", run_dir, "--format", "trl", "--out", ro / "pairs"), 2, str(ro), "cannot write"
        )


def test_export_out_busy_with_another_export(run_dir, tmp_path):
    out = tmp_path / "pairs"
    lock = tmp_path / ".pairs.mmpr-export.lock"  # what a running export holds
    with open(lock, "w") as f:
        f.write("4242")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX)
        one_line_error(mmpr("export", run_dir, "--format", "trl", "--out", out), 2, str(out), "pid 4242")
    assert not out.exists()


def test_export_out_that_is_a_mount_point(run_dir, tmp_path):
    with tmpfs(tmp_path / "mnt", "size=1m") as mount_point:  # busy: it cannot be renamed or replaced
        one_line_error(
            mmpr("export", run_dir, "--format", "trl", "--out", mount_point),
            2,
            str(mount_point),
            "Device or resource busy",
        )
        assert list(mount_point.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]


def test_export_to_a_full_disk(run_dir, tmp_path):
    with full_disk(tmp_path / "disk") as disk:
        one_line_error(
            mmpr("export", run_dir, "--format", "trl", "--out", disk / "pairs"),
            1,
            str(disk / "pairs"),
            "No space left on device",
        )
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # nothing half-written left


# --- case 4: publish never hangs ---------------------------------------------------------------


class StuckServer:
    """Accepts connections and reads the request; then sends nothing (`trickle=0`), or an answer that
    never ends at one byte every `trickle` seconds. Records each request's first line."""

    def __init__(self, trickle: float = 0.0):
        self.trickle, self.requests, self.stop = trickle, [], threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            self.requests.append(conn.recv(65536).split(b"\r\n")[0].decode())
            answer = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10**6
            for byte in answer:
                if self.stop.wait(self.trickle if self.trickle else 3600):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("trickle", [0.0, 0.2], ids=["never-answers", "one-byte-at-a-time"])
def test_publish_against_a_stuck_server_ends_with_a_message(run_dir, tmp_path, trickle):
    server = StuckServer(trickle)
    try:
        r = mmpr(
            "publish",
            run_dir,
            "--repo-id",
            "me/demo",
            timeout=90,
            env=dict(
                HF_ENDPOINT=server.url,
                HF_TOKEN=TOKEN,
                HF_HOME=str(tmp_path / "hf"),
                MMPR_HUB_TIMEOUT="1",
                MMPR_HUB_RETRIES="2",
                MMPR_HUB_BACKOFF="0.1",
            ),
        )
    finally:
        server.close()
    one_line_error(r, errors.NETWORK, server.url, "did not answer in time", "MMPR_HUB_TIMEOUT")
    assert "attempt 2 of 2" in r.stderr  # the idempotent call was retried once...
    whoami = [line for line in server.requests if "/api/whoami-v2" in line]
    assert len(whoami) == 2, server.requests  # ...and then given up
    assert TOKEN not in r.stdout + r.stderr


# --- case 11: the token never appears in the output --------------------------------------------


class EchoingHub:
    """A Hub that says the token is the user's name, puts it in a warning header and in the card
    check's complaint: everything a server could echo back."""

    def __init__(self):
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith("/api/whoami-v2"):  # remember the token, to echo it everywhere
                    self.server.token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                token = getattr(self.server, "token", "")
                if self.path.startswith("/api/whoami-v2"):
                    status, body = 200, json.dumps({"name": token, "type": "user"}).encode()
                else:
                    status, body = 400, f"license must be one of [mit, ...]; you are {token}".encode()
                self.send_response(status)
                self.send_header("X-HF-Warning", f"echo; hello {token}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_publish_never_prints_the_token_whatever_the_server_sends(run_dir, tmp_path):
    server = EchoingHub()
    try:
        r = mmpr(
            "-v",
            "publish",
            run_dir,
            "--repo-id",
            "me/demo",
            timeout=90,
            env=dict(HF_ENDPOINT=server.url, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf"), HF_DEBUG="1"),
        )
    finally:
        server.close()
    assert r.returncode == errors.REFUSED, r.stderr
    assert TOKEN not in r.stdout + r.stderr
    assert "Logged in to" in r.stderr and "as <token>" in r.stderr  # the echo was there, redacted
    assert "hello <token>" in r.stderr  # huggingface_hub's own log of the warning header, redacted
    assert "you are <token>" in r.stderr


# --- case 8: YAML bounds -----------------------------------------------------------------------

# 9 levels of 9 aliases: 9^9 (387 million) strings once expanded. As a `name`, a string key, the
# type check's message would print it all: without the bound, that is what grows without end.
ALIAS_BOMB = (
    "\n".join(
        [f"a0: &a0 [{', '.join(['lol'] * 9)}]"]
        + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
        + ["name: *a8", "output_dir: *a8", "sources: [{name: s, loader: generated}]"]
    )
    + "\n"
)


def _memory_cap():  # a regression must fail the test, not take the machine's memory with it
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def test_a_yaml_alias_bomb_fails_fast_naming_the_file(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 1024
    for command in (["build", bomb, "--out", tmp_path / "run"], ["train", bomb]):
        r = mmpr(*command, timeout=60, preexec_fn=_memory_cap)
        one_line_error(r, 2, str(bomb), "aliases expand to over 100,000 values")
    inline = "{" + ALIAS_BOMB.strip().replace("\n", ", ") + "}"  # the same bomb as a --set value
    r = mmpr(
        "build",
        "data_cards/demo.yaml",
        "--out",
        tmp_path / "run",
        "--set",
        f"card.extra={inline}",
        timeout=60,
        preexec_fn=_memory_cap,
    )
    one_line_error(r, 2, "--set", "card.extra", "aliases expand to over 100,000 values")
    assert not (tmp_path / "run").exists()


# --- case 12/13: recipe paths, --limit, --out, model, engine options, sources ------------------


def _recipe(tmp_path: Path, **changes) -> Path:
    """The demo recipe with `changes` (top-level keys) written to tmp_path/recipe.yaml."""
    import yaml

    data = yaml.safe_load((ROOT / "data_cards" / "demo.yaml").read_text())
    data.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: _file(d / "r.yaml", b"name: caf\xe9\nsources: []\n"), "not UTF-8"),
        (lambda d: _file(d / "r\udcff.yaml", b"name: x\n"), "sources"),
        (lambda d: d, "is a folder"),
        (lambda d: _file(d / "empty.yaml", b""), "the file is empty"),
        (lambda d: _fifo(d / "fifo.yaml"), "not a regular file"),
    ],
    ids=["non-utf8-content", "non-utf8-name", "folder", "empty-with-limit", "fifo"],
)
def test_a_bad_recipe_path_is_one_line(tmp_path, make, needle):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    path = make(recipes)
    r = mmpr("build", path, "--out", tmp_path / "run", "--limit", "2", timeout=60)
    one_line_error(r, 2, needle, path.name.encode("utf-8", "backslashreplace").decode())
    assert not (tmp_path / "run").exists()


def test_limit_zero_is_refused(tmp_path):
    r = mmpr("build", "data_cards/demo.yaml", "--out", tmp_path / "run", "--limit", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "argument --limit: must be >= 1, got 0" in r.stderr
    assert not (tmp_path / "run").exists()


def test_build_out_that_is_a_file_under_a_file_or_read_only(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    one_line_error(mmpr("build", "data_cards/demo.yaml", "--out", a_file), 2, str(a_file), "is a file")
    one_line_error(mmpr("build", "data_cards/demo.yaml", "--out", a_file / "run"), 2, f"{a_file} is a file")
    assert a_file.read_text() == "keep"
    with read_only_folder(tmp_path / "ro") as ro:
        one_line_error(mmpr("build", "data_cards/demo.yaml", "--out", ro / "run"), 2, str(ro), "cannot write")


def test_build_out_with_a_corrupt_recipe_json(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.json").write_text('{"name": "demo", ')
    one_line_error(
        mmpr("build", "data_cards/demo.yaml", "--out", run), 2, str(run / "recipe.json"), "cannot be read"
    )
    assert (run / "recipe.json").read_text() == '{"name": "demo", '


def test_a_model_path_that_does_not_exist_fails_before_any_engine(tmp_path):
    missing = tmp_path / "no-such-model"
    r = mmpr("build", "data_cards/demo.yaml", "--out", tmp_path / "run", "--model", missing, timeout=60)
    one_line_error(r, 2, "--model", str(missing), "no such folder")
    assert r.stderr.count("\n") == 1  # nothing else: no Ray, no vLLM
    r = mmpr("eval", "data_cards/demo.yaml", "--out", tmp_path / "eval", "--model", missing, timeout=60)
    one_line_error(r, 2, "--model", str(missing), "no such folder")
    r = mmpr(
        "build", _recipe(tmp_path, model="someone/not-downloaded"), "--out", tmp_path / "run", timeout=60
    )
    one_line_error(r, 2, "model", "someone/not-downloaded", "HF_HUB_OFFLINE")


def test_an_unknown_engine_option_fails_before_any_engine(tmp_path):
    recipe = _recipe(tmp_path, engine={"max_modle_len": 512})
    r = mmpr("build", recipe, "--out", tmp_path / "run", timeout=60)
    one_line_error(r, 2, str(recipe), "engine.max_modle_len", "vllm.EngineArgs", "max_model_len")
    assert r.stderr.count("\n") == 1


def test_engine_options_known_to_vllm_or_the_pipeline_pass():
    from mmpr_pipeline import engine, preflight

    assert {"max_model_len", "tensor_parallel_size", "gpu_memory_utilization"} <= preflight.engine_options()
    preflight.check_engine_options(
        {"max_model_len": 512, "enforce_eager": True, **{k: 1 for k in engine.PIPELINE_ENGINE_KEYS}}, "r.yaml"
    )
    with pytest.raises(
        preflight.PreflightError, match="r.yaml: engine.tensor_parallel: .*'tensor_parallel_size'"
    ):
        preflight.check_engine_options({"tensor_parallel": 2}, "r.yaml")


@pytest.mark.parametrize("threads", [0, -1, 1.5, "two", True])
def test_a_cpu_thread_count_that_is_not_a_count_is_refused_naming_the_key(threads):
    from mmpr_pipeline import preflight

    with pytest.raises(
        preflight.PreflightError, match=r"r.yaml: engine.cpu_threads: .* is not a whole number"
    ):
        preflight.check_engine_options({"cpu_threads": threads}, "r.yaml")


def test_a_source_that_gives_no_question_is_refused(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)))  # no question field
    recipe = _recipe(
        tmp_path, sources=[{"name": "mine", "loader": "jsonl", "path": str(rows), "answer_type": "text"}]
    )
    r = mmpr("build", recipe, "--out", tmp_path / "run", timeout=60)
    one_line_error(r, 2, str(recipe), "sources[0] (mine)", "none of its 5 rows", "missing question")
    assert not (tmp_path / "run" / "data").exists()

    empty = _recipe(tmp_path, sources=[{"name": "none", "loader": "generated", "generator": {"n": 0}}])
    one_line_error(mmpr("build", empty, "--out", tmp_path / "run2"), 2, "sources[0] (none)", "gives no rows")


def test_a_full_disk_during_build_is_one_line(tmp_path):
    with full_disk(tmp_path / "disk") as disk:
        r = mmpr("build", "data_cards/demo.yaml", "--out", disk / "run", timeout=120)
        one_line_error(r, 1, "No space left on device")
        assert not (disk / "run" / "recipe.json").exists()


def test_garbage_parquet_as_training_data_names_the_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    garbage = data / "train-00000-of-00001.parquet"
    garbage.write_bytes(os.urandom(2048))
    r = mmpr(
        "train",
        "data_cards/train_mpo.yaml",
        "--set",
        f"data={data}",
        "--set",
        f"output_dir={tmp_path / 'out'}",
        timeout=120,
    )
    one_line_error(r, 2, str(garbage), "not a readable Parquet file")


def test_ctrl_c_says_how_to_resume(tmp_path):
    """Ctrl-C while the build samples (SIGINT to the whole process group, as a terminal sends it)."""
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    p = build_process.start(
        ROOT / "data_cards" / "demo.yaml", out, log, model=ROOT / "build/models/demo", limit=8
    )
    try:
        deadline = time.monotonic() + 180
        while "work units to do" not in log.read_text() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert p.poll() is None, log.read_text()
        time.sleep(3)  # into sampling
        os.killpg(p.pid, signal.SIGINT)
        rc = p.wait(timeout=120)
    finally:
        build_process.kill_group(p)
    stderr = log.read_text()
    assert rc == cli.INTERRUPTED, stderr
    assert (
        f"interrupted: finished work units are kept in {out}: run the same command again to resume" in stderr
    )
    assert "Traceback" not in stderr


# --- item 6: the wrapper itself ----------------------------------------------------------------


def test_debug_shows_the_traceback(tmp_path):
    r = mmpr("--debug", "build", tmp_path / "none.yaml", "--out", tmp_path / "run")
    assert r.returncode == 2
    assert "Traceback" in r.stderr and r.stderr.rstrip().splitlines()[-1].startswith("error:")


def test_error_message_sorts_user_errors_from_environment_failures():
    from mmpr_pipeline.recipe import RecipeError

    assert error_policy.error_message(RecipeError("r.yaml", "sampling.n", "must be >= 1")) == (
        2,
        "r.yaml: sampling.n: must be >= 1",
    )
    code, message = error_policy.error_message(
        OSError(errno.ENOSPC, "No space left on device", "/d/run/x.parquet")
    )
    assert (
        code == 1
        and message.startswith("/d/run/x.parquet: No space left on device")
        and "run the same" in message
    )
    code, message = error_policy.error_message(
        RuntimeError("engine died\n  Traceback (most recent call last):\n  ...")
    )
    assert code == 1 and "\n" not in message and message.startswith("RuntimeError: engine died")
    assert error_policy.error_message(MemoryError()) == (1, "out of memory")
    try:  # a full disk behind a wrapper (Ray's, the build's): still said
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("the build stopped: UDF failed to process a data block") from inner
    except RuntimeError as outer:
        code, message = error_policy.error_message(outer)
    assert code == 1 and message.startswith("RuntimeError: the build stopped") and "disk is full" in message
