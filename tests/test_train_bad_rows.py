"""Bad training pairs are set aside before training starts, as a build sets aside bad source rows:
a truncated image, chosen equal to rejected (white space aside), an empty response. Each is counted
by reason in summary.json and named in output_dir/rejects.jsonl, and training goes on; with nothing
usable left, one line and rc 2, and no output_dir. A pair that fails part-way says which, and the last
checkpoint stays.

Before: a truncated image trained until its row, then `error: Truncated File Read` (rc 1, no file or
row named) and no checkpoint; every pair with chosen == rejected trained without a word.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _run_fixture import make_run, read_pairs

from mmpr_pipeline import cli
from mmpr_pipeline.records import PAIR_SCHEMA
from mmpr_pipeline.train import data as data_mod

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[dict]:
    return read_pairs(make_run(tmp_path_factory.mktemp("run") / "run", n_shapes=6, n_scenes=2, n_shards=1))


def write_pairs(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), path)
    return path


def spoil(pairs: list[dict]) -> list[dict]:
    """The first three pairs made unusable, one way each."""
    rows = [dict(p) for p in pairs]
    image = rows[0]["images"][0]["bytes"]
    rows[0]["images"] = [{"bytes": image[: len(image) // 2], "path": None}]  # a truncated PNG
    rows[1]["rejected"] = "  " + rows[1]["chosen"].replace(" ", "\n ") + "\n"
    rows[2]["rejected"] = " \n"
    return rows


def train(data: Path, out: Path, *sets: str) -> int:
    argv = ["train", str(ROOT / "data_cards" / "train_mpo.yaml")]
    for s in (
        f"data={data}",
        f"output_dir={out}",
        "batch_size=2",
        "max_steps=2",
        "eval_fraction=0",
        "progress_bar=false",
        *sets,
    ):
        argv += ["--set", s]
    return cli.main(argv)


def test_bad_pairs_are_set_aside_counted_and_named(pairs, tiny_model, tmp_path, capsys):
    rows = spoil(pairs)
    data, out = write_pairs(rows, tmp_path / "pairs.parquet"), tmp_path / "out"
    assert train(data, out, f"model={tiny_model}", "save_model=false") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["set_aside"] == {"image cannot be decoded": 1, "chosen equals rejected": 1, "empty": 1}
    assert summary["train_pairs"] == len(rows) - 3
    assert json.loads(capsys.readouterr().out)["set_aside"] == summary["set_aside"]  # the printed summary
    rejects = [json.loads(r) for r in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["id"], r["reason"]) for r in rejects] == [
        (0, rows[0]["id"], "image cannot be decoded"),
        (1, rows[1]["id"], "chosen equals rejected"),
        (2, rows[2]["id"], "empty"),
    ]
    assert rejects[2]["detail"] == "rejected is empty" and rejects[0]["data"] == str(data)


def test_nothing_usable_is_one_line_and_no_output_dir(pairs, tmp_path, capsys):
    rows = [dict(p, rejected=p["chosen"]) for p in pairs]
    data, out = write_pairs(rows, tmp_path / "pairs.parquet"), tmp_path / "out"
    assert train(data, out) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    n = len(rows)
    assert lines == [
        f"error: {data}: none of its {n} pairs can be trained on (chosen equals rejected: {n})"
    ], err
    assert not out.exists()


def test_chosen_equal_to_rejected_is_fine_for_sft_only():
    """SFT reads chosen only: a pair without a rejected side is still a chosen response."""
    table = pa.Table.from_pylist([dict(question="q", chosen="a b", rejected="a  b", images=[])])
    kept, rejects = data_mod.set_aside_bad_pairs(table, with_rejected=False)
    assert kept.num_rows == 1 and rejects == []
    kept, rejects = data_mod.set_aside_bad_pairs(table, with_rejected=True)
    assert kept.num_rows == 0 and rejects[0]["reason"] == "chosen equals rejected"


def test_a_pair_that_fails_mid_run_is_named_and_the_checkpoint_kept(
    pairs, tiny_model, tmp_path, capsys, monkeypatch
):
    """A pair the check passes but the processor cannot encode (injected at the fifth pair encoded,
    after the first checkpoint): one line naming the pair and the checkpoint kept, rc 2."""
    data, out = write_pairs(pairs, tmp_path / "pairs.parquet"), tmp_path / "out"
    encode, calls = data_mod.PairEncoder.encode, []

    def failing_encode(self, row, index):
        calls.append(index)
        if len(calls) == 5:
            raise OSError("image file is truncated (3 bytes not processed)")
        return encode(self, row, index)

    monkeypatch.setattr(data_mod.PairEncoder, "encode", failing_encode)
    assert train(data, out, f"model={tiny_model}", "max_steps=4", "save_every=1") == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "Traceback" not in err, err
    assert line[0].startswith(f"error: pair {pairs[calls[-1]]['id']} (row {calls[-1]}): OSError: image file")
    kept = sorted(out.glob("checkpoint-*"))
    assert kept and f"{kept[-1]} is kept: fix or remove that pair" in line[0]
    assert torch.load(kept[-1] / "state.pt", weights_only=True)["step"] >= 1
