"""`mmpr export`: TRL's conversational vision format and InternVL's MPO layout, read back row by row."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _run_fixture import make_run, read_pairs
from datasets import Image, List, load_dataset
from PIL import Image as PILImage

from mmpr_pipeline import card, export, records


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("export") / "run")
    card.write_card(run)
    return run


@pytest.fixture(scope="module")
def trl_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trl") / "trl_pairs"
    assert export.cli_export(argparse.Namespace(run_dir=str(run_dir), format="trl", out=str(out))) == 0
    return out


def _args(run_dir, fmt, out):
    return argparse.Namespace(run_dir=str(run_dir), format=fmt, out=str(out))


def _mmpr_export(run_dir, fmt, out) -> int:
    """`mmpr export` as a user runs it: its exit code, errors turned into messages by the CLI."""
    from mmpr_pipeline import cli

    return cli.main(["export", str(run_dir), "--format", fmt, "--out", str(out)])


def test_trl_export_reads_back_row_by_row(run_dir, trl_dir, tmp_path):
    pairs = read_pairs(run_dir)
    ds = load_dataset(
        "parquet", data_dir=str(trl_dir / "data"), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert ds.features == export.trl_features()
    shards = json.loads((run_dir / "stats.json").read_text())["shards"]
    assert sorted(p.name for p in (trl_dir / "data").iterdir()) == [Path(s).name for s in shards]
    assert ds.num_rows == len(pairs) == 24
    decoded = ds[0]["images"][0]
    assert isinstance(decoded, PILImage.Image)
    raw = ds.cast_column("images", List(Image(decode=False)))
    for row, pair in zip(raw, pairs):
        assert (row["id"], row["qid"], row["source"], row["pair_type"]) == (
            pair["id"],
            pair["qid"],
            pair["source"],
            pair["pair_type"],
        )
        [user] = row["prompt"]
        assert user["role"] == "user"
        assert [part["type"] for part in user["content"]] == ["image"] * len(pair["images"]) + ["text"]
        assert user["content"][-1]["text"] == pair["question"]  # already the templated user turn
        if pair["source"] == "shapes":  # the template once, not applied again
            assert user["content"][-1]["text"].count("Your task is to answer the question below.") == 1
        assert row["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": pair["chosen"]}]}]
        assert row["rejected"] == [
            {"role": "assistant", "content": [{"type": "text", "text": pair["rejected"]}]}
        ]
        assert [im["bytes"] for im in row["images"]] == [
            im["bytes"] for im in pair["images"]
        ]  # not re-encoded


def test_trl_row_with_several_images_has_one_placeholder_each():
    pair = dict(
        id="p",
        qid="q",
        source="s",
        pair_type="correctness",
        question="Which is bigger?",
        chosen="A",
        rejected="B",
        images=[{"bytes": b"1", "path": None}, {"bytes": b"2", "path": None}],
    )
    row = export.trl_row(pair)
    assert [p["type"] for p in row["prompt"][0]["content"]] == ["image", "image", "text"]
    assert [im["bytes"] for im in row["images"]] == [b"1", b"2"]


@pytest.mark.slow
def test_trl_export_trains_with_dpo_trainer(trl_dir, tiny_model, tmp_path):
    """TRL's own collator and DPOTrainer (MPO's loss mix) take the export without any conversion."""
    import torch
    from _trl_step import trl_mpo_step
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    model_dir = tiny_model
    processor = AutoProcessor.from_pretrained(model_dir)
    ds = load_dataset(
        "parquet", data_dir=str(trl_dir / "data"), split="train", cache_dir=str(tmp_path / "cache")
    )

    batch = DataCollatorForVisionPreference(processor)([ds[0], ds[23]])
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = processor.image_processor.merge_size**2
    # prompts are repeated for chosen and rejected: each sequence holds its image's tokens exactly once
    assert batch["input_ids"].shape[0] == 4
    per_image = (batch["image_grid_thw"].prod(dim=1) // merge).tolist()
    assert (batch["input_ids"] == image_pad).sum(dim=1).tolist() == per_image
    assert batch["completion_mask"].sum() > 0

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    ref = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    result = trl_mpo_step(model, ref, ds, processor, tmp_path / "dpo")
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))


def _read_like_internvl(meta_path: Path):
    """What InternVL's MPO dataset does with meta.json: join root and image, open it, read the texts."""
    meta = json.loads(meta_path.read_text())
    out = {}
    for name, entry in meta.items():
        assert set(entry) >= {"root", "annotation", "data_augment", "repeat_time", "length"}
        assert entry["annotation"].endswith("jsonl")
        with open(entry["annotation"]) as f:
            lines = f.readlines()
        assert len(lines) == entry["length"]
        rows = []
        for line in lines:
            item = json.loads(line)
            path = os.path.join(entry["root"], item["image"])
            with open(path, "rb") as f:
                data = f.read()
            PILImage.open(io.BytesIO(data)).convert("RGB")
            rows.append((item, data))
        out[name] = (entry, rows)
    return out


def test_internvl_export_reads_back_row_by_row(run_dir, tmp_path):
    out = tmp_path / "internvl"
    assert export.cli_export(_args(run_dir, "internvl", out)) == 0
    read = _read_like_internvl(out / "meta.json")
    pairs = read_pairs(run_dir)
    assert set(read) == {"shapes", "scenes"}
    for source, (entry, rows) in read.items():
        assert entry["data_augment"] is False and entry["repeat_time"] == 1
        assert Path(entry["root"]) == out.resolve() / "images" / source
        expected = [p for p in pairs if p["source"] == source]
        assert len(rows) == len(expected)
        for (item, image_bytes), pair in zip(rows, expected):
            assert item["question"] == "<image>\n" + pair["question"]
            assert (item["chosen"], item["rejected"], item["id"]) == (
                pair["chosen"],
                pair["rejected"],
                pair["id"],
            )
            assert image_bytes == pair["images"][0]["bytes"]  # the original bytes, not re-encoded
            assert item["image"] == f"{pair['qid']}.png"
        # one image file per question, shared by its pairs
        assert len(list((out / "images" / source).iterdir())) == len({p["qid"] for p in expected})
    summary = json.loads((out / export.MARKER).read_text())
    assert summary["rows"] == 24 and summary["format"] == "internvl"


def test_internvl_row_with_several_images_numbers_them():
    pair = dict(id="p", pair_type="correctness", question="Compare them.", chosen="A", rejected="B")
    row = export.internvl_row(pair, ["q-0.png", "q-1.png"])
    assert row["image"] == ["q-0.png", "q-1.png"]
    assert row["question"] == "Image-1: <image>\nImage-2: <image>\nCompare them."
    assert "image" not in export.internvl_row(pair, [])


def test_export_replaces_its_own_output_and_refuses_someone_elses(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert export.cli_export(_args(run_dir, "internvl", out)) == 0
    written = json.loads((out / export.MARKER).read_text())["files"]
    assert "meta.json" in written and len(written) == sum(1 for p in out.rglob("*") if p.is_file()) - 1
    assert export.cli_export(_args(run_dir, "trl", out)) == 0  # an earlier export: replaced whole
    assert sorted(p.name for p in out.iterdir()) == ["data", export.MARKER]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder or lock left behind

    (out / "data" / "stale.parquet").write_text("not written by the export")  # a file the user added
    assert _mmpr_export(run_dir, "trl", out) == 2
    assert "holds files the earlier export did not write (data/stale.parquet)" in capsys.readouterr().err
    assert (out / "data" / "stale.parquet").read_text() == "not written by the export"

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert _mmpr_export(run_dir, "trl", foreign) == 2
    assert "holds files this tool did not write" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_export_of_a_broken_run_fails_clearly_and_leaves_nothing(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "data" / "train-00001-of-00002.parquet").unlink()
    assert _mmpr_export(run, "trl", tmp_path / "out") == 2
    assert "shard listed in stats.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_of_unreadable_image_bytes_names_the_pair(tmp_path):
    run = make_run(tmp_path / "run", n_shapes=2, n_scenes=1, n_shards=1)
    shard = run / "data" / "train-00000-of-00001.parquet"
    rows = pq.read_table(shard).to_pylist()
    rows[1]["images"] = [{"bytes": b"not an image", "path": None}]
    pq.write_table(pa.Table.from_pylist(rows, schema=records.PAIR_SCHEMA), shard)
    with pytest.raises(
        export.ExportError, match=f"pair {rows[1]['id']}: image bytes are not a readable image"
    ):
        export.export(run, "internvl", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
