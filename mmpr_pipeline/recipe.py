"""Recipes: what to build, from which sources, with which model. YAML in, validated dataclasses out.

Every validation error names the file, the key (dotted path) and the reason, so a user fixing a
recipe never has to guess which of forty lines is wrong.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmpr_pipeline.records import PIPELINES, stable_hash

ANSWER_TYPES = ("multiple_choice", "number", "yes_no", "text", "math", "vqa", "chart", "document")
LOADERS = ("generated", "parquet", "jsonl", "hf_disk", "hf_hub")
IMAGE_POLICIES = ("required", "optional", "none")
DEMO_MODEL = "demo"  # the bundled tiny Qwen2-VL model, built (and trained) locally


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names file, key and reason."""

    def __init__(self, file: str | Path, key: str, reason: str):
        self.file, self.key, self.reason = str(file), key, reason
        super().__init__(f"{file}: {key}: {reason}")


# Bounds for reading YAML (recipes, training configs): both are a few KB. Aliases are bounded by the
# number of values they expand to, so a 1 KB "billion laughs" document fails at once instead of
# growing without end in whatever walks it next.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000


class _YAMLTooBig(ValueError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a document whose aliases expand to over MAX_YAML_VALUES values."""

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values `node` stands for once every alias is copied out (memoised per shared node)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise _YAMLTooBig("an alias refers to a value that contains it (a recursive alias)")
    open_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    size = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
    open_nodes.discard(id(node))
    if size > MAX_YAML_VALUES:
        raise _YAMLTooBig(f"its aliases expand to over {MAX_YAML_VALUES:,} values (a YAML alias bomb?)")
    sizes[id(node)] = size
    return size


def read_yaml(path: str | Path) -> Any:
    """The YAML document in `path` (None if empty), read within MAX_YAML_BYTES and MAX_YAML_VALUES.

    Every problem is a RecipeError naming the file: missing, a folder or other non-file, too big,
    not UTF-8, not YAML (with the line), nested too deeply, or an alias bomb.
    """
    path = Path(path)
    if not path.exists():
        raise RecipeError(path, "(file)", "no such file")
    if path.is_dir():
        raise RecipeError(path, "(file)", "is a folder; give the YAML file in it")
    if not path.is_file():  # a FIFO or device would block or never end
        raise RecipeError(path, "(file)", "is not a regular file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise RecipeError(path, "(file)", f"cannot be read: {e.strerror}") from None
    if len(raw) > MAX_YAML_BYTES:
        raise RecipeError(path, "(file)", f"is larger than {MAX_YAML_BYTES >> 20} MiB; a YAML config is a few KB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(path, "(file)", f"is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(file)"
        raise RecipeError(path, where, f"not valid YAML: {getattr(e, 'problem', e)}") from None
    except _YAMLTooBig as e:
        raise RecipeError(path, "(file)", f"refused: {e}") from None
    except RecursionError:
        raise RecipeError(path, "(file)", "refused: values are nested too deeply") from None


@dataclass
class Sampling:
    n: int = 8
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 256
    # Seed each question's request from (recipe seed, qid): the same recipe then gives the same
    # samples however questions are batched, spread over replicas, or resumed.
    reproducible: bool = True


@dataclass
class Pairing:
    max_pairs_per_question: int = 15
    format_pairs: bool = True
    # InternVL's --answer-fix: a chosen response's final answer (its "Final answer:" line or last
    # \boxed{}) is rewritten to the reference answer's own text; the rest stays byte-identical
    answer_fix: bool = False


@dataclass
class Dropout:
    ratio: float = 0.5      # keep the first int(N * ratio) words of the chosen response
    min_words: int = 8      # responses shorter than this are not cut (skipped, counted)
    n: int = 1              # chosen responses sampled per question
    # Continue the prefix WITH the question's images (InternVL's `sr0.5_with_image` release files;
    # the paper's DropoutNTP, `sr0.5_wo_image`, continues without them). Recorded in pair provenance.
    with_image: bool = False


@dataclass
class Fields:
    """Column names in the source for each thing the pipeline needs."""
    image: str = "image"
    question: str = "question"
    answer: str = "answer"
    options: str | None = None
    response: str | None = None      # dropout_ntp: an existing response to use as chosen
    task: str | None = None
    answer_type: str | None = None   # per-row answer type, when the source mixes them
    rationale: str | None = None     # correctness: a ground-truth worked solution, added as a chosen candidate


@dataclass
class Source:
    name: str
    loader: str
    path: str | None = None           # parquet / jsonl / hf_disk: a file, folder or glob
    dataset: str | None = None        # hf_hub: a dataset name for `datasets.load_dataset`
    config: str | None = None
    split: str = "train"
    generator: dict[str, Any] = field(default_factory=dict)
    fields: Fields = field(default_factory=Fields)
    answer_type: str | None = None    # fixed type; else `fields.answer_type` names a column
    limit: int | None = None
    pipeline: str = "correctness"
    # required: every row has one image or a list of them; optional: a row without one is a text-only
    # question; none: a text-only source (the image field is not read)
    images: str = "required"
    prompt_template: str | None = None  # default: the recipe's for correctness, `raw` for dropout_ntp
    pairing: Pairing = field(default_factory=Pairing)
    dropout: Dropout = field(default_factory=Dropout)
    # Per-source overrides (off by default; outside the fingerprint while unset, see Recipe.to_dict):
    # `sampling` keys replace the recipe's `sampling` for this source (e.g. {n: 4, max_tokens: 512});
    # `image_max_pixels` downscales (keeping aspect) every image with more pixels before the engine
    # sees it, and the samples and pairs carry that downscaled image, so training sees what sampling saw.
    sampling: dict[str, Any] = field(default_factory=dict)
    image_max_pixels: int | None = None


@dataclass
class Card:
    pretty_name: str | None = None
    license: str = "cc-by-4.0"
    extra: str = ""


@dataclass
class Recipe:
    name: str
    sources: list[Source]
    model: str = DEMO_MODEL
    seed: int = 0
    prompt_template: str = "cot_final_answer"
    engine: dict[str, Any] = field(default_factory=dict)   # passed through to `vllm.LLM`
    sampling: Sampling = field(default_factory=Sampling)
    batch_size: int = 16       # questions per engine call
    unit_size: int = 64        # questions per resumable work unit
    shard_rows: int = 5000     # pairs per output shard
    card: Card = field(default_factory=Card)
    preview: bool = True       # write RUN_DIR/preview.html after a build (not part of the fingerprint)
    file: str = ""             # where it was loaded from (not part of the fingerprint)

    def template_for(self, source: Source) -> str:
        if source.prompt_template:
            return source.prompt_template
        return self.prompt_template if source.pipeline == "correctness" else "raw"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("file")
        d.pop("preview")  # changes no data: switching it must not stop a resume
        for src in d["sources"]:  # unset per-source overrides: recipes from before them keep their fingerprint
            for key, unset in (("sampling", {}), ("image_max_pixels", None)):
                if src.get(key) == unset:
                    src.pop(key)
            for group, key, off in OPTIONS_OFF_BY_DEFAULT:  # likewise the pair options while off
                if src[group].get(key) == off:
                    src[group].pop(key)
        return d

    def sampling_for(self, source: Source) -> Sampling:
        """The sampling settings of `source`: the recipe's, with the source's own `sampling` keys over them."""
        return dataclasses.replace(self.sampling, **source.sampling)

    def fingerprint(self) -> str:
        """What decides the output; a run folder refuses a recipe with another fingerprint."""
        return stable_hash(self.to_dict())


# Options inside a source's groups, left out of to_dict (so out of recipe.json and the fingerprint)
# while off: runs built before them stay resumable; turning one on changes the fingerprint.
OPTIONS_OFF_BY_DEFAULT = (("pairing", "answer_fix", False), ("fields", "rationale", None),
                          ("dropout", "with_image", False))

_NESTED = {Sampling: "sampling", Pairing: "pairing", Dropout: "dropout", Fields: "fields", Card: "card"}


def _build(cls, data: Any, file: str, key: str):
    """Instantiate dataclass `cls` from a mapping, checking unknown keys and basic types."""
    if not isinstance(data, dict):
        raise RecipeError(file, key, f"expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls) if f.name != "file"}
    kwargs = {}
    for k, v in data.items():
        sub = f"{key}.{k}" if key else k
        if k not in known:
            raise RecipeError(file, sub, f"unknown key (expected one of: {', '.join(sorted(known))})")
        ftype = known[k].type
        nested = next((c for c in _NESTED if c.__name__ == ftype), None)
        if nested is not None:
            v = _build(nested, v, file, sub)
        elif ftype in ("int", "int | None") and v is not None:
            if isinstance(v, bool) or not isinstance(v, int):
                raise RecipeError(file, sub, f"expected an integer, got {v!r}")
        elif ftype == "float" and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise RecipeError(file, sub, f"expected a number, got {v!r}")
        elif ftype == "bool" and not isinstance(v, bool):
            raise RecipeError(file, sub, f"expected true or false, got {v!r}")
        elif ftype in ("str", "str | None") and v is not None and not isinstance(v, str):
            raise RecipeError(file, sub, f"expected a string, got {v!r}")
        elif ftype.startswith("dict") and not isinstance(v, dict):
            raise RecipeError(file, sub, f"expected a mapping, got {v!r}")
        kwargs[k] = v
    missing = [n for n, f in known.items()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and n not in kwargs]
    if missing:
        raise RecipeError(file, f"{key}.{missing[0]}" if key else missing[0], "required key is missing")
    return cls(**kwargs)


def _check(cond: bool, file: str, key: str, reason: str) -> None:
    if not cond:
        raise RecipeError(file, key, reason)


MIN_IMAGE_PIXELS = 32 * 32  # a smaller image carries nothing a model can read


def _check_sampling(s: Sampling, f: str, key: str) -> None:
    _check(s.n >= 1, f, f"{key}.n", f"must be >= 1, got {s.n}")
    _check(s.temperature >= 0, f, f"{key}.temperature", f"must be >= 0, got {s.temperature}")
    _check(0 < s.top_p <= 1, f, f"{key}.top_p", f"must be in (0, 1], got {s.top_p}")
    _check(s.top_k == -1 or s.top_k >= 1, f, f"{key}.top_k", f"must be -1 (off) or >= 1, got {s.top_k}")
    _check(s.max_tokens >= 1, f, f"{key}.max_tokens", f"must be >= 1, got {s.max_tokens}")


def validate(recipe: Recipe) -> Recipe:
    f = recipe.file
    _check_sampling(recipe.sampling, f, "sampling")
    for k in ("batch_size", "unit_size", "shard_rows"):
        _check(getattr(recipe, k) >= 1, f, k, f"must be >= 1, got {getattr(recipe, k)}")
    from mmpr_pipeline import prompts
    _check(recipe.prompt_template in prompts.available(), f, "prompt_template",
           f"unknown template {recipe.prompt_template!r} (available: {', '.join(prompts.available())})")
    _check(len(recipe.sources) > 0, f, "sources", "at least one source is needed")
    seen = set()
    for i, src in enumerate(recipe.sources):
        key = f"sources[{i}]"
        _check(src.name not in seen, f, f"{key}.name", f"duplicate source name {src.name!r}")
        seen.add(src.name)
        _check(src.name.replace("_", "").replace("-", "").isalnum(), f, f"{key}.name",
               f"use letters, digits, '-' and '_' only, got {src.name!r}")
        _check(src.loader in LOADERS, f, f"{key}.loader",
               f"unknown loader {src.loader!r} (expected one of: {', '.join(LOADERS)})")
        if src.loader in ("parquet", "jsonl", "hf_disk"):
            _check(bool(src.path), f, f"{key}.path", f"loader {src.loader!r} needs a path")
        if src.loader == "hf_hub":
            _check(bool(src.dataset), f, f"{key}.dataset", "loader 'hf_hub' needs a dataset name")
        if src.prompt_template is not None:
            _check(src.prompt_template in prompts.available(), f, f"{key}.prompt_template",
                   f"unknown template {src.prompt_template!r} (available: {', '.join(prompts.available())})")
        _check(src.pipeline in PIPELINES, f, f"{key}.pipeline",
               f"unknown pipeline {src.pipeline!r} (expected one of: {', '.join(PIPELINES)})")
        _check(src.images in IMAGE_POLICIES, f, f"{key}.images",
               f"unknown value {src.images!r} (expected one of: {', '.join(IMAGE_POLICIES)})")
        _check(not (src.pipeline == "dropout_ntp" and src.images != "required"), f, f"{key}.images",
               "DropoutNTP drops the image: its rows need one (images: required)")
        if src.answer_type is not None:
            _check(src.answer_type in ANSWER_TYPES, f, f"{key}.answer_type",
                   f"unknown answer_type {src.answer_type!r} (expected one of: {', '.join(ANSWER_TYPES)})")
        elif src.pipeline == "correctness" and src.loader != "generated":
            _check(src.fields.answer_type is not None, f, f"{key}.answer_type",
                   "set answer_type, or fields.answer_type to read it per row")
        _check(src.limit is None or src.limit >= 1, f, f"{key}.limit", f"must be >= 1, got {src.limit}")
        _check(src.pairing.max_pairs_per_question >= 1, f, f"{key}.pairing.max_pairs_per_question",
               f"must be >= 1, got {src.pairing.max_pairs_per_question}")
        _check(0 < src.dropout.ratio < 1, f, f"{key}.dropout.ratio",
               f"must be strictly between 0 and 1, got {src.dropout.ratio}")
        _check(src.dropout.min_words >= 2, f, f"{key}.dropout.min_words",
               f"must be >= 2, got {src.dropout.min_words}")
        _check(src.dropout.n >= 1, f, f"{key}.dropout.n", f"must be >= 1, got {src.dropout.n}")
        _check(src.fields.rationale is None or src.pipeline == "correctness", f, f"{key}.fields.rationale",
               "a reference rationale is a chosen answer to a question with a ground truth: "
               "correctness sources only")
        _check(not src.pairing.answer_fix or src.pipeline == "correctness", f, f"{key}.pairing.answer_fix",
               "rewrites final answers to the reference answer: correctness sources only")
        _build(Sampling, src.sampling, f, f"{key}.sampling")  # known keys, right types
        _check(not (src.pipeline == "dropout_ntp" and "n" in src.sampling), f, f"{key}.sampling.n",
               "a dropout_ntp source samples dropout.n responses per question: set dropout.n instead")
        _check_sampling(recipe.sampling_for(src), f, f"{key}.sampling")
        _check(src.image_max_pixels is None or src.image_max_pixels >= MIN_IMAGE_PIXELS, f,
               f"{key}.image_max_pixels", f"must be >= {MIN_IMAGE_PIXELS} (32x32), got {src.image_max_pixels}")
    return recipe


def from_dict(data: Any, file: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(file, "(top level)", "a recipe is a YAML mapping")
    data = dict(data)
    sources = data.pop("sources", None)
    if sources is None:
        raise RecipeError(file, "sources", "required key is missing")
    if not isinstance(sources, list):
        raise RecipeError(file, "sources", "expected a list of sources")
    built = [_build(Source, s, file, f"sources[{i}]") for i, s in enumerate(sources)]
    recipe = _build(Recipe, {**data, "sources": []}, file, "")
    recipe.sources, recipe.file = built, str(file)
    return validate(recipe)


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load and validate a recipe file; `overrides` are dotted keys, e.g. {"sampling.n": 4}."""
    path = Path(path)
    data = read_yaml(path)
    if data is None:
        raise RecipeError(path, "(file)", "the file is empty (a recipe needs at least name and sources)")
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value, str(path))
    return from_dict(data, str(path))


_PART = re.compile(r"(?P<name>[A-Za-z_][\w-]*)(?:\[(?P<index>[^\]]*)\])?")


def _set_dotted(data: Any, dotted: str, value: Any, file: str = "<recipe>") -> None:
    """Set `dotted` (e.g. "sampling.n", "sources[0].limit") in the raw recipe mapping; a path that
    does not fit the recipe is a RecipeError naming the key, never a KeyError or IndexError."""
    if not isinstance(data, dict):
        raise RecipeError(file, dotted, f"--set needs a recipe that is a YAML mapping, not a {type(data).__name__}")
    parts = dotted.split(".")
    if parts == ["limit"]:  # `limit` alone applies to every source
        for s in data.get("sources") or []:
            if isinstance(s, dict):
                s["limit"] = value
        return
    node, where = data, ""
    for i, part in enumerate(parts):
        m = _PART.fullmatch(part)
        if m is None:
            raise RecipeError(file, dotted, f"cannot read {part!r} as a key (use KEY, KEY.SUB or KEY[N].SUB)")
        name, index = m["name"], m["index"]
        where = f"{where}.{name}" if where else name
        last = i == len(parts) - 1 and index is None
        if last:
            node[name] = value
            return
        child = node.get(name)
        if index is None:
            if child is None:
                child = node[name] = {}
            elif not isinstance(child, dict):
                raise RecipeError(file, dotted, f"{where} is {child!r}, not a mapping with keys")
        else:
            if not isinstance(child, list):
                raise RecipeError(file, dotted, f"{where} is not a list, so [{index}] does not apply")
            if not index.isdigit():
                raise RecipeError(file, dotted, f"expected {where}[N] with a number N, got [{index}]")
            if int(index) >= len(child):
                raise RecipeError(file, dotted, f"{where}[{index}] does not exist ({where} has {len(child)} "
                                                f"entr{'y' if len(child) == 1 else 'ies'})")
            where = f"{where}[{index}]"
            child = child[int(index)]
            if i == len(parts) - 1:
                raise RecipeError(file, dotted, f"set a key of {where} (e.g. {where}.limit), not the whole entry")
            if not isinstance(child, dict):
                raise RecipeError(file, dotted, f"{where} is {child!r}, not a mapping with keys")
        node = child


# YAML 1.1, which PyYAML follows, reads `1e-5` (no dot) as a string; on a command line it is a number.
_SCIENTIFIC = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")


def _numbers(value: Any) -> Any:
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` arguments (of `mmpr build`, `eval` and `train`) as {KEY: value}.

    Each VALUE is read as YAML (`4`, `0.5`, `true`, `[0.8, 0.2, 1.0]`, `{n: 4}`, `null`, `text`),
    with `1e-5`-style numbers read as numbers, also inside lists and mappings.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError("--set", item, "expected KEY=VALUE, e.g. --set sampling.n=4")
        try:
            value = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - SafeLoader, bounded like a file
        except yaml.YAMLError as e:
            raise RecipeError("--set", key, f"cannot read {text!r} as a value: {getattr(e, 'problem', e)}") from None
        except (_YAMLTooBig, RecursionError) as e:
            raise RecipeError("--set", key, f"refused: {e or 'values are nested too deeply'}") from None
        out[key] = _numbers(value)
    return out


def to_json(recipe: Recipe) -> str:
    return json.dumps(recipe.to_dict(), indent=2, sort_keys=True)
