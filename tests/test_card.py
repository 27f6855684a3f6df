"""The dataset card: YAML the Hub and `datasets` read, matching the shards; figures; body."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _run_fixture import make_run, read_pairs
from datasets import Features, Image, List, load_dataset
from datasets.info import DatasetInfosDict
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard

from mmpr_pipeline import card, records
from mmpr_pipeline.export import trl_features


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("card") / "run")
    card.write_card(run)
    return run


def _no_decode(ds):
    return ds.cast_column("images", List(Image(decode=False)))


def test_hf_features_are_the_pair_schema_with_images_as_image_list():
    features = card.hf_features()
    assert features["images"] == List(Image())
    assert features.arrow_schema.remove_metadata().equals(records.PAIR_SCHEMA)
    meta = json.loads(card.schema_metadata()[b"huggingface"])
    assert Features.from_dict(meta["info"]["features"]) == features


@pytest.mark.parametrize("features", [card.hf_features(), trl_features()], ids=["pairs", "trl"])
def test_yaml_features_are_written_as_datasets_writes_them(features):
    schema = features.arrow_schema.remove_metadata()
    assert card.yaml_features(schema) == features._to_yaml_list()
    assert Features._from_yaml_list(card.yaml_features(schema)) == features


def test_shards_with_schema_metadata_load_with_pil_images(run_dir, tmp_path):
    ds = load_dataset("parquet", data_dir=str(run_dir / "data"), split="train", cache_dir=str(tmp_path))
    assert ds.features == card.hf_features()
    image = ds[0]["images"][0]
    assert image.__class__.__module__.startswith("PIL.")
    assert image.size == (112, 112)


def test_load_dataset_on_the_folder_gives_the_rows_the_run_wrote(run_dir, tmp_path):
    ds = load_dataset(str(run_dir), split="train", cache_dir=str(tmp_path))  # reads the card's YAML
    assert ds.features == card.hf_features()
    assert ds[0]["images"][0].__class__.__module__.startswith("PIL.")
    assert _no_decode(ds).to_list() == read_pairs(run_dir)


def test_card_round_trips_and_its_yaml_matches_the_shards(run_dir):
    text = (run_dir / "README.md").read_text()
    parsed = DatasetCard(text)
    assert DatasetCard(str(parsed)).data.to_dict() == parsed.data.to_dict()
    data = parsed.data.to_dict()
    assert data["license"] == "mit" and data["pretty_name"] == "Demo MMPR pairs"
    assert data["size_categories"] == ["n<1K"]
    assert "image-text-to-text" in data["task_categories"] and "mmpr" in data["tags"]
    # As `datasets` reads the card: the configs point at the shards, the features are the shards'.
    assert MetadataConfigs.from_dataset_card_data(parsed.data) == {
        "default": {"data_files": [{"split": "train", "path": "data/train-*"}]}
    }
    info = DatasetInfosDict.from_dataset_card_data(parsed.data)["default"]
    shard_schema = pq.read_schema(run_dir / "data" / "train-00000-of-00002.parquet")
    assert info.features == Features.from_arrow_schema(shard_schema)
    assert info.features.arrow_schema.remove_metadata().equals(shard_schema.remove_metadata())
    assert info.splits["train"].num_examples == len(read_pairs(run_dir)) == 24
    assert card.check_card(run_dir) == []


def test_card_body_describes_the_run(run_dir):
    text = DatasetCard.load(run_dir / "README.md").text
    stats = json.loads((run_dir / "stats.json").read_text())
    assert "Built by the test-suite." in text  # the recipe's extra text
    assert "0.8 · L_DPO + 0.2 · L_BCO + 1.0 · L_SFT" in text
    for words in ("Correctness-based pipeline", "format pairs", "DropoutNTP", "without seeing the image"):
        assert words in text
    # one table row per source, with its numbers
    s = stats["sources"]["shapes"]
    assert (
        f"| `shapes` | correctness | {s['rows']} | {s['rejects']} | {s['questions']} | "
        f"{s['samples']} | 50.0% |" in text
    )
    assert "| `scenes` | dropout_ntp | 6 | 0 | 6 | 6 | – |" in text
    assert "| `shapes` | corrupt image | 1 |" in text
    assert "Your task is to answer the question below." in text  # the prompt templates used
    assert "`raw`:" in text
    assert "| 0.5 | 12.0 | 1.0 | 0.3 | 0.2 | 0.4 | 14.4 |" in text  # stage seconds
    for rel in card.FIGURES.values():
        assert f"]({rel})" in text
        assert (run_dir / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "over all 24 pairs" in text


def test_recipe_sets_license_pretty_name_and_extra(tmp_path):
    run = make_run(
        tmp_path / "run",
        n_shapes=4,
        n_scenes=2,
        n_shards=1,
        recipe_overrides={
            "card": {
                "license": "apache-2.0",
                "pretty_name": "Shapes | pairs",
                "extra": "## Notes\nHand-checked.",
            }
        },
    )
    text = card.write_card(run).read_text()
    parsed = DatasetCard(text)
    assert parsed.data.license == "apache-2.0"
    assert parsed.data.pretty_name == "Shapes | pairs"
    assert "## Notes\nHand-checked." in parsed.text
    assert card.check_card(run) == []


def test_writing_the_card_again_gives_the_same_card(run_dir):
    """A resumed or re-run build rewrites the card: the text must not drift (no timing assertion:
    speed is measured in benchmarks, not asserted in tests)."""
    card.write_card(run_dir)
    first = (run_dir / "README.md").read_text()
    card.write_card(run_dir)
    assert (run_dir / "README.md").read_text() == first


def test_a_run_without_pairs_still_gets_a_valid_card(tmp_path):
    run = make_run(tmp_path / "run", n_shapes=2, n_scenes=1, n_shards=1)
    shard = run / "data" / "train-00000-of-00001.parquet"
    pq.write_table(
        pa.Table.from_pylist([], schema=records.PAIR_SCHEMA.with_metadata(card.schema_metadata())), shard
    )
    stats = json.loads((run / "stats.json").read_text())
    for s in stats["sources"].values():
        s["pairs"] = {t: 0 for t in records.PAIR_TYPES}
    stats["totals"]["pairs"] = {t: 0 for t in records.PAIR_TYPES}
    (run / "stats.json").write_text(json.dumps(stats))
    text = card.write_card(run).read_text()
    assert card.check_card(run) == []
    assert "num_examples: 0" in text and "over all 0 pairs" in text
    # (`datasets` 5.2 cannot read a zero-row Parquet file, so such a run is not publishable: see test_hub)


def test_check_card_names_what_is_wrong(tmp_path, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    readme = run / "README.md"
    good = readme.read_text()

    readme.write_text(
        good.replace("name: chosen_index\n    dtype: int64", "name: chosen_index\n    dtype: int32")
    )
    assert any("features do not match" in p for p in card.check_card(run))

    readme.write_text(good.replace("num_examples: 24", "num_examples: 25"))
    assert any("the shards hold 24 rows" in p for p in card.check_card(run))

    readme.write_text(good.replace("path: data/train-*", "path: data/*.csv"))
    assert any("do not point at the shards" in p for p in card.check_card(run))

    readme.write_text(good.replace("license: mit", "license: My License!"))
    assert any("not a Hub license id" in p for p in card.check_card(run))

    readme.write_text(good.replace("---\n", "---\n: : [\n", 1))
    assert any("cannot be parsed" in p for p in card.check_card(run))

    (run / card.FIGURES["lengths"]).unlink()
    readme.write_text(good)
    assert any("figure linked from the card is missing" in p for p in card.check_card(run))

    readme.unlink()
    assert any("README.md: missing" in p for p in card.check_card(run))


def test_write_card_refuses_an_unfinished_run(tmp_path, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "stats.json").unlink()
    with pytest.raises(card.CardError, match="stats.json: missing"):
        card.write_card(run)
    shutil.copy(run_dir / "stats.json", run / "stats.json")
    (run / "data" / "train-00001-of-00002.parquet").unlink()
    with pytest.raises(
        card.CardError, match="train-00001-of-00002.parquet: shard listed in stats.json is missing"
    ):
        card.write_card(run)
    assert card.main([str(run)]) == 2


def _card_command(*args, env=None):
    """`python -m mmpr_pipeline.card ...` as a user runs it: (exit code, stderr lines)."""
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "mmpr_pipeline.card", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    return done.returncode, done.stderr.strip().splitlines()


def test_the_card_command_ends_errors_as_the_cli_does(tmp_path, run_dir):
    """A missing run folder: exit code 2 and one line; any other error one line too, not a traceback
    (error_policy.error_message's policy: here a shard that is not Parquet, an environment error's code 1)."""
    rc, err = _card_command(tmp_path / "no-such-run")
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "recipe.json: missing" in err[0]
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "data" / "train-00001-of-00002.parquet").write_bytes(b"not parquet")
    rc, err = _card_command(run)
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: ArrowInvalid: "), err
    # the hint names this command (there is no `mmpr --debug` here), and following it shows the traceback
    assert err[0].endswith(f"(run `MMPR_DEBUG=1 python -m mmpr_pipeline.card {run}` to see the traceback)")
    rc, debug_err = _card_command(run, env={"MMPR_DEBUG": "1"})
    assert rc == 1 and "Traceback (most recent call last):" in debug_err and debug_err[-1] == err[0]
