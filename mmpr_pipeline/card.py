"""The dataset card (README.md) and the figures of a run folder, and the `datasets` features of its shards.

A run folder is what the Hub shows: the card's YAML front matter tells the Hub and `load_dataset`
where the shards are (`configs`) and what their columns are (`dataset_info.features`, with `images`
as a list of `Image` so rows come back with PIL images); the body tells people what the pairs are and
how they were made, with a few plots. Everything is read from the run folder, so the card can be
rewritten at any time: `python -m mmpr_pipeline.card RUN_DIR`.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmpr_pipeline.card_figures import FIGURES, plot_figures
from mmpr_pipeline.errors import CardError
from mmpr_pipeline.records import IMAGE_STRUCT, PAIR_SCHEMA, PAIR_TYPES
from mmpr_pipeline.storage import ObjectPath, as_path, parquet_source

TEMPLATE = Path(__file__).resolve().parent.parent / "data_cards" / "card_template.md"
SHARD_GLOB = "data/train-*"  # what the card's `configs` point at (the Hub's naming of a train split)
SHARD_NAME = re.compile(r"^data/train-(\d{5})-of-(\d{5})\.parquet$")
TASK_CATEGORIES = ["image-text-to-text", "visual-question-answering"]
TAGS = [
    "mmpr",
    "mpo",
    "dpo",
    "preference",
    "multimodal",
    "vision-language",
    "reasoning",
    "chain-of-thought",
    "synthetic",
]
SIZE_CATEGORIES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
]
COLUMN_DOCS = {
    "id": "pair id: hash of qid, pair type, chosen and rejected",
    "qid": "question id: hash of source and row content (stable across runs)",
    "source": "source name in the recipe",
    "task": "task family when the source has one",
    "images": "the question's image(s), original encoded bytes (decoded to PIL by `datasets`)",
    "question": "the user turn the model answered: the source question inside the prompt template",
    "answer": "ground-truth answer (empty for DropoutNTP sources)",
    "chosen": "the preferred response",
    "rejected": "the dispreferred response",
    "pair_type": "correctness, format or dropout_ntp",
    "model": "model that sampled the responses",
    "prompt_template": "id of the prompt template the question was asked with",
    "sampling": "JSON of the sampling parameters",
    "chosen_index": "index of the chosen response among the question's samples",
    "rejected_index": "index of the rejected response among the question's samples",
    "cut_ratio": "DropoutNTP: fraction of the chosen response's words kept before the continuation",
    "prefix_words": "DropoutNTP: number of words kept",
    "provenance": 'JSON of the pair options that shaped the pair, {} when none: {"chosen": "reference"} '
    "(the source's reference rationale, chosen_index -1), {\"answer_fix\": true} (the chosen's "
    "final answer rewritten to the reference answer's text)",
}


# --- features: what `datasets` and the Hub read -------------------------------------------------


def hf_features():
    """`datasets.Features` of the pair shards: PAIR_SCHEMA with `images` as `List(Image())`."""
    from datasets import Features, Image, List

    features = Features.from_arrow_schema(PAIR_SCHEMA)
    features["images"] = List(Image())
    return features


@functools.cache
def _features_json() -> bytes:
    return json.dumps({"info": {"features": hf_features().to_dict()}}).encode()


def schema_metadata() -> dict[bytes, bytes]:
    """Arrow schema metadata for every pair shard, so `load_dataset("parquet", ...)` decodes images."""
    return {b"huggingface": _features_json()}


_YAML_DTYPES = {
    pa.string(): "string",
    pa.large_string(): "large_string",
    pa.binary(): "binary",
    pa.bool_(): "bool",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.float32(): "float32",
    pa.float64(): "float64",
}


def _yaml_feature(t: pa.DataType) -> dict:
    if t == IMAGE_STRUCT:
        return {"dtype": "image"}
    if t in _YAML_DTYPES:
        return {"dtype": _YAML_DTYPES[t]}
    if pa.types.is_list(t):
        inner = _yaml_feature(t.value_type)
        # As `datasets` writes it: `list: string`, `list: image`, `list: [fields of a struct]`.
        if list(inner) in (["dtype"], ["struct"]):
            return {"list": next(iter(inner.values()))}
        return {"list": inner}
    if pa.types.is_struct(t):
        return {"struct": [{"name": f.name, **_yaml_feature(f.type)} for f in t]}
    raise CardError(f"no dataset-card type for Arrow type {t}")


def yaml_features(schema: pa.Schema) -> list[dict]:
    """`dataset_info.features` as `datasets` writes it in a card's YAML, computed from an Arrow schema.

    Written here rather than imported from `datasets` so writing a card stays quick; tests check it
    against `datasets.Features._to_yaml_list()`.
    """
    return [{"name": f.name, **_yaml_feature(f.type)} for f in schema]


def size_category(n: int) -> str:
    return next((name for bound, name in SIZE_CATEGORIES if n < bound), "n>1B")


# --- reading a run folder ----------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise CardError(f"{path}: missing (is this a finished run folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CardError(f"{path}: not valid JSON: {e}") from None


def shard_paths(run_dir: Path, stats: dict) -> list[Path]:
    """The pair shards that stats.json lists, checked to exist and to follow the Hub's naming."""
    shards = stats.get("shards")
    if not isinstance(shards, list):
        raise CardError(f"{run_dir / 'stats.json'}: 'shards' must list the pair shards")
    for rel in shards:
        if not SHARD_NAME.match(rel):
            raise CardError(
                f"{run_dir / 'stats.json'}: shard {rel!r} is not named data/train-NNNNN-of-NNNNN.parquet"
            )
        if not (run_dir / rel).is_file():
            raise CardError(f"{run_dir / rel}: shard listed in stats.json is missing")
    return [run_dir / rel for rel in shards]


def read_run(run_dir: str | Path) -> dict:
    """recipe, stats and the shards' schema, row count and sizes (from Parquet footers only, each read
    once); `shard_schemas`: each shard's own schema, for checks that they all match."""
    run_dir = as_path(run_dir)
    recipe = _read_json(run_dir / "recipe.json")
    stats = _read_json(run_dir / "stats.json")
    shards = shard_paths(run_dir, stats)
    shard_schemas, num_rows, num_bytes, download_size = [], 0, 0, 0
    for path in shards:
        meta = pq.read_metadata(parquet_source(path))
        shard_schemas.append(meta.schema.to_arrow_schema().remove_metadata())
        num_rows += meta.num_rows
        num_bytes += sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        download_size += path.stat().st_size
    return dict(
        run_dir=run_dir,
        recipe=recipe,
        stats=stats,
        shards=shards,
        schema=shard_schemas[0] if shard_schemas else PAIR_SCHEMA,
        shard_schemas=shard_schemas,
        num_rows=num_rows,
        num_bytes=num_bytes,
        download_size=download_size,
    )


# --- the card ----------------------------------------------------------------------------------


def card_metadata(run: dict) -> dict:
    """The card's YAML front matter."""
    card = run["recipe"].get("card") or {}
    return {
        "pretty_name": card.get("pretty_name") or f"MMPR pairs: {run['recipe'].get('name', 'run')}",
        "license": card.get("license") or "cc-by-4.0",
        "task_categories": list(TASK_CATEGORIES),
        "tags": list(TAGS),
        "size_categories": [size_category(run["num_rows"])],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": SHARD_GLOB}]}],
        "dataset_info": {
            "features": yaml_features(run["schema"]),
            "splits": [{"name": "train", "num_bytes": run["num_bytes"], "num_examples": run["num_rows"]}],
            "download_size": run["download_size"],
            "dataset_size": run["num_bytes"],
        },
    }


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _arrow_type_text(t: pa.DataType) -> str:
    if t == pa.list_(IMAGE_STRUCT):
        return "list of images"
    return {pa.string(): "string", pa.int64(): "int", pa.float64(): "float"}.get(t, str(t))


def _template_text(template_id: str) -> str:
    from mmpr_pipeline import prompts

    if template_id in prompts.available():
        return prompts.render(template_id, "{question}")  # the template itself
    return f"(template {template_id!r} is not bundled with this version of mmpr-pipeline)"


def _templates_used(shards: list[Path]) -> list[str]:
    """Prompt template ids the pairs were sampled with (one small column read per shard)."""
    used = set()
    for path in shards:
        column = pq.read_table(parquet_source(path), columns=["prompt_template"]).column(0)
        used.update(t for t in column.unique().to_pylist() if t)
    return sorted(used)


def _source_rules(src: dict) -> str:
    pairing, dropout = src.get("pairing") or {}, src.get("dropout") or {}
    if src.get("pipeline") == "dropout_ntp":
        return (
            f"DropoutNTP: keep {dropout.get('ratio')} of the chosen response's words, continue without "
            f"the image; responses under {dropout.get('min_words')} words not cut; "
            f"{dropout.get('n')} chosen per question"
        )
    rules = f"up to {pairing.get('max_pairs_per_question')} pairs per question"
    rules += "; format pairs on" if pairing.get("format_pairs") else "; format pairs off"
    if pairing.get("answer_fix"):
        rules += "; answer fix on (chosen final answers carry the reference answer's text)"
    if (src.get("fields") or {}).get("rationale"):
        rules += f"; reference rationale `{src['fields']['rationale']}` as a chosen candidate"
    return rules


def _verdict_row(name: str, src: dict, st: dict) -> dict:
    """A correctness source's line of the card's "who decided" table."""
    judged = st.get("judge_model") or {}
    both = judged.get("both_decided", 0)
    agreement = f"{judged.get('agree', 0) / both:.1%} of {both:,}" if both else "–"
    return dict(
        dict.fromkeys(("asked", "cache_hits", "failed", "off_format", "disagreed"), 0),
        **{k: v for k, v in judged.items() if k != "agree"},
        **st["verdicts"],
        name=name,
        mode=src.get("judge", "rules"),
        agreement=agreement,
    )


def _source_rows(recipe: dict, stats: dict) -> dict[str, list[dict]]:
    """The card's per-source tables: every source, the DropoutNTP ones, the judged ones, the rejects."""
    by_name = {s.get("name"): s for s in recipe.get("sources", [])}
    rows = dict(sources=[], dropout_sources=[], reject_reasons=[], verdict_sources=[])
    for name, st in (stats.get("sources") or {}).items():
        src = by_name.get(name, {})
        pairs = {t: (st.get("pairs") or {}).get(t, 0) for t in PAIR_TYPES}
        loader = src.get("loader", "?")
        where = src.get("dataset") or src.get("path") or ""
        rows["sources"].append(
            dict(
                st,
                name=name,
                pairs=pairs,
                pipeline=st.get("pipeline", src.get("pipeline", "")),
                correct_rate=_pct(st.get("correct_rate")) if st.get("pipeline") != "dropout_ntp" else "–",
                loader_text=f"{loader} `{where}`" if where else loader,
                limit=src.get("limit") or "all",
                rules=_source_rules(src),
            )
        )
        if st.get("pipeline") == "dropout_ntp":
            rows["dropout_sources"].append(dict(st.get("dropout") or {}, name=name))
        elif st.get("verdicts"):
            rows["verdict_sources"].append(_verdict_row(name, src, st))
        for reason, count in sorted((st.get("reject_reasons") or {}).items()):
            rows["reject_reasons"].append(
                dict(source=name, reason=str(reason).replace("|", "\\|"), count=count)
            )
    return rows


def _context(run: dict, metadata: dict, lengths_note: str) -> dict:
    recipe, stats = run["recipe"], run["stats"]
    totals = dict(stats.get("totals") or {})
    totals_pairs = {t: (totals.get("pairs") or {}).get(t, 0) for t in PAIR_TYPES}
    for k in ("rows", "rejects", "questions", "samples"):
        totals.setdefault(k, 0)
    sampling = recipe.get("sampling") or {}
    prompt_id = recipe.get("prompt_template", "")
    templates = [
        dict(id=t, text=_template_text(t), default=t == prompt_id)
        for t in (run.get("templates") or [prompt_id])
    ]
    return dict(
        pretty_name=metadata["pretty_name"],
        n_pairs=run["num_rows"],
        model=stats.get("model") or recipe.get("model"),
        recipe_name=stats.get("recipe") or recipe.get("name"),
        fingerprint=stats.get("fingerprint", ""),
        created=stats.get("created", ""),
        extra=((recipe.get("card") or {}).get("extra") or "").strip(),
        totals=totals,
        totals_pairs=totals_pairs,
        **_source_rows(recipe, stats),
        decontamination=[dict(b, name=n) for n, b in (stats.get("decontamination") or {}).items()],
        judge_model=(recipe.get("judge_model") or {}).get("model"),
        prompt_template=prompt_id,
        templates=templates,
        sampling_text=", ".join(f"{k} = {v}" for k, v in sampling.items()),
        seed=recipe.get("seed", 0),
        stage_seconds={k: f"{float(v):.1f}" for k, v in (stats.get("stage_seconds") or {}).items()},
        figures=FIGURES,
        lengths_note=lengths_note,
        pass_rate_note=run.get("pass_rate_note", ""),
        preview=(run["run_dir"] / "preview.html").is_file(),
        columns=[
            dict(name=f.name, type=_arrow_type_text(f.type), doc=COLUMN_DOCS.get(f.name, ""))
            for f in run["schema"]
        ],
    )


def render_card(run: dict, lengths_note: str = "") -> str:
    """README.md text of a run (from `read_run`), from the template in data_cards/."""
    from huggingface_hub import DatasetCard, DatasetCardData

    metadata = card_metadata(run)
    card = DatasetCard.from_template(
        DatasetCardData(**metadata), template_path=str(TEMPLATE), **_context(run, metadata, lengths_note)
    )
    # Collapse the blank lines that template blocks leave behind.
    return re.sub(r"\n{3,}", "\n\n", str(card)).rstrip() + "\n"


def write_card(run_dir: str | Path) -> Path:
    """Write RUN_DIR/README.md and RUN_DIR/figures/*.png from the run folder; return the card's path."""
    run = read_run(run_dir)
    run["templates"] = _templates_used(run["shards"])
    note = plot_figures(run)
    text = render_card(run, note)
    path = run["run_dir"] / "README.md"
    if isinstance(path, ObjectPath):  # an object appears whole when written
        path.write_text(text)
        return path
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a card
    return path


# --- checking a card against its run folder ------------------------------------------------------


def check_card(run_dir: str | Path, run: dict | None = None) -> list[str]:
    """Problems with RUN_DIR/README.md: unparsable, or metadata that does not describe the shards.
    `run`: the folder's `read_run`, when the caller has read it already."""
    from huggingface_hub import DatasetCard

    run_dir = as_path(run_dir)
    path = run_dir / "README.md"
    if not path.is_file():
        return [f"{path}: missing (write it with `python -m mmpr_pipeline.card {run_dir}`)"]
    try:
        run = read_run(run_dir) if run is None else run
    except (CardError, OSError, pa.ArrowException) as e:
        return [str(e)]
    try:
        card = DatasetCard(path.read_bytes().decode("utf-8-sig"))  # as DatasetCard.load reads a file
    except Exception as e:  # invalid YAML, front matter that is not a mapping, bad encoding
        return [f"{path}: cannot be parsed as a dataset card: {e}"]
    data = card.data.to_dict()
    expected = card_metadata(run)
    problems = []
    for key in ("license", "pretty_name", "task_categories", "size_categories", "configs"):
        if not data.get(key):
            problems.append(f"{path}: metadata has no {key!r}")
    if data.get("license") and not re.fullmatch(r"[a-z0-9][a-z0-9.+\-]*", str(data["license"])):
        problems.append(
            f"{path}: license {data['license']!r} is not a Hub license id (e.g. cc-by-4.0, mit, other)"
        )
    if data.get("configs") != expected["configs"]:
        problems.append(f"{path}: configs {data.get('configs')!r} do not point at the shards ({SHARD_GLOB})")
    info = data.get("dataset_info") or {}
    if info.get("features") != expected["dataset_info"]["features"]:
        problems.append(f"{path}: dataset_info.features do not match the shards' schema")
    if info.get("splits") != expected["dataset_info"]["splits"]:
        problems.append(
            f"{path}: dataset_info.splits say {info.get('splits')!r}, the shards hold {run['num_rows']} rows"
        )
    if data.get("size_categories") != expected["size_categories"]:
        problems.append(f"{path}: size_categories should be {expected['size_categories']}")
    for rel in FIGURES.values():
        if f"]({rel})" in card.text and not (run_dir / rel).is_file():
            problems.append(f"{run_dir / rel}: figure linked from the card is missing")
    return problems


def main(argv: list[str] | None = None) -> int:
    """`python -m mmpr_pipeline.card RUN_DIR`: (re)write a run's card; errors end as `mmpr`'s do
    (MMPR_DEBUG=1 adds the traceback)."""
    from mmpr_pipeline.error_policy import USER_ERROR, debug_requested, report

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mmpr_pipeline.card RUN_DIR", file=sys.stderr)
        return USER_ERROR
    try:
        print(write_card(argv[0]))
    except Exception as e:  # noqa: BLE001 - the CLI's one error policy: a code and one line
        # no --debug flag here: MMPR_DEBUG=1, which `mmpr --debug` also reads, shows the traceback
        return report(
            e, debug_requested(), debug=f"MMPR_DEBUG=1 python -m mmpr_pipeline.card {shlex.quote(argv[0])}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
