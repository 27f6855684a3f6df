"""Recipe validation: errors name the file, the key and the reason."""

from pathlib import Path

import pytest
import yaml

from mmpr_pipeline import recipe as recipe_mod
from mmpr_pipeline.recipe import RecipeError

DEMO = Path(__file__).resolve().parent.parent / "data_cards" / "demo.yaml"


def _write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def _base():
    return yaml.safe_load(DEMO.read_text())


def test_demo_recipe_loads():
    r = recipe_mod.load(DEMO)
    assert r.name == "demo" and [s.name for s in r.sources] == ["shapes", "describe"]
    assert r.sources[1].pipeline == "dropout_ntp" and r.template_for(r.sources[1]) == "raw"
    assert r.template_for(r.sources[0]) == "cot_final_answer"


@pytest.mark.parametrize(
    "mutate,key,reason",
    [
        (lambda d: d["sampling"].update(n=0), "sampling.n", "must be >= 1"),
        (lambda d: d["sampling"].update(temperature="hot"), "sampling.temperature", "expected a number"),
        (lambda d: d["sampling"].update(top_p=1.5), "sampling.top_p", "must be in (0, 1]"),
        (lambda d: d.update(prompt_template="nope"), "prompt_template", "unknown template"),
        (lambda d: d["sources"][0].update(loader="csv"), "sources[0].loader", "unknown loader"),
        (
            lambda d: d["sources"][0].update(answer_type="essay"),
            "sources[0].answer_type",
            "unknown answer_type",
        ),
        (lambda d: d["sources"][0].update(colour="red"), "sources[0].colour", "unknown key"),
        (lambda d: d["sources"][1].update(name="shapes"), "sources[1].name", "duplicate source name"),
        (lambda d: d["sources"][0].update(loader="parquet"), "sources[0].path", "needs a path"),
        (
            lambda d: d["sources"][1]["dropout"].update(ratio=1.0),
            "sources[1].dropout.ratio",
            "strictly between",
        ),
        (
            lambda d: d["sources"][0]["pairing"].update(format_pairs="yes"),
            "sources[0].pairing.format_pairs",
            "true or false",
        ),
        (lambda d: d["sources"][0].update(limit=-3), "sources[0].limit", "must be >= 1"),
        (lambda d: d.pop("name"), "name", "required key is missing"),
        (lambda d: d.update(sources=[]), "sources", "at least one source"),
    ],
)
def test_errors_name_file_key_reason(tmp_path, mutate, key, reason):
    data = _base()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(RecipeError) as e:
        recipe_mod.load(path)
    assert e.value.file == str(path) and e.value.key == key and reason in e.value.reason
    assert str(path) in str(e.value) and key in str(e.value)


def test_broken_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        recipe_mod.load(_write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(RecipeError, match="no such file"):
        recipe_mod.load(tmp_path / "missing.yaml")


def test_correctness_source_needs_an_answer_type(tmp_path):
    data = _base()
    data["sources"][0] = dict(name="mine", loader="jsonl", path="x.jsonl")
    with pytest.raises(RecipeError) as e:
        recipe_mod.load(_write(tmp_path, data))
    assert e.value.key == "sources[0].answer_type"


def test_overrides_and_fingerprint():
    a = recipe_mod.load(DEMO)
    b = recipe_mod.load(DEMO, {"sampling.n": 4, "limit": 5})
    assert b.sampling.n == 4 and all(s.limit == 5 for s in b.sources)
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == recipe_mod.load(DEMO).fingerprint()


def test_cli_overrides_read_scientific_notation():
    from mmpr_pipeline.cli import _overrides

    # YAML 1.1 reads `1e-3` as a string; a user typing --set learning_rate=1e-3 means a number
    assert _overrides(["learning_rate=1e-3", "n=4", "name=abc", "p=2.5E+2"]) == {
        "learning_rate": 1e-3,
        "n": 4,
        "name": "abc",
        "p": 250.0,
    }
