"""Shard naming, rolling, atomic replacement, and the Pair schema on disk."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmpr_pipeline import shards
from mmpr_pipeline.records import PAIR_SCHEMA, SAMPLE_SCHEMA, pair_id, question_id
from mmpr_pipeline.units import unit_file

SCHEMA = pa.schema([("id", pa.string()), ("x", pa.int64())])


def _rows(n, start=0):
    return [{"id": str(i), "x": i} for i in range(start, start + n)]


def _units(tmp_path, sizes, start=0):
    """Unit pair files of the given row counts -> (file, rows, bytes) as the shard plan takes them."""
    out, x = [], start
    for k, n in enumerate(sizes):
        path = shards.write_table(
            pa.Table.from_pylist(_rows(n, x), schema=SCHEMA), tmp_path / "pairs" / f"u{k}.parquet"
        )
        out.append((str(path), n, path.stat().st_size))
        x += n
    return out


def _build(tmp_path, sizes, rows_per_shard, start=0, max_bytes=shards.MAX_SHARD_BYTES):
    plan = shards.plan_shards(_units(tmp_path, sizes, start), rows_per_shard, max_bytes)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    written = [
        shards.write_shard(p, data / shards.shard_name(i, len(plan)), SCHEMA) for i, p in enumerate(plan)
    ]
    return shards.commit_shards(data, written)


def test_hub_names_and_rolling_across_and_within_units(tmp_path):
    paths = _build(tmp_path, [3, 0, 5, 2], rows_per_shard=4)
    assert [p.name for p in paths] == [
        "train-00000-of-00003.parquet",
        "train-00001-of-00003.parquet",
        "train-00002-of-00003.parquet",
    ]
    assert [pq.read_table(p).num_rows for p in paths] == [4, 4, 2]
    assert [r["x"] for p in paths for r in pq.read_table(p).to_pylist()] == list(range(10))  # order kept
    assert all(shards.SHARD_RE.match(p.name) for p in paths)
    assert not list((tmp_path / "data").glob(".*"))  # no temporary files left


def test_shards_stay_under_the_byte_cap():
    # 10 rows of 100 bytes each, cap 350 bytes: 3 rows a shard
    plan = shards.plan_shards([("a", 4, 400), ("b", 6, 600)], rows_per_shard=1000, max_bytes=350)
    assert [sum(stop - start for _, start, stop in s) for s in plan] == [3, 3, 3, 1]
    assert plan[1] == [("a", 3, 4), ("b", 0, 2)]


def test_a_smaller_rebuild_replaces_every_old_shard(tmp_path):
    _build(tmp_path, [6], rows_per_shard=2)
    (tmp_path / "data" / ".part-00009.dead.tmp").write_bytes(b"left by a killed run")
    paths = _build(tmp_path, [3], rows_per_shard=2, start=100)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    assert [r["x"] for p in paths for r in pq.read_table(p).to_pylist()] == [100, 101, 102]


def test_empty_output_still_has_one_shard_with_the_schema(tmp_path):
    plan = shards.plan_shards([], rows_per_shard=10)
    assert plan == [[]]
    (tmp_path / "data").mkdir()
    paths = shards.commit_shards(
        tmp_path / "data", [shards.write_shard([], tmp_path / "data" / "x.parquet", PAIR_SCHEMA)]
    )
    assert len(paths) == 1 and pq.read_schema(paths[0]).names == PAIR_SCHEMA.names


def test_atomic_writes_and_unit_paths(tmp_path):
    table = SAMPLE_SCHEMA.empty_table()
    path = shards.write_table(table, unit_file(tmp_path, "samples", "src", 3))
    assert path == tmp_path / "samples" / "src" / "unit-00003.parquet"
    assert shards.unit_files(tmp_path) == [path]
    shards.write_json(tmp_path / "stats.json", {"a": 1})
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_ids_are_stable_and_content_addressed():
    q = question_id("src", b"img", "How many?", "3")
    assert q == question_id("src", b"img", "How many?", "3") and len(q) == 16
    assert q != question_id("src", b"img", "How many?", "4")
    assert pair_id(q, "correctness", "a", "b") != pair_id(q, "correctness", "b", "a")


def test_staging_folder_is_beside_the_output_and_gone_when_the_block_fails(tmp_path):
    """select's and export's temporary output folder: on the same file system as `out` (renamed into
    place), removed with what was written in it if writing fails, and a named error if it cannot be made."""
    out = tmp_path / "deep" / "out"
    with shards.staging_folder(out, ValueError) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".out.")
        tmp.rename(out)
    assert out.is_dir() and sorted(p.name for p in out.parent.iterdir()) == ["out"]
    with pytest.raises(KeyError), shards.staging_folder(tmp_path / "other", ValueError) as tmp:
        (tmp / "half.parquet").write_bytes(b"x")
        raise KeyError("writing failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"^--out .*file/x: cannot write in .*file \("):
        with shards.staging_folder(tmp_path / "file" / "x", ValueError):
            pass
