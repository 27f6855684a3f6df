"""The one config mechanism (mmpr_pipeline/config.py) behind recipes and training configs: one error
type, one builder (unknown keys, declared types, nested dataclasses, key paths), checks in
`__post_init__`, help on every field, `--list-options`."""

import dataclasses
from dataclasses import dataclass

import pytest

from mmpr_pipeline import cli, config, recipe
from mmpr_pipeline.config import ConfigError, build, check, option
from mmpr_pipeline.train import config as train_config

CONFIG_CLASSES = [
    recipe.Recipe,
    recipe.Source,
    recipe.Sampling,
    recipe.Pairing,
    recipe.Dropout,
    recipe.Fields,
    recipe.Card,
    train_config.MPOConfig,
]


@dataclass
class Inner:
    size: int = option(1, help="a size")

    def __post_init__(self):
        check(self.size >= 1, "size", f"must be >= 1, got {self.size}")


@dataclass
class Outer:
    name: str = option(help="required")
    rate: float = option(0.5, help="a number")
    tags: list[str] | None = option(None, help="strings or null")
    inner: Inner = option(default_factory=Inner, help="nested")
    items: list[Inner] = option(default_factory=list, help="a list of nested")
    file: str = option("", help="set by the loader", settable=False)

    def __post_init__(self):
        check(self.name != "bad", "name", "is bad")


def _error(data, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        build(Outer, data, "f.yaml", **kw)
    return e.value


def test_one_error_type():
    assert recipe.RecipeError is ConfigError and train_config.ConfigError is ConfigError
    e = ConfigError("f.yaml", "a.b", "why")
    assert (e.file, e.key, e.reason, str(e)) == ("f.yaml", "a.b", "why", "f.yaml: a.b: why")


def test_builder_checks_declared_types_and_names_the_path():
    made = build(
        Outer,
        {"name": "x", "rate": 2, "tags": ["a"], "inner": {"size": 3}, "items": [{}, {"size": 2}]},
        "f.yaml",
        fixed={"file": "f.yaml"},
    )
    assert made == Outer("x", 2, ["a"], Inner(3), [Inner(1), Inner(2)], "f.yaml")
    assert isinstance(made.rate, int)  # an integer is a fine float, kept as written (recipe fingerprints)
    assert build(Outer, {"name": "x", "tags": None}).tags is None
    for data, key, reason in [
        (
            {"name": "x", "colour": 1},
            "colour",
            "unknown key (expected one of: inner, items, name, rate, tags)",
        ),
        ({"name": "x", "file": "y"}, "file", "unknown key"),  # not a key of the file
        ({}, "name", "required key is missing"),
        ({"name": 3}, "name", "expected a string, got 3"),
        ({"name": "x", "rate": "fast"}, "rate", "expected a number, got 'fast'"),
        ({"name": "x", "rate": True}, "rate", "expected a number, got True"),
        ({"name": "x", "tags": ["a", 1]}, "tags", "expected a list of strings or null, got ['a', 1]"),
        ({"name": "x", "inner": {"size": True}}, "inner.size", "expected an integer, got True"),
        ({"name": "x", "inner": [1]}, "inner", "expected a mapping, got list"),
        ({"name": "x", "items": [{}, {"size": 0}]}, "items[1].size", "must be >= 1, got 0"),  # __post_init__
        ({"name": "x", "items": {"size": 1}}, "items", "expected a list of mappings"),
        ({"name": "bad"}, "name", "is bad"),
    ]:
        e = _error(data)
        assert (e.file, e.key) == ("f.yaml", key) and reason in e.reason, (data, str(e))
    e = _error({"name": "x", "items": [{"size": 0}]}, key="outer[2]")
    assert e.key == "outer[2].items[0].size"


def test_dataclasses_check_their_values_however_they_are_made():
    with pytest.raises(ConfigError, match="^<config>: top_p: must be in"):
        recipe.Sampling(top_p=2)
    with pytest.raises(ConfigError, match="^<config>: n: must be >= 1"):
        dataclasses.replace(recipe.Sampling(), n=0)
    with pytest.raises(ConfigError, match="^x.yaml: beta: must be > 0"):
        train_config.MPOConfig(beta=0, file="x.yaml")
    with pytest.raises(ConfigError, match="^<config>: sampling.top_k: must be -1"):
        recipe.Source(name="s", loader="generated", sampling={"top_k": 0})  # a source's own sampling keys
    # a check of the recipe as a whole, keyed from the recipe, with the file from the loader
    sources = [{"name": "a", "loader": "generated"}, {"name": "a", "loader": "generated"}]
    with pytest.raises(ConfigError, match=r"^r.yaml: sources\[1\].name: duplicate source name 'a'"):
        recipe.from_dict({"name": "r", "sources": sources}, "r.yaml")


def test_every_field_has_help():
    for cls in CONFIG_CLASSES:
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 5, f"{cls.__name__}.{f.name} has no help"


@pytest.mark.parametrize("command,cls", [("build", recipe.Recipe), ("train", train_config.MPOConfig)])
def test_list_options_shows_every_key_with_type_default_and_help(command, cls, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--list-options"])  # no recipe or config file needed
    assert e.value.code == 0
    out = capsys.readouterr().out
    rows = config.options(cls)
    assert len(rows) >= len(config.settable_fields(cls))
    for key, kind, default, help_text in rows:
        assert f"  {key}: {kind} = {default}\n      {help_text}\n" in out
    assert "\n  file:" not in out  # set by the loader, not a key


def test_list_options_rows():
    rows = {key: (kind, default) for key, kind, default, _ in config.options(recipe.Recipe)}
    assert rows["sampling.n"] == ("an integer", "8")
    assert rows["sources[N].dropout.ratio"] == ("a number", "0.5")
    assert rows["sources[N].path"] == ("a string or null", "null")
    assert rows["name"] == ("a string", "(required)")
    rows = {key: (kind, default) for key, kind, default, _ in config.options(train_config.MPOConfig)}
    assert rows["weights"] == ("a list of numbers", "[0.8, 0.2, 1.0]")
    assert rows["bf16"] == ("a string or true or false", "auto")
