"""Publish a run folder to the Hugging Face Hub as a dataset repo: `mmpr publish RUN_DIR --repo-id user/name`.
RUN_DIR may be on object storage (`s3://bucket/prefix`): it is checked there, and the files to upload
are copied to a temporary local folder for the upload.

What goes up: the card (README.md) and its figures, the pair shards, stats.json and recipe.json. The
samples and rejects stay local (they are audit material, and hold every image again).

Order of work, so that nothing is half-done:
1. check the run folder locally (shards present and listed, schema, row counts, card) - no network;
2. find a token; ask the Hub who it belongs to (a bad token or an unreachable endpoint stops here);
3. let the Hub validate the card's YAML;
4. create the repo (and branch) if missing, then upload with `upload_folder`, which commits in
   batches and resumes when re-run (files already on the Hub are skipped).
Nothing is ever written to the run folder. The token is never printed: while publishing, everything
written to stdout, stderr or a log handler goes through `redact` (a server may echo it back, e.g. as
the user name).

Nothing waits for ever: every request has a bound on connecting, on each read and write, and on its
whole answer once the first byte arrived (`MMPR_HUB_TIMEOUT`, default 60 s); idempotent calls (who
am I, card check, repo and branch creation with exist_ok) are retried with exponential backoff
(`MMPR_HUB_RETRIES` attempts, first wait `MMPR_HUB_BACKOFF` s) on timeouts, network errors, 408,
429 and 5xx. `upload_folder` is not retried as a whole: re-running the command resumes it.
Transfers that go through `hf_xet` (Rust) use that library's own bounds (HF_XET_CLIENT_CONNECT_TIMEOUT,
HF_XET_CLIENT_READ_TIMEOUT, HF_XET_CLIENT_RETRY_MAX_DURATION; its shard upload has no read timeout).

`HF_HUB_OFFLINE=1` (the Makefile's and the CLI's default) makes `huggingface_hub` refuse every
request; it reads the variable once, at import, into `constants.HF_HUB_OFFLINE`. Publishing is the
one command that must go online, so it lifts offline mode for its own calls only (`_online`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from mmpr_pipeline import card as card_mod
from mmpr_pipeline.errors import AUTH, NETWORK, OK, PublishError
from mmpr_pipeline.hub_net import bounded_session, net_settings, redact, redacting, with_retries
from mmpr_pipeline.records import PAIR_SCHEMA, PAIR_TYPES
from mmpr_pipeline.storage import ObjectPath, as_path, download

UPLOAD_FILES = ("README.md", "stats.json", "recipe.json")
OPTIONAL_UPLOAD_FILES = ("preview.html",)  # the card links to it when the build wrote one
# Remote files an earlier, bigger build may have left: removed in the same commit unless re-uploaded,
# so the card's `data/train-*` never matches a stale shard.
DELETE_PATTERNS = ["data/*.parquet", "figures/*.png"]
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")

# --- local checks ------------------------------------------------------------------------------


def _schema_problems(rel: str, schema) -> list[str]:
    got = {f.name: f.type for f in schema}
    want = {f.name: f.type for f in PAIR_SCHEMA}
    problems = [f"{rel}: column {n!r} is missing" for n in want if n not in got]
    problems += [f"{rel}: unexpected column {n!r}" for n in got if n not in want]
    problems += [
        f"{rel}: column {n!r} is {got[n]}, expected {want[n]}" for n in want if n in got and got[n] != want[n]
    ]
    if not problems and [f.name for f in schema] != [f.name for f in PAIR_SCHEMA]:
        problems.append(f"{rel}: columns are not in the order of the pair schema")
    return problems


def validate_run(run_dir: str | Path) -> list[str]:
    """Everything wrong with a run folder (local or on S3) that would make a broken or misleading Hub
    dataset."""
    run_dir = as_path(run_dir)
    if not run_dir.is_dir():
        return [f"{run_dir}: no such folder"]
    try:
        run = card_mod.read_run(run_dir)
    except card_mod.CardError as e:
        return [str(e)]
    except Exception as e:  # an unreadable Parquet footer
        return [f"{run_dir}: a pair shard cannot be read: {e}"]
    problems = []
    shards = [p.relative_to(run_dir).as_posix() for p in run["shards"]]
    if not shards:
        problems.append(f"{run_dir / 'stats.json'}: lists no shards: nothing to publish")
    for i, (rel, schema) in enumerate(zip(shards, run["shard_schemas"])):
        m = card_mod.SHARD_NAME.match(rel)
        if (int(m.group(1)), int(m.group(2))) != (i, len(shards)):
            problems.append(
                f"{rel}: expected data/train-{i:05d}-of-{len(shards):05d}.parquet at position {i}"
            )
        problems += _schema_problems(rel, schema)
    for path in sorted((run_dir / "data").glob("*.parquet")):
        rel = path.relative_to(run_dir).as_posix()
        if rel not in shards:
            problems.append(
                f"{rel}: not listed in stats.json (left by an interrupted or older build?); "
                "remove it or rebuild"
            )
    totals = (run["stats"].get("totals") or {}).get("pairs") or {}
    expected_rows = sum(int(totals.get(t, 0)) for t in PAIR_TYPES)
    if expected_rows != run["num_rows"]:
        problems.append(f"stats.json counts {expected_rows} pairs, the shards hold {run['num_rows']}")
    elif run["num_rows"] == 0:
        problems.append("the run has no pairs: nothing to publish")
    if problems:  # the card is checked against the shards; no use while they are broken
        return problems
    return card_mod.check_card(run_dir, run)  # the footers read above, not a second time


def upload_plan(run_dir: str | Path) -> list[tuple[str, int]]:
    """(path in repo, bytes) of every file `publish` uploads, in upload order."""
    run_dir = as_path(run_dir)
    stats = json.loads((run_dir / "stats.json").read_text())
    optional = [name for name in OPTIONAL_UPLOAD_FILES if (run_dir / name).is_file()]
    rels = list(UPLOAD_FILES) + optional + sorted(card_mod.FIGURES.values()) + list(stats["shards"])
    return [(rel, (run_dir / rel).stat().st_size) for rel in rels]


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# --- talking to the Hub ------------------------------------------------------------------------


@contextlib.contextmanager
def _online():
    """Lift HF_HUB_OFFLINE for this process's Hub calls, and put it back afterwards."""
    from huggingface_hub import constants

    from mmpr_pipeline.env_vars import env_var

    saved_const = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        with env_var("HF_HUB_OFFLINE", "0"):
            yield
    finally:
        constants.HF_HUB_OFFLINE = saved_const


def _token_source(token: str | None) -> tuple[str | None, str]:
    """The token to use and where it came from (never the token itself)."""
    if token:
        return token, "given"
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        return None, "none"
    env = (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "").strip()
    return found, ("HF_TOKEN" if env and env == found else "the stored login")


def _explain(e: Exception, endpoint: str, repo_id: str, token: str | None) -> PublishError:
    """A user-facing error for an exception raised by a Hub call."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            return PublishError(
                f"the Hub at {endpoint} rejected the token (HTTP 401): it is invalid, expired or "
                "revoked. Set HF_TOKEN to a valid token or run `hf auth login`.",
                AUTH,
            )
        if status == 403:
            return PublishError(
                f"the token may not write to dataset {repo_id} (HTTP 403): use a token with "
                "write access to that user or organization.",
                AUTH,
            )
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return PublishError(redact(f"the Hub at {endpoint} answered HTTP {status}: {detail}", token), NETWORK)
    if isinstance(e, httpx2.TimeoutException):
        return PublishError(
            redact(
                f"the Hub at {endpoint} did not answer in time ({type(e).__name__}: {e}). "
                "Check the network, or allow more with MMPR_HUB_TIMEOUT (seconds).",
                token,
            ),
            NETWORK,
        )
    if isinstance(e, (httpx2.TransportError, OSError)):
        return PublishError(
            redact(
                f"cannot reach the Hub at {endpoint} ({type(e).__name__}: {e}). Check the "
                "network, or HF_ENDPOINT if you use a mirror.",
                token,
            ),
            NETWORK,
        )
    return PublishError(redact(f"publishing failed: {type(e).__name__}: {e}", token), NETWORK)


def _validate_card_remote(endpoint: str, text: str) -> str | None:
    """The Hub's own check of the card YAML (license ids, task ids...); returns its complaint, if any."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    r = get_session().post(
        f"{endpoint}/api/validate-yaml",
        json={"repoType": "dataset", "content": text},
        headers={"Accept": "text/plain"},
    )
    if r.status_code == 400:
        return r.text.strip() or "invalid YAML metadata"
    if r.status_code in (404, 405, 501):  # a mirror without the validation endpoint: local checks stand
        print(f"note: {endpoint} does not validate cards; relying on the local checks", file=sys.stderr)
        return None
    hf_raise_for_status(r)
    return None


# --- publish -----------------------------------------------------------------------------------


def _check_locally(run_dir: Path, repo_id: str) -> None:
    """Refuse a malformed repo id or a run folder that fails `validate_run`; no network."""
    if not REPO_ID.match(repo_id or ""):
        raise PublishError(f"--repo-id must look like user/name, got {repo_id!r}")
    problems = validate_run(run_dir)
    if problems:
        raise PublishError(
            "refusing to publish "
            + str(run_dir)
            + ":\n  - "
            + "\n  - ".join(problems)
            + "\nNothing was uploaded."
        )


def _print_dry_run(
    run_dir: Path,
    url: str,
    plan: list[tuple[str, int]],
    *,
    private: bool,
    revision: str | None,
    token: str | None,
    source: str,
) -> None:
    """`--dry-run`: print what would be created, uploaded and deleted, and whether a token was found."""
    print(
        f"Would publish {run_dir} to {url} (branch {revision or 'main'}, "
        f"{'private' if private else 'public unless the repo exists'})"
    )
    print("  create the dataset repo if missing")
    print(f"  upload {len(plan)} files, {_size(sum(n for _, n in plan))}:")
    width = max(len(rel) for rel, _ in plan)
    for rel, n in plan:
        print(f"    {rel:<{width}}  {_size(n):>9}")
    print(f"  delete remote files matching {', '.join(DELETE_PATTERNS)} that are not in this upload")
    print(
        "token: "
        + (
            f"found ({source})"
            if token
            else "none found: set HF_TOKEN or run `hf auth login` before publishing"
        )
    )
    print("Nothing was uploaded (--dry-run).")


def _log_in(api, retried, endpoint: str, repo_id: str, token: str, source: str) -> None:
    """Ask the Hub who the token belongs to: a bad token or an unreachable endpoint stops here."""
    try:
        user = retried("asking the Hub who the token belongs to", api.whoami)["name"]
        print(redact(f"Logged in to {endpoint} as {user} (token from {source}).", token), file=sys.stderr)
    except Exception as e:
        raise _explain(e, endpoint, repo_id, token) from None


def _check_card_on_hub(
    retried, endpoint: str, repo_id: str, run_dir: Path, card_text: str, token: str
) -> None:
    """Let the Hub validate the card's YAML; refuse to upload a card it rejects."""
    try:
        complaint = retried("the Hub's check of the card", lambda: _validate_card_remote(endpoint, card_text))
    except Exception as e:
        raise _explain(e, endpoint, repo_id, token) from None
    if complaint:
        raise PublishError(
            f"the Hub rejected the card {run_dir / 'README.md'}: {redact(complaint, token)}"
            "\nFix the recipe's card settings and rebuild. Nothing was uploaded."
        )


def _create_repo(api, retried, repo_id: str, *, private: bool, revision: str | None) -> None:
    """Create the dataset repo (and branch) if missing; warn when --private meets a public repo."""
    retried(
        "creating the repo",
        lambda: api.create_repo(
            repo_id, repo_type="dataset", private=True if private else None, exist_ok=True
        ),
    )
    if (
        private
        and not retried(
            "reading the repo's settings", lambda: api.repo_info(repo_id, repo_type="dataset")
        ).private
    ):
        print(
            f"warning: {repo_id} already exists and is public; --private does not change an "
            "existing repo (change it in the repo's settings).",
            file=sys.stderr,
        )
    if revision:
        retried(
            "creating the branch",
            lambda: api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True),
        )


@contextlib.contextmanager
def _local_folder(run_dir, plan: list[tuple[str, int]]):
    """The folder `upload_folder` reads: the run folder itself, or for a run on object storage its
    planned files copied to a temporary local folder (removed after the upload)."""
    if not isinstance(run_dir, ObjectPath):
        yield run_dir
        return
    print(f"Copying {len(plan)} files ({_size(sum(n for _, n in plan))}) from {run_dir} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="mmpr-publish-") as folder:
        download(run_dir, [rel for rel, _ in plan], folder)
        yield Path(folder)


def _upload(
    api,
    run_dir: Path,
    repo_id: str,
    *,
    revision: str | None,
    plan: list[tuple[str, int]],
    url: str,
    n_pairs: int,
    stats: dict,
) -> None:
    """One `upload_folder` of the planned files; stale remote shards and figures go in the same commit."""
    print(f"Uploading {len(plan)} files ({_size(sum(n for _, n in plan))}) to {url} ...", file=sys.stderr)
    api.upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=run_dir,
        revision=revision,
        allow_patterns=[rel for rel, _ in plan],
        delete_patterns=DELETE_PATTERNS,
        commit_message=f"Upload {n_pairs} MMPR pairs (recipe {stats.get('recipe')}, "
        f"fingerprint {stats.get('fingerprint')})",
    )


def publish(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload a run folder to the dataset repo `repo_id`; return the repo's URL ('' on a dry run).

    Raises PublishError (with the exit code) on refusal, missing or rejected token, or Hub failure.
    """
    run_dir = as_path(run_dir)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    _check_locally(run_dir, repo_id)
    plan = upload_plan(run_dir)
    settings = net_settings()
    url = f"{endpoint}/datasets/{repo_id}" + (f"/tree/{revision}" if revision else "")
    token, source = _token_source(token)
    if dry_run:
        _print_dry_run(run_dir, url, plan, private=private, revision=revision, token=token, source=source)
        return ""
    if not token:
        raise PublishError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write "
            "access). Nothing was uploaded.",
            AUTH,
        )
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token, library_name="mmpr-pipeline")
    stats = json.loads((run_dir / "stats.json").read_text())
    n_pairs = sum(int(v) for v in stats["totals"]["pairs"].values())
    card_text = (run_dir / "README.md").read_text(encoding="utf-8")

    def retried(what, call):
        return with_retries(what, call, settings, token)

    with redacting(token), _online(), bounded_session(settings):
        _log_in(api, retried, endpoint, repo_id, token, source)
        _check_card_on_hub(retried, endpoint, repo_id, run_dir, card_text, token)
        try:
            _create_repo(api, retried, repo_id, private=private, revision=revision)
            with _local_folder(run_dir, plan) as folder:
                _upload(
                    api, folder, repo_id, revision=revision, plan=plan, url=url, n_pairs=n_pairs, stats=stats
                )
        except Exception as e:
            err = _explain(e, endpoint, repo_id, token)
            err.args = (f"{err}\nRe-run the same command to resume: files already on the Hub are skipped.",)
            raise err from None
    print(url)
    return url


def cli_publish(args) -> int:
    """`mmpr publish RUN_DIR --repo-id user/name [--private] [--revision BRANCH] [--dry-run]`."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # one INFO line per HTTP request otherwise
        logging.getLogger("httpx2").setLevel(logging.WARNING)
    publish(args.run_dir, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run)
    return OK
