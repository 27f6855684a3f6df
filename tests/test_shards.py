"""Shard naming, rolling, atomic replacement, and the Pair schema on disk."""
import pyarrow as pa
import pyarrow.parquet as pq

from mmpr_pipeline import shards
from mmpr_pipeline.records import PAIR_SCHEMA, SAMPLE_SCHEMA, pair_id, question_id

SCHEMA = pa.schema([("id", pa.string()), ("x", pa.int64())])


def _rows(n, start=0):
    return [{"id": str(i), "x": i} for i in range(start, start + n)]


def test_hub_names_and_rolling(tmp_path):
    w = shards.ShardWriter(tmp_path / "data", SCHEMA, rows_per_shard=4)
    w.write(_rows(10))
    paths = w.close()
    assert [p.name for p in paths] == ["train-00000-of-00003.parquet", "train-00001-of-00003.parquet",
                                       "train-00002-of-00003.parquet"]
    assert [pq.read_table(p).num_rows for p in paths] == [4, 4, 2]
    assert all(shards.SHARD_RE.match(p.name) for p in paths)
    assert not list((tmp_path / "data").glob(".*"))  # no temporary files left


def test_a_smaller_rebuild_replaces_every_old_shard(tmp_path):
    w = shards.ShardWriter(tmp_path, SCHEMA, rows_per_shard=2)
    w.write(_rows(6))
    w.close()
    (tmp_path / ".part-00009.dead.tmp").write_bytes(b"left by a killed run")
    w = shards.ShardWriter(tmp_path, SCHEMA, rows_per_shard=2)
    w.write(_rows(3, start=100))
    paths = w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert [r["x"] for p in paths for r in pq.read_table(p).to_pylist()] == [100, 101, 102]


def test_empty_output_still_has_one_shard_with_the_schema(tmp_path):
    paths = shards.ShardWriter(tmp_path, PAIR_SCHEMA, rows_per_shard=10).close()
    assert len(paths) == 1 and pq.read_schema(paths[0]).names == PAIR_SCHEMA.names


def test_atomic_writes_and_unit_paths(tmp_path):
    table = SAMPLE_SCHEMA.empty_table()
    path = shards.write_table(table, shards.unit_path(tmp_path, "src", 3))
    assert path == tmp_path / "samples" / "src" / "unit-00003.parquet"
    assert shards.unit_files(tmp_path) == [path]
    shards.write_json(tmp_path / "stats.json", {"a": 1})
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_ids_are_stable_and_content_addressed():
    q = question_id("src", b"img", "How many?", "3")
    assert q == question_id("src", b"img", "How many?", "3") and len(q) == 16
    assert q != question_id("src", b"img", "How many?", "4")
    assert pair_id(q, "correctness", "a", "b") != pair_id(q, "correctness", "b", "a")
