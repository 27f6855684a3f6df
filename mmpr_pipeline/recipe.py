"""Recipes: what to build, from which sources, with which model. YAML in, validated dataclasses out.

Every validation error names the file, the key (dotted path) and the reason, so a user fixing a
recipe never has to guess which of forty lines is wrong. The dataclasses are read by the one config
mechanism (`mmpr_pipeline/config.py`, shared with the training config): each field carries its help
(`mmpr build --list-options` prints it) and each dataclass checks its own values in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpr_pipeline import storage
from mmpr_pipeline.config import (
    ConfigError,
    build,
    check,
    option,
    parse_overrides,  # noqa: F401 - re-exported: callers import it from here
    read_yaml,
    set_dotted,
)
from mmpr_pipeline.decontam import IMAGE_DISTANCE, NGRAM
from mmpr_pipeline.records import PIPELINES, WHITE, stable_hash

ANSWER_TYPES = ("multiple_choice", "number", "yes_no", "text", "math", "vqa", "chart", "document")
LOADERS = ("generated", "parquet", "jsonl", "hf_disk", "hf_hub")
IMAGE_POLICIES = ("required", "optional", "none")
DEMO_MODEL = "demo"  # the bundled tiny Qwen2-VL model, built (and trained) locally
DEMO_JUDGE = "demo-judge"  # the bundled tiny text judge (demo_judge.py), built (and trained) locally
JUDGE_MODES = ("rules", "rules+model", "model")  # who decides a source's verdicts (scoring/model_judge.py)
# A judge's reply counts when the model's own probability of it is at least this. 0.7 rather than 0.5:
# on the demo judge's labelled sets it removed both held-out false accepts and 2 of 3 on the judge
# corpus, for 16 fewer of 717 free-form answers decided (bench_model_judge.json, README).
JUDGE_MIN_PROBABILITY = 0.7


RecipeError = ConfigError  # the one error type of recipes and training configs


MIN_IMAGE_PIXELS = 32 * 32  # a smaller image carries nothing a model can read


def _one_of(value: Any, allowed: tuple[str, ...], what: str = "value") -> str:
    return f"unknown {what} {value!r} (expected one of: {', '.join(allowed)})"


def _templates() -> list[str]:
    from mmpr_pipeline import prompts  # imported late: prompts reads its template files

    return prompts.available()


@dataclass
class Sampling:
    n: int = option(8, help="responses sampled per question")
    temperature: float = option(1.0, help="sampling temperature (0: greedy)")
    top_k: int = option(-1, help="sample from the k most likely tokens (-1: off)")
    top_p: float = option(1.0, help="nucleus sampling: the smallest set of tokens with this probability mass")
    max_tokens: int = option(256, help="most tokens per response")
    # Seeded per question, the same recipe gives the same samples however questions are batched,
    # spread over replicas, or resumed.
    reproducible: bool = option(True, help="seed each question's request from (recipe seed, qid)")

    def __post_init__(self) -> None:
        check(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k == -1 or self.top_k >= 1, "top_k", f"must be -1 (off) or >= 1, got {self.top_k}")
        check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")


@dataclass
class Pairing:
    max_pairs_per_question: int = option(15, help="most (chosen, rejected) pairs kept per question")
    format_pairs: bool = option(
        True,
        help="also pair correct responses (chosen) with ones whose final answer cannot be read (rejected)",
    )
    # InternVL's --answer-fix: the rest of the response stays byte-identical.
    answer_fix: bool = option(
        False,
        help='rewrite a chosen response\'s final answer (its "Final answer:" line '
        "or last \\boxed{}) to the reference answer's own text (correctness sources)",
    )

    def __post_init__(self) -> None:
        check(
            self.max_pairs_per_question >= 1,
            "max_pairs_per_question",
            f"must be >= 1, got {self.max_pairs_per_question}",
        )


@dataclass(frozen=True)
class SampleSettings:
    """What the sampling stage needs of one source (Recipe.sample_settings): its prompt template, its
    sampling (the recipe's with the source's overrides; `n` is dropout.n for DropoutNTP), its
    DropoutNTP settings (None for a correctness source), its image cap and transparency colour."""

    template: str
    sampling: Sampling
    dropout: Dropout | None = None
    image_max_pixels: int | None = None
    image_background: tuple[int, int, int] = WHITE


@dataclass
class Dropout:
    ratio: float = option(0.5, help="keep the first int(N * ratio) words of the chosen response")
    min_words: int = option(8, help="responses shorter than this are not cut (skipped, counted)")
    n: int = option(1, help="chosen responses sampled per question")
    # The paper's DropoutNTP (InternVL's `sr0.5_wo_image`) continues without the images; InternVL also
    # released `sr0.5_with_image` files. Recorded in pair provenance.
    with_image: bool = option(False, help="continue the prefix with the question's images")

    def __post_init__(self) -> None:
        check(0 < self.ratio < 1, "ratio", f"must be strictly between 0 and 1, got {self.ratio}")
        check(self.min_words >= 2, "min_words", f"must be >= 2, got {self.min_words}")
        check(self.n >= 1, "n", f"must be >= 1, got {self.n}")


@dataclass
class Fields:
    """Column names in the source for each thing the pipeline needs."""

    image: str = option("image", help="column with the image (or a list of images)")
    question: str = option("question", help="column with the question")
    answer: str = option("answer", help="column with the reference answer")
    options: str | None = option(None, help="column with multiple-choice options")
    response: str | None = option(None, help="dropout_ntp: column with an existing response to use as chosen")
    task: str | None = option(None, help="column with a task name (default: a `task` column)")
    answer_type: str | None = option(
        None, help="column with a per-row answer type, when the source mixes them"
    )
    rationale: str | None = option(
        None, help="correctness: column with a ground-truth worked solution, added as a chosen candidate"
    )


@dataclass
class RowSet:
    """Where a loader reads rows and how (stages/load.py): the keys a source and a benchmark share."""

    name: str = option(help="the source's name: letters, digits, '-' and '_'; unique in the recipe")
    loader: str = option(help=f"how rows are read: {' | '.join(LOADERS)}")
    path: str | None = option(
        None, help="parquet / jsonl / hf_disk: a file, folder or glob; local or s3://bucket/key"
    )
    dataset: str | None = option(None, help="hf_hub: a dataset name for `datasets.load_dataset`")
    config: str | None = option(None, help="hf_hub: the dataset's config name")
    split: str = option("train", help="the dataset split to read")
    generator: dict[str, Any] = option(
        default_factory=dict, help="generated: options of the built-in task generator (e.g. n, offset)"
    )
    fields: Fields = option(default_factory=Fields, help="column names in the source")
    limit: int | None = option(None, help="read the first N rows")
    images: str = option(
        "required",
        help="required: every row has one image or a list of them; optional: a row "
        "without one is a text-only question; none: a text-only source (the image field is not read)",
    )


@dataclass
class Source(RowSet):
    answer_type: str | None = option(
        None,
        help="the answer type of every row "
        f"({' | '.join(ANSWER_TYPES)}); else fields.answer_type names a column",
    )
    pipeline: str = option("correctness", help=f"how pairs are made: {' | '.join(PIPELINES)}")
    prompt_template: str | None = option(
        None, help="default: the recipe's for correctness, `raw` for dropout_ntp"
    )
    pairing: Pairing = option(default_factory=Pairing, help="how pairs are formed")
    dropout: Dropout = option(default_factory=Dropout, help="DropoutNTP settings (dropout_ntp sources)")
    # The per-source overrides are off by default and outside the fingerprint while unset (see
    # Recipe.to_dict), so recipes from before them keep their fingerprint.
    sampling: dict[str, Any] = option(
        default_factory=dict,
        help="keys of `sampling` that replace the recipe's for this source, e.g. {n: 4, max_tokens: 512}",
    )
    image_max_pixels: int | None = option(
        None,
        help="downscale (keeping aspect) every image with more pixels before "
        "the engine sees it; the pairs carry that image, so training sees what "
        "sampling saw",
    )
    image_background: list[int] = option(
        default_factory=lambda: list(WHITE),
        help="[r, g, b] that transparent images are composited over before anyone sees them "
        "(records.decode_image; white, as vLLM)",
    )
    judge: str = option(
        "rules",
        help="who decides its verdicts: rules | rules+model (the judge model decides what the rules "
        "leave undecided) | model (the judge model decides every answer); see `judge_model`",
    )

    def __post_init__(self) -> None:
        # in the order a reader meets the keys: where rows come from, what they are, their options
        self._check_input()
        self._check_pipeline()
        self._check_pair_options()
        self._check_sampling_and_images()

    def _check_input(self) -> None:
        check(
            self.name.replace("_", "").replace("-", "").isalnum(),
            "name",
            f"use letters, digits, '-' and '_' only, got {self.name!r}",
        )
        check(self.loader in LOADERS, "loader", _one_of(self.loader, LOADERS, "loader"))
        if self.loader in ("parquet", "jsonl", "hf_disk"):
            check(bool(self.path), "path", f"loader {self.loader!r} needs a path")
            problem = storage.url_problem(self.path) if storage.is_url(self.path) else None
            check(problem is None, "path", str(problem))
        if self.loader == "hf_hub":
            check(bool(self.dataset), "dataset", "loader 'hf_hub' needs a dataset name")
        if self.prompt_template is not None:
            check(
                self.prompt_template in _templates(),
                "prompt_template",
                f"unknown template {self.prompt_template!r} (available: {', '.join(_templates())})",
            )

    def _check_pipeline(self) -> None:
        check(self.pipeline in PIPELINES, "pipeline", _one_of(self.pipeline, PIPELINES, "pipeline"))
        check(self.images in IMAGE_POLICIES, "images", _one_of(self.images, IMAGE_POLICIES))
        check(
            not (self.pipeline == "dropout_ntp" and self.images != "required"),
            "images",
            "DropoutNTP drops the image: its rows need one (images: required)",
        )
        if self.answer_type is not None:
            check(
                self.answer_type in ANSWER_TYPES,
                "answer_type",
                _one_of(self.answer_type, ANSWER_TYPES, "answer_type"),
            )
        elif self.pipeline == "correctness" and self.loader != "generated":
            check(
                self.fields.answer_type is not None,
                "answer_type",
                "set answer_type, or fields.answer_type to read it per row",
            )

    def _check_pair_options(self) -> None:
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")
        check(
            self.fields.rationale is None or self.pipeline == "correctness",
            "fields.rationale",
            "a reference rationale is a chosen answer to a question with a ground truth: "
            "correctness sources only",
        )
        check(
            not self.pairing.answer_fix or self.pipeline == "correctness",
            "pairing.answer_fix",
            "rewrites final answers to the reference answer: correctness sources only",
        )

    def _check_sampling_and_images(self) -> None:
        # Known keys, right types, valid values: each key alone, so also over any recipe's sampling.
        build(Sampling, self.sampling, key="sampling")
        check(
            not (self.pipeline == "dropout_ntp" and "n" in self.sampling),
            "sampling.n",
            "a dropout_ntp source samples dropout.n responses per question: set dropout.n instead",
        )
        check(self.judge in JUDGE_MODES, "judge", _one_of(self.judge, JUDGE_MODES, "judge"))
        check(
            self.judge == "rules" or self.pipeline == "correctness",
            "judge",
            "a judge model rates answers against a ground truth: correctness sources only",
        )
        check(
            self.image_max_pixels is None or self.image_max_pixels >= MIN_IMAGE_PIXELS,
            "image_max_pixels",
            f"must be >= {MIN_IMAGE_PIXELS} (32x32), got {self.image_max_pixels}",
        )
        check(
            len(self.image_background) == 3
            and all(isinstance(c, int) and 0 <= c <= 255 for c in self.image_background),
            "image_background",
            f"must be [r, g, b] with each in 0..255, got {self.image_background}",
        )


@dataclass
class Benchmark(RowSet):
    """An evaluation set whose images and questions must not reach the pairs (decontamination). Read
    by the sources' loaders, with a source's keys (of `fields`, image and question are read)."""

    name: str = option(help="the benchmark's name (named in the reasons of rows set aside)")
    split: str = option("test", help="the dataset split to read")
    images: str = option(
        "optional", help="required | optional | none: as a source's (text-only rows still check questions)"
    )
    image_distance: int = option(
        IMAGE_DISTANCE,
        help="a source image within this many bits (pHash + dHash, of 128) of a benchmark image, "
        "or of a crop of it, is a leak",
    )
    ngram: int = option(
        NGRAM, help="a source question sharing a span of this many words with a benchmark question is a leak"
    )

    def __post_init__(self) -> None:
        self.as_source()  # the same checks as a source's (name, loader, path, images)
        check(
            0 <= self.image_distance <= 64, "image_distance", f"must be in 0..64, got {self.image_distance}"
        )
        check(self.ngram >= 3, "ngram", f"must be >= 3 words, got {self.ngram}")

    def as_source(self) -> Source:
        """The benchmark as a source, for the loaders (its answers are never read)."""
        rows = {f.name: getattr(self, f.name) for f in dataclasses.fields(RowSet)}
        return Source(**rows, answer_type="text")


NEAR_DUPLICATES = ("exact", "fuzzy", "off")


@dataclass
class JudgeModel:
    """The judge model of sources with `judge: rules+model` or `judge: model` (scoring/model_judge.py)."""

    model: str = option(
        DEMO_JUDGE, help=f"a text model (Hub id or local folder), or {DEMO_JUDGE!r} (the bundled tiny judge)"
    )
    engine: dict[str, Any] = option(
        default_factory=dict, help="passed to the judge's `vllm.LLM` (its own replicas, placed as sampling's)"
    )
    temperature: float = option(
        0.0, help="the judge's sampling: greedy, one constrained yes/no token (only 0 is accepted)"
    )
    min_probability: float = option(
        JUDGE_MIN_PROBABILITY,
        help="a reply counts only if the model's own unconstrained probability of it is at least this",
    )
    agreement_sample: float = option(
        0.1,
        help="rules+model: share of rule-decided answers also sent to the judge, to measure agreement "
        "(their verdicts stay the rules')",
    )
    timeout_s: float = option(
        60.0, help="seconds one judge request may take; then the answer stays undecided"
    )
    cache_dir: str | None = option(
        None,
        help="folder of cached verdicts (default RUN_DIR/judge_cache); share one between runs to never "
        "ask twice (not part of the fingerprint)",
    )

    def __post_init__(self) -> None:
        check(self.temperature == 0, "temperature", f"the judge is greedy: must be 0, got {self.temperature}")
        check(
            0 <= self.min_probability < 1, "min_probability", f"must be in [0, 1), got {self.min_probability}"
        )
        check(
            0 <= self.agreement_sample <= 1,
            "agreement_sample",
            f"must be in [0, 1], got {self.agreement_sample}",
        )
        check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")


@dataclass
class Card:
    pretty_name: str | None = option(None, help="the dataset card's title (default: the recipe's name)")
    license: str = option("cc-by-4.0", help="the dataset card's license")
    extra: str = option("", help="Markdown added to the dataset card")


@dataclass
class Recipe:
    name: str = option(help="the dataset's name")
    sources: list[Source] = option(help="where questions come from, and how each makes pairs")
    model: str = option(
        DEMO_MODEL,
        help="the policy model that samples responses: a Hub id, a local folder, "
        f"or {DEMO_MODEL!r} (the bundled tiny model)",
    )
    seed: int = option(0, help="the seed of sampling and pairing")
    prompt_template: str = option("cot_final_answer", help="the prompt template of correctness sources")
    engine: dict[str, Any] = option(default_factory=dict, help="passed through to `vllm.LLM`")
    sampling: Sampling = option(default_factory=Sampling, help="how responses are sampled")
    batch_size: int = option(16, help="questions per engine call")
    unit_size: int = option(64, help="questions per resumable work unit")
    shard_rows: int = option(5000, help="pairs per output shard")
    card: Card = option(default_factory=Card, help="the dataset card")
    judge_model: JudgeModel = option(
        default_factory=JudgeModel, help="the judge model of sources with `judge: rules+model` or `model`"
    )
    decontamination: list[Benchmark] = option(
        default_factory=list,
        help="evaluation sets: a source row whose image or question is a near-duplicate of one of "
        "theirs is set aside (rejects/) before sampling",
    )
    near_duplicates: str = option(
        "exact",
        help="rows repeating an earlier row of any source, first kept: exact (same image hashes and "
        f"normalised question) | fuzzy (images within {IMAGE_DISTANCE} bits, same normalised question) | off",
    )
    preview: bool = option(
        True, help="write RUN_DIR/preview.html after a build (not part of the fingerprint)"
    )
    trust_remote_code: bool = option(
        False,
        help="let a model folder run its own Python code (its config's auto_map); without it such a "
        "folder is refused (not part of the fingerprint)",
    )
    file: str = option(
        "", help="where the recipe was loaded from (not part of the fingerprint)", settable=False
    )

    def __post_init__(self) -> None:
        """The checks that need the whole recipe; each part checked its own values when it was made."""
        for k in ("batch_size", "unit_size", "shard_rows"):
            check(getattr(self, k) >= 1, k, f"must be >= 1, got {getattr(self, k)}")
        check(
            self.prompt_template in _templates(),
            "prompt_template",
            f"unknown template {self.prompt_template!r} (available: {', '.join(_templates())})",
        )
        check(len(self.sources) > 0, "sources", "at least one source is needed")
        seen = set()
        for i, src in enumerate(self.sources):
            check(src.name not in seen, f"sources[{i}].name", f"duplicate source name {src.name!r}")
            seen.add(src.name)
        names = [b.name for b in self.decontamination]
        for i, name in enumerate(names):
            check(name not in names[:i], f"decontamination[{i}].name", f"duplicate benchmark name {name!r}")
        check(
            self.near_duplicates in NEAR_DUPLICATES,
            "near_duplicates",
            _one_of(self.near_duplicates, NEAR_DUPLICATES),
        )

    def template_for(self, source: Source) -> str:
        if source.prompt_template:
            return source.prompt_template
        return self.prompt_template if source.pipeline == "correctness" else "raw"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("file")
        d.pop("preview")  # changes no data: switching it must not stop a resume
        # while unset or at their defaults, recipes from before them keep their fingerprint
        if not d["decontamination"]:
            d.pop("decontamination")
        if d["near_duplicates"] == "exact":
            d.pop("near_duplicates")
        d.pop("trust_remote_code")  # likewise
        d["judge_model"].pop("cache_dir")  # where verdicts are kept changes none of them
        if all(src["judge"] == "rules" for src in d["sources"]):  # no judge model: as before it existed
            d.pop("judge_model")
        for src in d[
            "sources"
        ]:  # unset per-source overrides: recipes from before them keep their fingerprint
            for key, unset in (
                ("sampling", {}),
                ("image_max_pixels", None),
                ("image_background", list(WHITE)),
                ("judge", "rules"),
            ):
                if src.get(key) == unset:
                    src.pop(key)
            for group, key, off in OPTIONS_OFF_BY_DEFAULT:  # likewise the pair options while off
                if src[group].get(key) == off:
                    src[group].pop(key)
        return d

    def judge_modes(self) -> dict[str, str]:
        """Sources whose verdicts a judge model (also) decides: {name: rules+model | model}."""
        return {s.name: s.judge for s in self.sources if s.judge != "rules"}

    def sampling_for(self, source: Source) -> Sampling:
        """The sampling settings of `source`: the recipe's, with the source's own `sampling` keys
        over them; a dropout_ntp source asks for `dropout.n` responses per question, so that is the
        `n` its samples and pairs record (they recorded the recipe's `n` before)."""
        sampling = dataclasses.replace(self.sampling, **source.sampling)
        if source.pipeline == "dropout_ntp":
            sampling = dataclasses.replace(sampling, n=source.dropout.n)
        return sampling

    def sample_settings(self) -> dict[str, SampleSettings]:
        """Each source's settings for the sampling stage, resolved here once: the one route from the
        recipe to the engine request and to what the sample and pair rows record."""
        return {
            s.name: SampleSettings(
                template=self.template_for(s),
                sampling=self.sampling_for(s),
                dropout=s.dropout if s.pipeline == "dropout_ntp" else None,
                image_max_pixels=s.image_max_pixels,
                image_background=tuple(s.image_background),
            )
            for s in self.sources
        }

    def fingerprint(self) -> str:
        """What decides the output; a run folder refuses a recipe with another fingerprint."""
        return stable_hash(self.to_dict())


# Options inside a source's groups, left out of to_dict (so out of recipe.json and the fingerprint)
# while off: runs built before them stay resumable; turning one on changes the fingerprint.
OPTIONS_OFF_BY_DEFAULT = (
    ("pairing", "answer_fix", False),
    ("fields", "rationale", None),
    ("dropout", "with_image", False),
)


def from_dict(data: Any, file: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(file, "(top level)", "a recipe is a YAML mapping")
    if data.get("near_duplicates") is False:  # YAML reads a bare `off` as false (`--set` values too)
        data = {**data, "near_duplicates": "off"}
    return build(Recipe, data, file, fixed={"file": str(file)})


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load and validate a recipe file; `overrides` are dotted keys, e.g. {"sampling.n": 4}."""
    path = Path(path)
    data = read_yaml(path)
    if data is None:
        raise RecipeError(path, "(file)", "the file is empty (a recipe needs at least name and sources)")
    for dotted, value in (overrides or {}).items():
        if dotted == "limit" and isinstance(data, dict):  # `limit` alone applies to every source
            for s in data.get("sources") or []:
                if isinstance(s, dict):
                    s["limit"] = value
        else:
            set_dotted(data, dotted, value, str(path))
    return from_dict(data, str(path))


def to_json(recipe: Recipe) -> str:
    return json.dumps(recipe.to_dict(), indent=2, sort_keys=True)
