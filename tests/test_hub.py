"""`mmpr publish`: dry run, refusals before any network call, token and endpoint failures, the upload calls.

The Hub cannot be reached from the test machine: a tiny local HTTP server stands in for it and
records every request, so "nothing was sent" is checked, not assumed.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _run_fixture import make_run
from huggingface_hub import constants

from mmpr_pipeline import card, errors, hub, records

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_TESTtokenThatMustNeverBePrinted42"


class FakeHub(http.server.ThreadingHTTPServer):
    """Answers from `routes` {(method, path): (status, json body)}; 401 for anything else by default."""

    def __init__(self, routes=None, default=(401, {"error": "Invalid credentials in Authorization header"})):
        self.routes, self.default, self.requests = routes or {}, default, []
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def hub_requests(self):  # huggingface_hub also fetches a public agent list; not a publish step
        return [r for r in self.requests if r[1] != "/api/agent-harnesses"]


class _Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append(
            (self.command, self.path.split("?")[0], self.headers.get("Authorization"), body)
        )
        status, payload = self.server.routes.get((self.command, self.path.split("?")[0]), self.server.default)
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    servers = []

    def start(routes=None, **kw):
        servers.append(FakeHub(routes, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture(scope="module")
def built_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("hub") / "run")
    card.write_card(run)
    return run


@pytest.fixture
def run(tmp_path, built_run):
    copy = tmp_path / "run"
    shutil.copytree(built_run, copy)
    return copy


@pytest.fixture(autouse=True)
def hub_env(monkeypatch, tmp_path):
    """A token in HF_TOKEN, no stored login, offline mode on as the Makefile sets it."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Short network bounds, so the failure tests take a second, not minutes.
    monkeypatch.setenv("MMPR_HUB_TIMEOUT", "1")
    monkeypatch.setenv("MMPR_HUB_BACKOFF", "0.05")


def _args(run_dir, repo_id="me/demo", private=False, revision=None, dry_run=False):
    return argparse.Namespace(
        run_dir=str(run_dir), repo_id=repo_id, private=private, revision=revision, dry_run=dry_run
    )


def _cli_publish(args) -> int:
    """`mmpr publish` as a user runs it: its exit code, with errors turned into codes by the CLI."""
    from mmpr_pipeline import cli

    argv = ["publish", args.run_dir, "--repo-id", args.repo_id] + ["--private"] * args.private
    argv += (["--revision", args.revision] if args.revision else []) + ["--dry-run"] * args.dry_run
    return cli.main(argv)


def _snapshot(folder: Path):
    return sorted(
        (p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_no_token(*texts):
    for text in texts:
        assert TOKEN not in text


def test_the_local_check_reads_each_shard_footer_once(run, monkeypatch):
    """validate_run (publish's local check) reads the footers once: counts, schemas and card."""
    n_shards = len(json.loads((run / "stats.json").read_text())["shards"])
    reads = []
    for name in ("read_metadata", "read_schema"):
        real = getattr(pq, name)
        monkeypatch.setattr(
            pq, name, lambda source, *a, real=real, **k: reads.append(source) or real(source, *a, **k)
        )
    assert hub.validate_run(run) == []
    assert n_shards == 2 and len(reads) == n_shards


def test_dry_run_lists_exactly_the_files_and_sends_nothing(run, fake_hub, monkeypatch, capsys):
    server = fake_hub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    before = _snapshot(run)
    assert _cli_publish(_args(run, dry_run=True)) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ")]
    assert listed == [
        "README.md",
        "stats.json",
        "recipe.json",
        "figures/correct_rate.png",
        "figures/pairs_per_source.png",
        "figures/pass_rate.png",
        "figures/response_lengths.png",
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ]
    assert [rel for rel, _ in hub.upload_plan(run)] == listed
    assert f"{server.url}/datasets/me/demo" in out
    assert "token: found (HF_TOKEN)" in out and "Nothing was uploaded" in out
    assert "samples/" not in out and "rejects/" not in out
    _assert_no_token(out)
    assert server.requests == []
    assert _snapshot(run) == before


def _edit(path: Path, old: str, new: str):
    path.write_text(path.read_text().replace(old, new))


def _drop_column(path: Path):
    table = pq.read_table(path).drop_columns(["cut_ratio"])
    pq.write_table(table, path)


def _retype_column(path: Path):
    table = pq.read_table(path)
    i = table.schema.get_field_index("chosen_index")
    column = table["chosen_index"].cast(pa.int32())
    pq.write_table(table.set_column(i, pa.field("chosen_index", pa.int32()), column), path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda r: (r / "data" / "train-00001-of-00002.parquet").unlink(),
            "shard listed in stats.json is missing",
        ),
        (
            lambda r: shutil.copy(
                r / "data" / "train-00000-of-00002.parquet", r / "data" / "train-00000-of-00003.parquet"
            ),
            "not listed in stats.json",
        ),
        (
            lambda r: _drop_column(r / "data" / "train-00000-of-00002.parquet"),
            "column 'cut_ratio' is missing",
        ),
        (
            lambda r: _retype_column(r / "data" / "train-00001-of-00002.parquet"),
            "column 'chosen_index' is int32, expected int64",
        ),
        (lambda r: (r / "README.md").unlink(), "README.md: missing"),
        (lambda r: _edit(r / "README.md", "num_examples: 24", "num_examples: 30"), "the shards hold 24 rows"),
        (
            lambda r: _edit(r / "stats.json", '"format": 6', '"format": 7'),
            "stats.json counts 25 pairs, the shards hold 24",
        ),
        (lambda r: (r / "recipe.json").unlink(), "recipe.json: missing"),
    ],
    ids=[
        "missing-shard",
        "stale-shard",
        "missing-column",
        "wrong-type",
        "no-card",
        "card-mismatch",
        "count-mismatch",
        "no-recipe",
    ],
)
def test_refuses_a_broken_run_before_any_network_call(run, fake_hub, monkeypatch, capsys, damage, message):
    server = fake_hub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    damage(run)
    before = _snapshot(run)
    assert _cli_publish(_args(run)) == errors.REFUSED
    err = capsys.readouterr().err
    assert "refusing to publish" in err and message in err and "Nothing was uploaded" in err
    assert server.requests == []
    assert _snapshot(run) == before


def test_refuses_a_run_without_pairs(run, fake_hub, monkeypatch, capsys):
    server = fake_hub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    stats = json.loads((run / "stats.json").read_text())
    for rel in stats["shards"]:
        pq.write_table(pa.Table.from_pylist([], schema=records.PAIR_SCHEMA), run / rel)
    stats["totals"]["pairs"] = {t: 0 for t in records.PAIR_TYPES}
    (run / "stats.json").write_text(json.dumps(stats))
    assert _cli_publish(_args(run)) == errors.REFUSED
    assert "nothing to publish" in capsys.readouterr().err
    assert server.requests == []


def test_rejects_a_malformed_repo_id(run, capsys):
    assert _cli_publish(_args(run, repo_id="no-namespace")) == errors.REFUSED
    assert "user/name" in capsys.readouterr().err


def test_missing_token_fails_cleanly(run, fake_hub, monkeypatch, capsys):
    server = fake_hub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN")
    before = _snapshot(run)
    assert _cli_publish(_args(run)) == errors.AUTH
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "HF_TOKEN" in err
    assert server.requests == []
    assert _snapshot(run) == before


def test_rejected_token_fails_cleanly_and_is_never_shown(run, fake_hub, monkeypatch, capsys, caplog):
    server = fake_hub()  # answers 401 to everything
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    before = _snapshot(run)
    with caplog.at_level("DEBUG"):
        code = _cli_publish(_args(run))
    out, err = capsys.readouterr()
    assert code == errors.AUTH
    assert "rejected the token (HTTP 401)" in err and server.url in err
    _assert_no_token(out, err, caplog.text)
    # the token did go to the server, in the header, and offline mode did not stop the call...
    assert server.hub_requests()[0][:3] == ("GET", "/api/whoami-v2", f"Bearer {TOKEN}")
    assert [r[1] for r in server.hub_requests()] == ["/api/whoami-v2"]  # ...and nothing after it
    assert constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"  # restored
    assert _snapshot(run) == before


def test_unreachable_endpoint_fails_cleanly(run, monkeypatch, capsys):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    before = _snapshot(run)
    assert _cli_publish(_args(run)) == errors.NETWORK
    out, err = capsys.readouterr()
    assert f"cannot reach the Hub at {endpoint}" in err
    _assert_no_token(out, err)
    assert _snapshot(run) == before


def test_a_card_the_hub_rejects_is_not_uploaded(run, fake_hub, monkeypatch, capsys):
    server = fake_hub(
        {
            ("GET", "/api/whoami-v2"): (200, {"name": "me", "type": "user"}),
            ("POST", "/api/validate-yaml"): (400, '"license" must be one of [apache-2.0, mit, ...]'),
        }
    )
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    assert _cli_publish(_args(run)) == errors.REFUSED
    err = capsys.readouterr().err
    assert "the Hub rejected the card" in err and '"license" must be one of' in err
    assert [r[1] for r in server.hub_requests()] == ["/api/whoami-v2", "/api/validate-yaml"]
    sent = json.loads(server.hub_requests()[1][3])
    assert sent["repoType"] == "dataset" and sent["content"] == (run / "README.md").read_text()


def test_publish_creates_the_repo_and_uploads_the_plan(run, fake_hub, monkeypatch, capsys):
    from huggingface_hub import HfApi

    server = fake_hub(
        {
            ("GET", "/api/whoami-v2"): (200, {"name": "me", "type": "user"}),
            ("POST", "/api/validate-yaml"): (200, ""),
        }
    )
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    calls = []

    def record(name, result=None):
        def method(self, *args, **kwargs):
            assert constants.HF_HUB_OFFLINE is False  # offline mode is lifted for the Hub calls
            calls.append((name, args, kwargs))
            return result

        return method

    monkeypatch.setattr(HfApi, "create_repo", record("create_repo"))
    monkeypatch.setattr(HfApi, "repo_info", record("repo_info", argparse.Namespace(private=True)))
    monkeypatch.setattr(HfApi, "create_branch", record("create_branch"))
    monkeypatch.setattr(HfApi, "upload_folder", record("upload_folder"))
    assert _cli_publish(_args(run, private=True, revision="v1")) == errors.OK
    out, err = capsys.readouterr()
    assert f"{server.url}/datasets/me/demo/tree/v1" in out
    _assert_no_token(out, err)
    names = [c[0] for c in calls]
    assert names == ["create_repo", "repo_info", "create_branch", "upload_folder"]
    assert calls[0][1] == ("me/demo",) and calls[0][2] == dict(
        repo_type="dataset", private=True, exist_ok=True
    )
    assert calls[2][2] == dict(branch="v1", repo_type="dataset", exist_ok=True)
    upload = calls[3][2]
    assert (
        upload["repo_type"] == "dataset" and upload["revision"] == "v1" and Path(upload["folder_path"]) == run
    )
    assert upload["allow_patterns"] == [rel for rel, _ in hub.upload_plan(run)]
    assert upload["delete_patterns"] == ["data/*.parquet", "figures/*.png"]
    assert "24 MMPR pairs" in upload["commit_message"]
    assert constants.HF_HUB_OFFLINE is True


def test_cli_with_a_bad_token_in_a_fresh_process(run, fake_hub, tmp_path):
    """The real command line, with HF_HUB_OFFLINE=1 read at import time as the Makefile sets it."""
    server = fake_hub()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=server.url,
        HF_TOKEN=TOKEN,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        PYTHONPATH=str(ROOT),
    )
    r = subprocess.run(
        [sys.executable, "-m", "mmpr_pipeline.cli", "-v", "publish", str(run), "--repo-id", "me/demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == errors.AUTH, r.stderr
    assert "rejected the token" in r.stderr
    _assert_no_token(r.stdout, r.stderr)
    assert [q[1] for q in server.hub_requests()] == ["/api/whoami-v2"]


def test_the_preview_is_uploaded_when_the_build_wrote_one(run):
    """The card links to preview.html: publishing must take it along (and not fail without one)."""
    assert "preview.html" not in [rel for rel, _ in hub.upload_plan(run)]
    (run / "preview.html").write_text("<!doctype html><title>preview</title>")
    rels = [rel for rel, _ in hub.upload_plan(run)]
    assert rels[:4] == ["README.md", "stats.json", "recipe.json", "preview.html"]
