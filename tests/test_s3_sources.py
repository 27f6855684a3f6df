"""Sources on object storage, against a real S3 server (moto's, on 127.0.0.1; conftest's s3_server).

The demo recipe's generated sources are written out as files (two Parquet files read through a glob,
JSON Lines naming image files, a `datasets` save_to_disk folder) and uploaded; read from S3 they give
the same questions as the generated rows, and a build from them the same samples and pairs as the
session's shared build (tests/_shared_build.py) gives those questions from the generated sources.
Errors (no bucket, no object, a glob matching nothing, refused keys, a closed or silent endpoint) name
the source and the URL and come back in seconds.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from _shared_build import SHAPES_FAMILIES, SOURCES, TALLY, shared_build

from mmpr_pipeline import errors, run_folder, storage, tasks
from mmpr_pipeline import recipe as recipe_mod
from mmpr_pipeline.config import ConfigError
from mmpr_pipeline.sources import SourceError, source_inputs
from stages.load import load_source

REPO = Path(__file__).resolve().parent.parent
BUCKET = "mmpr-test"
COLUMNS = ("image", "question", "answer", "answer_type", "options", "task")
LIMITS = {"shapes": 4, "describe": 2, "tally": 2}  # rows: two Parquet files of two rows


def demo_data(limits: dict = LIMITS) -> dict:
    """The demo recipe, small, plus a third generated source (so each file loader has one source): the
    sampling settings of the shared build, whose sources hold these rows first (a generated source's
    rows are by index, a question's id by its content)."""
    data = yaml.safe_load((REPO / "data_cards" / "demo.yaml").read_text())
    data["sources"][0]["generator"]["families"] = SHAPES_FAMILIES
    data["sources"].append(dict(TALLY))
    for source in data["sources"]:
        source["limit"] = limits[source["name"]]
    data["sampling"].update(n=4, max_tokens=48)
    data.update(unit_size=4, batch_size=8)
    return data


def _rows(data: dict, name: str) -> list[dict]:
    source = next(s for s in data["sources"] if s["name"] == name)
    return [{c: r[c] for c in COLUMNS} for r in tasks.generate(source["limit"], **source["generator"])]


def write_sources(data: dict, root: Path) -> None:
    """The generated rows of the three sources as files under root: shapes as two Parquet files (and a
    file of another kind and a nested Parquet file, which the glob must not take), describe as JSON
    Lines naming PNG files relative to it, tally as a `datasets` save_to_disk folder."""
    import datasets

    shapes = _rows(data, "shapes")
    (root / "shapes" / "old").mkdir(parents=True)
    half = len(shapes) // 2
    for i, part in enumerate((shapes[:half], shapes[half:])):
        pq.write_table(pa.Table.from_pylist(part), root / "shapes" / f"part-{i}.parquet")
    pq.write_table(pa.Table.from_pylist(shapes[:1]), root / "shapes" / "old" / "part-9.parquet")
    (root / "shapes" / "README.txt").write_text("not a Parquet file")
    (root / "describe" / "img").mkdir(parents=True)
    lines = []
    for i, row in enumerate(_rows(data, "describe")):
        (root / "describe" / "img" / f"{i}.png").write_bytes(row.pop("image"))
        lines.append(json.dumps(dict(row, image=f"img/{i}.png")) + "\n")
    (root / "describe" / "rows.jsonl").write_text("".join(lines))
    datasets.Dataset.from_list(_rows(data, "tally")).save_to_disk(str(root / "tally"))


def as_files(data: dict, base: str) -> dict:
    """`data` with its sources read from the files of write_sources under `base` (a folder or URL)."""
    data = json.loads(json.dumps(data))
    paths = {
        "shapes": ("parquet", f"{base}/shapes/*.parquet"),
        "describe": ("jsonl", f"{base}/describe/rows.jsonl"),
        "tally": ("hf_disk", f"{base}/tally"),
    }
    for source in data["sources"]:
        source["loader"], source["path"] = paths[source["name"]]
        del source["generator"]
        if source.get("pipeline", "correctness") == "correctness":
            source["fields"] = {"answer_type": "answer_type", "options": "options"}
    return data


@pytest.fixture(scope="module")
def uploaded(s3_server, tmp_path_factory):
    """(demo data, local folder of its sources, their URL prefix): the folder uploaded to S3, where
    rows.jsonl names one image by its full s3:// URL and one through '..' (both the same files)."""
    _, fs = s3_server
    data = demo_data()
    root = tmp_path_factory.mktemp("sources")
    write_sources(data, root)
    fs.create_dir(BUCKET)
    pafs.copy_files(str(root), f"{BUCKET}/demo", destination_filesystem=fs)
    url = f"s3://{BUCKET}/demo"
    lines = (root / "describe" / "rows.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    rows[0]["image"] = f"{url}/describe/img/0.png"
    rows[1]["image"] = "../describe/img/1.png"
    with fs.open_output_stream(f"{BUCKET}/demo/describe/rows.jsonl") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    return data, root, url


def _recipe(data: dict):
    return recipe_mod.from_dict(data, "s3-test.yaml")


def _source(path: str, loader: str = "parquet", **extra):
    return recipe_mod.Source(name="src", loader=loader, path=path, answer_type="text", **extra)


# -- pure logic: URLs, the endpoint, recipe validation ----------------------------------------------


def test_urls_and_keys_relative_to_an_object():
    assert storage.split_url("s3://bkt/a/b.jsonl") == ("bkt", "a/b.jsonl")
    assert storage.parent("s3://bkt/a/b.jsonl") == "s3://bkt/a"
    assert storage.join("s3://bkt/a", "img/1.png") == "s3://bkt/a/img/1.png"
    assert storage.join("s3://bkt/a/b", "../img/1.png") == "s3://bkt/a/img/1.png"
    assert storage.join("s3://bkt/a", "s3://other/x.png") == "s3://other/x.png"
    assert storage.join("/data/a", "s3://other/x.png") == "s3://other/x.png"  # local JSON Lines, S3 image
    assert storage.join("/data/a", "img/1.png") == "/data/a/img/1.png"
    assert storage.join("/data/a", "/abs/1.png") == "/abs/1.png"
    for bad, why in [
        ("gs://bkt/x", "unsupported URL scheme 'gs://'"),
        ("s3:///x.parquet", "names no bucket"),
        ("s3://bk*/x.parquet", "a bucket name cannot be a pattern"),
        ("s3://My_Bucket/x", "not a valid bucket name"),
    ]:
        assert why in storage.url_problem(bad)
        with pytest.raises(ConfigError, match=r"r\.yaml: sources\[0\]\.path: .*" + why.split("'")[0]):
            recipe_mod.from_dict(
                {
                    "name": "x",
                    "sources": [{"name": "a", "loader": "parquet", "path": bad, "answer_type": "text"}],
                },
                "r.yaml",
            )
    assert storage.url_problem("s3://bkt/images/*.parquet") is None


def test_endpoint_from_the_aws_environment(monkeypatch):
    for name in storage.ENDPOINT_VARS + ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert "endpoint_override" not in storage.s3_options()  # AWS itself
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://minio.example:9000")
    opts = storage.s3_options()
    assert (opts["endpoint_override"], opts["scheme"]) == ("minio.example:9000", "https")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001/")  # the S3-specific one wins
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    opts = storage.s3_options()
    assert (opts["endpoint_override"], opts["scheme"], opts["region"]) == (
        "127.0.0.1:9001",
        "http",
        "eu-west-3",
    )
    assert opts["connect_timeout"] and opts["request_timeout"] and opts["retry_strategy"].max_attempts
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "127.0.0.1:9001")
    with pytest.raises(
        storage.StorageError, match=r"AWS_ENDPOINT_URL_S3='127\.0\.0\.1:9001': expected http://"
    ):
        storage.s3_options()


# -- reading from the S3 server, in this process --------------------------------------------------


def test_s3_sources_read_the_same_questions_as_the_generated_rows(uploaded):
    """Each loader from S3 (and from the same files on disk) gives exactly the generated source's
    questions: the same qids, images, texts and answers, in order."""
    data, root, url = uploaded
    generated = _recipe(data)
    on_disk, on_s3 = _recipe(as_files(data, str(root))), _recipe(as_files(data, url))
    assert source_inputs(on_s3.sources[0]) == [f"{url}/shapes/part-0.parquet", f"{url}/shapes/part-1.parquet"]
    for gen, disk, s3 in zip(generated.sources, on_disk.sources, on_s3.sources):
        want, rejects, _ = load_source(gen, 4)
        assert len(want) == LIMITS[gen.name] and not rejects
        for source in (disk, s3):
            got, rejects, _ = load_source(source, 4)
            assert not rejects, rejects
            assert [{k: q[k] for k in q if k not in ("unit", "unit_plan")} for q in got] == [
                {k: q[k] for k in q if k not in ("unit", "unit_plan")} for q in want
            ], (source.loader, source.path)


def test_preflight_streams_an_s3_hf_disk_folder_without_copying_it(uploaded, monkeypatch):
    """The driver's preflight reads the first rows; a folder on S3 is not copied to the driver for it."""
    from mmpr_pipeline.preflight import check_sources_give_questions
    from mmpr_pipeline.sources import read_rows, to_question

    data, _, url = uploaded
    monkeypatch.setattr(storage, "local_copy", lambda url: pytest.fail(f"the driver copied {url}"))
    recipe, generated = _recipe(as_files(data, url)), _recipe(data)
    check_sources_give_questions(recipe)
    for s3, gen in zip(recipe.sources, generated.sources):
        assert [to_question(r, s3, i) for i, r in enumerate(read_rows(s3))] == [
            to_question(r, gen, i) for i, r in enumerate(read_rows(gen))
        ]


def test_missing_bucket_object_and_glob_name_the_source_and_url(uploaded):
    _, _, url = uploaded
    cases = [
        ("s3://no-such-bucket/demo/*.parquet", "parquet", "the bucket 'no-such-bucket' does not exist"),
        ("s3://no-such-bucket/rows.jsonl", "jsonl", "the bucket 'no-such-bucket' does not exist"),
        (f"{url}/describe/nope.jsonl", "jsonl", "no such object or folder"),
        (f"{url}/shapes/*.parket", "parquet", None),
        (f"{url}/*/part-9.parquet", "parquet", None),  # '*' stays within one level, as in glob.glob
    ]
    for path, loader, reason in cases:
        if reason:
            message = f"source 'src': {path}: {reason}"
        else:
            message = f"source 'src': no Parquet files at {path!r}"
        with pytest.raises(SourceError, match=re.escape(message)):
            source_inputs(_source(path, loader))
    assert source_inputs(_source(f"{url}/*/old/part-9.parquet")) == [f"{url}/shapes/old/part-9.parquet"]
    with pytest.raises(
        SourceError, match=f"source 'src' \\(hf_disk: {url}/nope\\) cannot be opened.*no such folder"
    ):
        from mmpr_pipeline.sources import scan_input

        scan_input(_source(f"{url}/nope", "hf_disk"), "", None, 4)


def test_missing_image_object_sets_the_row_aside_naming_its_url(uploaded, s3_server):
    _, fs = s3_server
    _, _, url = uploaded
    rows = [
        dict(image="img/0.png", question="Describe this image.", answer="a"),
        dict(image="img/9.png", question="And this?", answer="b"),
    ]
    with fs.open_output_stream(f"{BUCKET}/demo/describe/missing.jsonl") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    questions, rejects, _ = load_source(_source(f"{url}/describe/missing.jsonl", "jsonl"), 4)
    assert len(questions) == 1 and len(rejects) == 1
    assert rejects[0]["reason"] == f"unreadable image ({url}/describe/img/9.png: no such object)"


def test_refused_credentials_name_the_source_and_url(uploaded, s3_server):
    endpoint, _ = s3_server
    _, _, url = uploaded

    def auth(count: str) -> None:  # moto checks keys only after this many requests
        urllib.request.urlopen(
            urllib.request.Request(
                f"{endpoint}/moto-api/reset-auth", count.encode(), {"Content-Type": "text/plain"}
            )
        )

    auth("0")
    try:
        with pytest.raises(
            SourceError,
            match=re.escape(f"source 'src': {url}/shapes/*.parquet: When listing")
            + ".*INVALID_ACCESS_KEY_ID.*"
            + re.escape("(keys from the AWS environment: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ):
            source_inputs(_source(f"{url}/shapes/*.parquet"))
    finally:
        auth("inf")


@pytest.mark.parametrize("silent", [False, True], ids=["closed port", "silent server"])
def test_unreachable_endpoint_fails_in_seconds_naming_the_url(monkeypatch, silent):
    """A closed port fails at once; a server that accepts and never answers fails after the read
    timeout (shortened here) and the bounded retries: never a hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if silent:
        listener.listen(8)
        held = []
        threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()
    else:
        listener.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(storage, "REQUEST_TIMEOUT", 1.0)
    monkeypatch.setattr(storage, "CONNECT_TIMEOUT", 1.0)
    errors = []

    def read():
        try:
            source_inputs(_source("s3://mmpr-test/demo/rows.jsonl", "jsonl"))
        except SourceError as e:
            errors.append(str(e))

    started = time.monotonic()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "reading from an unreachable endpoint hangs"
    assert len(errors) == 1 and errors[0].startswith("source 'src': s3://mmpr-test/demo/rows.jsonl: ")
    assert ("Timeout" if silent else "Could not connect") in errors[0]
    assert errors[0].endswith(f"(endpoint AWS_ENDPOINT_URL_S3=http://127.0.0.1:{port})")
    print(f"failed after {time.monotonic() - started:.1f} s")
    listener.close()


# -- a build on Ray workers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_with_s3(s3_server, ray_local):
    """Ray's workers with the S3 server's environment: a Ray started before the server (by an earlier
    test file in this process) is started again, as a user starts Ray after setting the variables."""
    import ray
    from conftest import start_ray

    def seen() -> str | None:
        return ray.get(ray.remote(num_cpus=0)(lambda: os.environ.get("AWS_ENDPOINT_URL_S3")).remote())

    if seen() != s3_server[0]:
        ray.shutdown()
        start_ray()
    assert seen() == s3_server[0]
    return ray


def test_a_source_that_fails_on_a_worker_is_one_line_naming_it(ray_with_s3, uploaded, s3_server):
    """The scan runs on a Ray worker (here: an hf_disk folder whose state.json is not JSON, which only
    a worker reading the S3 server finds out): its error reaches the user as one line naming the
    recipe, the source and the URL (no Ray traceback)."""
    from mmpr_pipeline.pipeline import plan_units

    _, fs = s3_server
    _, _, url = uploaded
    for name, text in (("dataset_info.json", "{}"), ("state.json", "not JSON")):
        with fs.open_output_stream(f"{BUCKET}/demo/broken/{name}") as f:
            f.write(text.encode())
    source = {"name": "tally", "loader": "hf_disk", "path": f"{url}/broken", "answer_type": "text"}
    with pytest.raises(SourceError) as failed:
        plan_units(_recipe({"name": "x", "sources": [source]}))
    assert str(failed.value) == (
        f"s3-test.yaml: source 'tally' (hf_disk: {url}/broken) cannot be opened: "
        "JSONDecodeError: Expecting value: line 1 column 1 (char 0)"
    )


@pytest.fixture(scope="module")
def builds(request, uploaded, ray_with_s3, trained_model, s3_server, tmp_path_factory) -> dict:
    """The demo recipe (small) built from its sources on S3 into a run folder on S3 (`--out s3://...`),
    on the module's Ray; the session's shared build, whose generated sources hold the same questions
    (the reference); and a plain copy of the S3 run on this machine (pyarrow's, no mmpr code), for
    readers to read the same run from both places. Returns the run folders (a storage.ObjectPath, two
    Paths), the S3 build's stats, the S3 recipe's data and the qids of the small generated sources."""
    from mmpr_pipeline import pipeline

    data, _, url = uploaded
    data = dict(data, model=trained_model)
    on_s3 = as_files(data, url)
    s3 = storage.as_path(f"s3://{BUCKET}/runs/s3")
    stats = pipeline.build(_recipe(on_s3), s3)
    shared, _ = shared_build(request, trained_model)
    copy = tmp_path_factory.mktemp("s3-copy") / "run"
    pafs.copy_files(f"{BUCKET}/runs/s3", str(copy), source_filesystem=s3_server[1])
    qids = {q["qid"] for source in _recipe(data).sources for q in load_source(source, 4)[0]}
    return dict(runs=dict(s3=s3, shared=shared, copy=copy), stats=stats, s3_data=on_s3, qids=qids)


@pytest.mark.slow
def test_build_from_s3_sources_equals_the_shared_build(builds):
    """The demo recipe (small) with its sources on S3, scanned and loaded by Ray workers, samples the
    questions of the generated sources and gives the samples and pairs, ids and texts, that the shared
    build gives them from its generated sources."""
    s3, shared, qids = builds["runs"]["s3"], builds["runs"]["shared"], builds["qids"]
    assert set(SOURCES["s3_sources"]) == set(LIMITS) and len(qids) == sum(LIMITS.values())
    samples = {name: _samples(run) for name, run in (("s3", s3), ("shared", shared))}
    assert {r["qid"] for r in samples["s3"]} == qids <= {r["qid"] for r in samples["shared"]}
    assert {r["source"] for r in samples["s3"]} == set(LIMITS)
    assert samples["s3"] == [r for r in samples["shared"] if r["qid"] in qids]
    pairs = {
        name: sorted(_pairs(run), key=lambda p: p["id"]) for name, run in (("s3", s3), ("shared", shared))
    }
    assert len(pairs["s3"]) > 0 and pairs["s3"] == [p for p in pairs["shared"] if p["qid"] in qids]
    for name in LIMITS:
        assert builds["stats"]["sources"][name]["rows"] == LIMITS[name]
        assert builds["stats"]["sources"][name]["rejects"] == 0


@pytest.mark.slow
def test_a_run_folder_on_s3_holds_what_a_local_one_does(builds):
    """`--out s3://...`: the workers and the driver wrote the run's files to S3 (unit files, counts,
    shards, stats.json, card, figures, preview), the kinds of files a local run (the shared build) has,
    nothing else; the build's lock is gone; and only the logs stayed on this machine (no local copy of
    the run)."""
    from mmpr_pipeline.run_status import status
    from mmpr_pipeline.storage import local_twin

    local, s3 = builds["runs"]["shared"], builds["runs"]["s3"]
    shard = re.compile(r"data/train-\d{5}-of-\d{5}\.parquet")

    def files(run) -> tuple[set, set, list]:
        """(the run's files other than unit files and shards, its (kind, source) folders of unit files
        of this file's sources, its shards). Unit and shard counts differ: the shared build has more
        rows and shards of 20 pairs, and a unit never spans two input files (shapes is two Parquet
        files on S3)."""
        rel = [p.relative_to(run) for p in run.rglob("*") if p.is_file()]
        rel = [r for r in rel if r.parts[0] not in ("logs", ".mmpr-lock") or run is s3]
        # the verdict cache of the judge model the shared recipe has (test_judge_stage) and this one not
        rel = [r for r in rel if r.parts[0] != "judge_cache" or run is s3]
        units = {r.parts[:2] for r in rel if r.parts[0] in ("samples", "pairs", "rejects")}
        other = {str(r) for r in rel if r.parts[0] not in ("samples", "pairs", "rejects")}
        shards = sorted(n for n in other if shard.fullmatch(n))
        return other - set(shards), {u for u in units if u[1] in LIMITS or run is s3}, shards

    names, units, shards = files(s3)
    assert (names, units) == files(local)[:2] and shards and files(local)[2]
    assert {"stats.json", "preview.html", "README.md", "recipe.json"} <= names
    assert {n.split("/")[0] for n in names} >= {"figures"}
    assert json.loads((s3 / "stats.json").read_text())["shards"] == builds["stats"]["shards"] == shards
    assert "MMPR demo pairs" in (s3 / "README.md").read_text()
    assert status(s3).finished and status(s3).done == builds["stats"]["resume"]["units"]
    assert [p.name for p in local_twin(s3).iterdir()] == ["logs"]


@pytest.mark.slow
def test_select_and_preview_read_a_run_on_s3(builds, tmp_path):
    """`mmpr select` and `mmpr preview` on the run folder on S3: the same questions selected as from
    its copy on this machine, and the page rewritten in the bucket."""
    from mmpr_pipeline import cli, selection

    runs = builds["runs"]
    chosen = {
        name: selection.select(runs[name], tmp_path / name, band=(0.0, 1.0))["sources"]
        for name in ("s3", "copy")
    }
    assert chosen["s3"] == chosen["copy"] and sum(c["selected"] for c in chosen["s3"].values()) > 0
    (runs["s3"] / "preview.html").unlink()
    assert cli.main(["preview", str(runs["s3"]), "--per-source", "5"]) == 0
    assert "MMPR preview" in (runs["s3"] / "preview.html").read_text()


@pytest.mark.slow
def test_export_and_publish_read_a_run_on_s3(builds, tmp_path, monkeypatch):
    """`mmpr export` on the run folder on S3 writes the pairs its copy on this machine gives; `mmpr
    publish` checks it where it is and uploads its planned files (the copy's names), byte for byte."""
    from huggingface_hub import HfApi

    from mmpr_pipeline import export, hub

    runs = builds["runs"]
    exported = {name: export.export(runs[name], "trl", tmp_path / name) for name in ("s3", "copy")}
    assert exported["s3"]["run_dir"] == str(runs["s3"]) and exported["s3"]["rows"] > 0

    def rows(folder: Path) -> list[tuple]:
        table = pa.concat_tables(pq.read_table(p) for p in sorted((folder / "data").glob("*.parquet")))
        return sorted(zip(*(table.column(c).to_pylist() for c in ("id", "chosen", "rejected", "images"))))

    assert rows(tmp_path / "s3") == rows(tmp_path / "copy")

    assert hub.validate_run(runs["s3"]) == []
    plan = hub.upload_plan(runs["s3"])
    assert [rel for rel, _ in plan] == [rel for rel, _ in hub.upload_plan(runs["copy"])]
    uploaded = {}

    def upload_folder(self, *, folder_path, allow_patterns, **kwargs):
        uploaded.update({rel: (Path(folder_path) / rel).read_bytes() for rel in allow_patterns})

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(hub, "_validate_card_remote", lambda endpoint, text: None)
    monkeypatch.setattr(HfApi, "whoami", lambda self: {"name": "me"})
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    hub.publish(runs["s3"], "me/demo", endpoint="http://127.0.0.1:9")
    assert uploaded == {rel: (runs["s3"] / rel).read_bytes() for rel, _ in plan}


def _pairs(run) -> list[dict]:
    """Every pair of a run folder (local or on S3), in shard order, with the fields that identify it."""
    from mmpr_pipeline import shards

    fields = ("id", "qid", "source", "pair_type", "question", "answer", "chosen", "rejected", "images")
    stats = json.loads((run / "stats.json").read_text())
    rows = [r for rel in stats["shards"] for r in shards.read_file(run / rel).to_pylist()]
    return [{k: r[k] for k in fields} for r in rows]


def _samples(run: Path) -> list[dict]:
    """Every sampled question of a run (all sources, with or without pairs): qid, question, responses."""
    from mmpr_pipeline import shards

    rows = [r for p in shards.unit_files(run) for r in shards.read_file(p).to_pylist()]
    return sorted(({k: r[k] for k in ("qid", "source", "question", "responses")} for r in rows), key=str)


# -- a run folder on S3: its lock, a kill and the resume ----------------------------------------------


def test_a_second_build_on_one_prefix_is_refused(s3_server, uploaded, monkeypatch):
    """The lock object is created with a conditional write (If-None-Match: *): while a build holds the
    prefix, another is refused naming it; a lock left by a build of another machine counts as held until
    it goes unrenewed for STALE_S, then it is taken over (If-Match on its ETag)."""
    import socket

    from mmpr_pipeline import object_lock, pipeline

    run = storage.as_path(f"s3://{BUCKET}/runs/locked")
    recipe = _recipe(as_files(uploaded[0], uploaded[2]))
    with run_folder.run_lock(run):
        with pytest.raises(errors.RunFolderError) as refused:
            pipeline.build(recipe, run)
    held = f"mmpr build (pid {os.getpid()} on {socket.gethostname()})"
    assert str(refused.value) == f"{run} is in use by {held}; wait for it, or use another --out"
    assert not (run / object_lock.LOCK_FILE).exists()  # removed by the build that held it
    elsewhere = json.dumps(dict(holder="mmpr build (pid 7 on node-2)", host="node-2", pid=7))
    (run / object_lock.LOCK_FILE).write_text(elsewhere)
    with pytest.raises(errors.RunFolderError, match=r"in use by mmpr build \(pid 7 on node-2\)"):
        run_folder.run_lock(run).__enter__()
    monkeypatch.setattr(object_lock, "STALE_S", 1.0)
    time.sleep(2.1)  # the store's clock counts whole seconds
    with run_folder.run_lock(run):
        assert json.loads((run / object_lock.LOCK_FILE).read_text())["holder"] == held


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_killed_s3_build_resumes_to_the_same_pairs(builds, tmp_path, trained_model):
    """`mmpr build --out s3://...` SIGKILLed with its Ray and engine in the middle of the pair shard's
    upload: every visible object is whole, the shard is not there, nor stats.json. One unit's counts
    object is then removed (what a kill between its pairs and counts objects leaves). The resume takes
    the dead build's lock over, redoes that unit only, and ends with exactly the uninterrupted S3
    build's samples and pairs. (One killed process: each costs a Ray and an engine start.)"""
    import signal

    import yaml
    from test_resume import _build

    from mmpr_pipeline import pipeline, shards

    recipe_file = tmp_path / "s3.yaml"
    recipe_file.write_text(yaml.safe_dump(builds["s3_data"]))
    run = storage.as_path(f"s3://{BUCKET}/runs/killed")
    res = _build(run, trained_model, recipe_file, kill_at="mid_shard")
    assert res.returncode == -signal.SIGKILL, res.stdout[-3000:]
    for f in run.rglob("*.parquet"):
        shards.read_file(f)
    counted = {f"{p.parent.name}/{p.stem}" for p in run.glob("samples/*/unit-*.json")}
    paired = {f"{p.parent.name}/{p.stem}" for p in run.glob("pairs/*/unit-*.parquet")}
    units = builds["stats"]["resume"]["units"]
    assert counted == paired and len(counted) == units and not run.glob("data/*")
    assert (run / ".mmpr-lock").exists() and not (run / "stats.json").exists()
    (run / "samples/describe/unit-00000.json").unlink()
    stats = pipeline.build(_recipe(builds["s3_data"]), run)  # on the module's Ray
    assert stats["resume"]["units_done_before"] == units - 1 and stats["resume"]["rows_sampled"] == 2
    assert not (run / ".mmpr-lock").exists()
    whole = builds["runs"]["s3"]
    assert _pairs(run) == _pairs(whole) and _samples(run) == _samples(whole)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_mmpr_train_reads_a_run_on_s3(builds, tmp_path):
    """`mmpr train` with `data: s3://...` (the run folder on S3): two MPO steps on all of its pairs."""
    from _run_fixture import train_two_steps

    run = builds["runs"]["s3"]
    summary = train_two_steps(run, tmp_path / "model")
    assert summary["steps"] == 2 and summary["train_pairs"] == len(_pairs(run)) > 0
