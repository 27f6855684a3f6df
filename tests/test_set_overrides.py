"""One `--set KEY=VALUE` parser for `mmpr build`, `eval`, `train` and the demo loop, and its errors.

Regression: `mmpr train CONFIG --set learning_rate=1e-5` (the example the training docs give) was
refused with `learning_rate: expected float, got '1e-5'`: train parsed `--set` with plain YAML 1.1,
build with a fix of its own. Paths that do not fit the recipe ended in a traceback.
"""

from pathlib import Path

import pytest

from mmpr_pipeline import cli
from mmpr_pipeline import recipe as recipe_mod
from mmpr_pipeline.recipe import RecipeError, parse_overrides
from mmpr_pipeline.train import load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data_cards" / "demo.yaml"
TRAIN = ROOT / "data_cards" / "train_mpo.yaml"


def test_values_are_numbers_lists_and_booleans():
    got = parse_overrides(
        [
            "learning_rate=1e-5",
            "a=5e-6",
            "b=2.5E+2",
            "c=-1e3",
            "d=.5e-1",
            "n=4",
            "x=0.5",
            "weights=[0.8, 0.2, 1e-5]",
            "lora=true",
            "freeze_vision=false",
            "name=abc",
            "limit=null",
            "sampling={n: 4, top_p: 1e-1}",
            "path=a=b",
        ]
    )
    assert got == {
        "learning_rate": 1e-5,
        "a": 5e-6,
        "b": 250.0,
        "c": -1000.0,
        "d": 0.05,
        "n": 4,
        "x": 0.5,
        "weights": [0.8, 0.2, 1e-5],
        "lora": True,
        "freeze_vision": False,
        "name": "abc",
        "limit": None,
        "sampling": {"n": 4, "top_p": 0.1},
        "path": "a=b",
    }
    assert type(got["n"]) is int and type(got["learning_rate"]) is float
    assert parse_overrides(["version=1e5x"]) == {"version": "1e5x"}  # only whole numbers are converted


def test_build_and_train_share_the_parser():
    assert cli._overrides(["learning_rate=1e-5", "weights=[1, 0, 5e-6]"]) == {
        "learning_rate": 1e-5,
        "weights": [1, 0, 5e-6],
    }
    # train: the documented example and its friends load
    cfg = load_config(
        TRAIN,
        parse_overrides(
            ["learning_rate=1e-5", "weights=[0.8, 0.2, 1e-5]", "lora=true", "adam_betas=[0.9, 0.95]"]
        ),
    )
    assert cfg.learning_rate == 1e-5 and cfg.weights == [0.8, 0.2, 1e-5] and cfg.lora is True
    assert cfg.adam_betas == [0.9, 0.95]
    # build: the same values in a recipe
    rec = recipe_mod.load(
        DEMO, parse_overrides(["sampling.top_p=5e-1", "sampling.reproducible=false", "sources[0].limit=3"])
    )
    assert rec.sampling.top_p == 0.5 and rec.sampling.reproducible is False and rec.sources[0].limit == 3


@pytest.mark.parametrize(
    "item, key, reason",
    [
        ("sources[5].limit=2", "sources[5].limit", "sources[5] does not exist (sources has 2 entries)"),
        ("sources[x].limit=2", "sources[x].limit", "expected sources[N] with a number N"),
        ("sampling.n.x=2", "sampling.n.x", "sampling.n is 8, not a mapping"),
        ("name[0].x=1", "name[0].x", "name is not a list"),
        ("sources[0]=1", "sources[0]", "set a key of sources[0]"),
        ("sampling..n=1", "sampling..n", "cannot read '' as a key"),
    ],
)
def test_set_paths_that_do_not_fit_the_recipe_name_the_key(item, key, reason):
    with pytest.raises(RecipeError) as e:
        recipe_mod.load(DEMO, parse_overrides([item]))
    assert e.value.key == key and reason in e.value.reason


def test_set_on_a_recipe_that_is_a_list(tmp_path):
    (tmp_path / "list.yaml").write_text("- name: a\n- name: b\n")
    with pytest.raises(
        RecipeError, match=r"list.yaml: name: --set needs a recipe that is a YAML mapping, not a list"
    ):
        recipe_mod.load(tmp_path / "list.yaml", {"name": "x"})


def test_bad_set_arguments():
    with pytest.raises(RecipeError, match=r"^--set: learning_rate: expected KEY=VALUE"):
        parse_overrides(["learning_rate"])
    with pytest.raises(RecipeError, match=r"^--set: =3: expected KEY=VALUE"):
        parse_overrides(["=3"])
    with pytest.raises(RecipeError, match=r"^--set: weights: cannot read '\[1, 2' as a value"):
        parse_overrides(["weights=[1, 2"])


@pytest.mark.parametrize(
    "argv, key",
    [
        (["build", str(DEMO), "--out", "{tmp}/run", "--set", "sources[5].limit=2"], "sources[5].limit"),
        (["build", str(DEMO), "--out", "{tmp}/run", "--set", "sources[x]=2"], "sources[x]"),
        (["build", str(DEMO), "--out", "{tmp}/run", "--set", "sampling.n.x=2"], "sampling.n.x"),
        (["build", "{tmp}/list.yaml", "--out", "{tmp}/run", "--set", "name=x"], "name"),
        (["build", str(DEMO), "--out", "{tmp}/run", "--set", "sampling.n"], "sampling.n"),
        (["train", str(TRAIN), "--set", "learning_rate"], "learning_rate"),
        (["train", str(TRAIN), "--set", "learning_rate=.inf"], "learning_rate"),
    ],
)
def test_cli_set_errors_are_one_line_naming_the_key(argv, key, tmp_path, capsys):
    (tmp_path / "list.yaml").write_text("- name: a\n")
    rc = cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert f": {key}: " in err
    assert not (tmp_path / "run").exists()  # refused before anything was made


def test_cli_train_reads_1e_5_as_a_number(tmp_path, capsys):
    """The documented example: before, `learning_rate: expected float, got '1e-5'`; now the config
    loads and the run stops at the next problem, the missing data."""
    rc = cli.main(
        [
            "train",
            str(TRAIN),
            "--set",
            "learning_rate=1e-5",
            "--set",
            "weights=[0.8, 0.2, 5e-6]",
            "--set",
            f"data={tmp_path}/none",
            "--set",
            f"output_dir={tmp_path}/out",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "learning_rate" not in err and "weights" not in err
    assert "no such file or folder" in err and f"{tmp_path}/none" in err


def test_demo_loop_report_has_one_figure_and_one_timing_line(tmp_path):
    from mmpr_pipeline.demo_loop import write_report

    def acc(a):
        return {"accuracy": a, "ci95": [a - 0.05, a + 0.05], "questions": 10, "pass_at_n": min(1.0, 1.5 * a)}

    report = dict(
        pairs={"correctness": 5},
        questions=10,
        correct_rate=0.5,
        timings_s={"build pairs": 1.0, "train mpo": 2.0},
        accuracy={n: {"greedy": acc(0.6), "sampled": acc(0.5)} for n in ("base", "mpo", "sft")},
    )
    md = write_report(tmp_path, report).read_text()
    assert md.count("![accuracy](accuracy.png)") == 1
    assert md.count("Time per step (s): build pairs 1.0, train mpo 2.0") == 1
    rows = [line.split(" |")[0] for line in md.splitlines() if line.startswith("| ") and "%)" in line]
    assert rows == ["| base", "| mpo", "| sft"]  # one table row per model
