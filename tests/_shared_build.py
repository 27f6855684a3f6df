"""One real build (local Ray, vLLM on CPU, the trained demo model) shared by the test files that only
read a run: test_build_e2e, test_pair_direction, test_prompt_shapes and test_answer_fix; the real
builds of test_source_overrides (per-source n, max_tokens and image_max_pixels),
test_dropout_with_image (`dropout.with_image`) and test_prompt_templates (a source under the
`r1_think_boxed` template) and test_judge_stage (a `rules+model` source: the recipe's judge model,
an untrained demo judge, is the build's second engine); and the uninterrupted references of
test_engine_failure (its demo sources) and test_s3_sources.

Each of them used to build its own small recipe, and a build's cost is almost all its engine start
(sampling these few questions takes seconds). Their sources now go into one recipe, built once per
test session: under pytest-xdist the first worker that asks builds it while the other waits on a
file lock, in the session's temporary folder both workers share. Each file checks its own sources
(SOURCES); a test that writes into the run works on a copy. Near-duplicate detection is on (the
recipe default): sources drawn from one generator take other seeds or offsets, so no row repeats
another source's.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
from pathlib import Path

import yaml

from mmpr_pipeline import judge_cases, tasks

REPO = Path(__file__).resolve().parent.parent
# The tests' "shapes": every family of the demo's generator, option letters and bar charts included
# (the default recipe keeps only count and compare, what the demo model can learn from; see demo.yaml).
SHAPES_FAMILIES = ["count", "color", "bars", "compare"]

# Which of the shared recipe's sources each reader checks.
SOURCES = {
    "build_e2e": ("shapes", "describe"),
    "pair_direction": ("shapes", "describe", "captions"),
    "prompt_shapes": ("multi", "text", "views"),
    "answer_fix": ("mc",),
    "s3_sources": ("shapes", "describe", "tally"),
    "source_overrides": ("plain", "capped", "small", "describe_capped"),
    "dropout_with_image": ("with_image", "without_image"),
    "prompt_templates": ("r1",),
    "judge_stage": ("words",),
}

# test_pair_direction: captions given as the rows' responses (`fields.response`).
CAPTIONS = [
    "A plain picture with a few coloured shapes placed on a light background, nothing else at all.",
    "Several small geometric shapes in different colours are scattered across this simple image.",
    "The picture shows coloured circles and squares of various sizes against a pale backdrop.",
]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def captions_source(d: Path, captions: list[str] = CAPTIONS) -> list[dict]:
    """A JSON Lines source whose rows carry their own response, one per caption, under `d`
    (test_pair_direction; test_model_matrix's builds, with a fourth caption)."""
    for i, row in enumerate(tasks.generate(len(captions), seed=11, families=["describe"])):
        (d / f"img{i}.png").write_bytes(row["image"])
    _jsonl(
        d / "captions.jsonl",
        [
            dict(image=f"img{i}.png", question="Describe this image.", caption=c)
            for i, c in enumerate(captions)
        ],
    )
    return [
        dict(
            name="captions",
            loader="jsonl",
            path=str(d / "captions.jsonl"),
            pipeline="dropout_ntp",
            fields={"response": "caption"},
            dropout={"ratio": 0.5, "min_words": 8},
        )
    ]


def _prompt_shapes(d: Path) -> list[dict]:
    """2- and 3-image questions (with and without `<image>` placeholders), text-only questions and
    DropoutNTP on multi-image questions (test_prompt_shapes), sampled n=6."""
    rows = list(tasks.generate(12, seed=21, families=["color"]))
    for i, r in enumerate(rows):
        (d / f"{i}.png").write_bytes(r["image"])
    # Multiple-choice questions the demo model answers with a letter, right or wrong by turns: pairs
    # for every shape. 2 images at their placeholders, or 3 images first.
    multi = []
    for k in range(6):
        r = rows[k]
        names = [f"{k}.png", f"{k + 6}.png"] + ([f"{(k + 3) % 12}.png"] if k % 2 else [])
        question = r["question"] if k % 2 else "<image>\n<image>\n" + r["question"]  # placeholders
        multi.append(dict(image=names, question=question, answer=r["answer"], options=r["options"]))
    # Without its image the demo model rambles and no sample is right: a worked solution (a chosen
    # candidate, `fields.rationale`) gives the text-only questions pairs whatever the model samples.
    text = [
        dict(
            question=r["question"],
            answer=r["answer"],
            options=r["options"],
            solution=f"The option that names the colour. Final answer: {r['answer']}",
        )
        for r in rows[6:12]
    ]
    views = [
        dict(image=[f"{i}.png" for i in idx], question="Describe these images.")
        for idx in ((0, 1), (4, 5, 6), (8, 9, 10), (2, 3, 7))
    ]
    for name, data in (("multi", multi), ("text", text), ("views", views)):
        _jsonl(d / f"{name}.jsonl", data)
    sampling = dict(n=6, max_tokens=40)
    return [
        dict(
            name="multi",
            loader="jsonl",
            path=str(d / "multi.jsonl"),
            answer_type="multiple_choice",
            fields=dict(options="options"),
            sampling=sampling,
        ),
        dict(
            name="text",
            loader="jsonl",
            path=str(d / "text.jsonl"),
            answer_type="multiple_choice",
            fields=dict(options="options", rationale="solution"),
            images="none",
            sampling=sampling,
        ),
        dict(
            name="views",
            loader="jsonl",
            path=str(d / "views.jsonl"),
            pipeline="dropout_ntp",
            dropout=dict(min_words=4),
        ),
    ]


def _source_overrides() -> list[dict]:
    """4 questions each with the recipe's sampling, n=2 and 6 tokens, n=6 and images capped at 56x56
    pixels, and DropoutNTP capped at 12 tokens (test_source_overrides)."""
    shapes = dict(seed=5, families=["count", "color"])
    return [
        dict(name="plain", loader="generated", generator=dict(shapes), limit=4),
        dict(
            name="capped",
            loader="generated",
            generator=dict(shapes, offset=4),
            limit=4,
            sampling=dict(n=2, max_tokens=6),
        ),
        dict(
            name="small",
            loader="generated",
            generator=dict(shapes, offset=8),
            limit=4,
            sampling=dict(n=6),
            image_max_pixels=56 * 56,
        ),
        # DropoutNTP: its first response and its continuations follow the source's cap
        dict(
            name="describe_capped",
            loader="generated",
            generator=dict(seed=6, families=["describe"]),
            limit=4,
            pipeline="dropout_ntp",
            dropout=dict(min_words=4),
            sampling=dict(max_tokens=12),
        ),
    ]


def _dropout_with_image() -> list[dict]:
    """Two DropoutNTP sources of 3 describe questions, two responses each, one continuing with the
    images (test_dropout_with_image)."""
    return [
        dict(
            name=name,
            loader="generated",
            generator=dict(seed=8, families=["describe"], offset=offset),
            limit=3,
            pipeline="dropout_ntp",
            dropout=dict(ratio=0.5, min_words=8, n=2, **extra),
        )
        for name, offset, extra in (("with_image", 0, dict(with_image=True)), ("without_image", 3, {}))
    ]


def _r1_template() -> list[dict]:
    """6 questions of the demo's shapes generator (after the 12 of "shapes") under the R1 template
    (test_prompt_templates)."""
    return [
        dict(
            name="r1",
            loader="generated",
            generator=dict(seed=1, families=SHAPES_FAMILIES, offset=12),
            limit=6,
            prompt_template="r1_think_boxed",
        )
    ]


def _answer_fix(d: Path) -> list[dict]:
    """8 colour/bar questions (the demo model picks their letter at chance: right and wrong samples)
    whose reference is the letter in parentheses ("(A)"), with the task's worked solution as the
    rationale (test_answer_fix)."""
    rows = []
    for i, q in enumerate(tasks.generate(8, seed=21, families=["color", "bars"])):
        (d / f"mc{i}.png").write_bytes(q["image"])
        rows.append(
            dict(
                image=f"mc{i}.png",
                question=q["question"],
                options=q["options"],
                answer=f"({q['answer']})",
                solution=q["response"],
            )
        )
    _jsonl(d / "mc.jsonl", rows)
    return [
        dict(
            name="mc",
            loader="jsonl",
            path=str(d / "mc.jsonl"),
            answer_type="multiple_choice",
            fields={"options": "options", "rationale": "solution"},
            pairing={"answer_fix": True},
            sampling=dict(max_tokens=64),
        )
    ]


# test_s3_sources: a third generated source, so each file loader there has one (2 rows: one unit).
TALLY = {"name": "tally", "loader": "generated", "generator": {"seed": 3, "families": ["count"]}}


def _tally() -> list[dict]:
    """test_s3_sources' third source, generated; that file builds the same rows from files on S3."""
    return [dict(TALLY, limit=2)]


def _judge_words(d: Path) -> list[dict]:
    """test_judge_stage: 8 counting questions whose reference is in words ("three circles"): the demo
    model's bare digits leave the rules undecided, so the judge model has work. Seed 31: no other
    source draws these images."""
    path = judge_cases.write_count_words_source(d / "words", 8, seed=31)
    return [dict(name="words", loader="jsonl", path=path, answer_type="text", judge="rules+model")]


def _judge_model(d: Path) -> dict:
    """The demo judge's architecture with seeded random weights (built in seconds): test_judge_stage
    tests the stage, not the judge's accuracy, so replies count whatever their probability, and every
    rule-decided answer of `words` is asked too (its agreement figure then has cases)."""
    from mmpr_pipeline import demo_judge

    model = str(demo_judge.build(d / "judge"))
    return dict(model=model, agreement_sample=1.0, min_probability=0.0, engine=dict(max_model_len=512))


def write_recipe(d: Path, model: str) -> Path:
    """The demo recipe at small scale (shapes 12, describe 6, n=4, 48 tokens, shards of 20 pairs) plus
    the readers' own sources, their files under `d`; returns the recipe file."""
    data = yaml.safe_load((REPO / "data_cards" / "demo.yaml").read_text())
    data.update(model=model, unit_size=4, batch_size=8, shard_rows=20)
    data["sampling"].update(n=4, max_tokens=48)
    data["sources"][0]["limit"] = 12
    data["sources"][0]["generator"]["families"] = SHAPES_FAMILIES
    data["sources"][1]["limit"] = 6
    data["sources"] += captions_source(d) + _prompt_shapes(d) + _answer_fix(d)
    data["sources"] += _tally()
    data["sources"] += _source_overrides() + _dropout_with_image() + _r1_template()
    data["sources"] += _judge_words(d)
    data["judge_model"] = _judge_model(d)
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def shared_root(tmp_path_factory) -> Path:
    """The session's temporary folder: under pytest-xdist the one above each worker's own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_build(request, model: str) -> tuple[Path, dict]:
    """(run folder, the stats `pipeline.build` returned) of the session's shared build, building it
    on the session's local Ray (`ray_local`) if no worker has yet."""
    from mmpr_pipeline import pipeline
    from mmpr_pipeline import recipe as recipe_mod

    root = shared_root(request.getfixturevalue("tmp_path_factory"))
    d = root / "shared-build"
    returned = d / "returned.pkl"  # written last: the build is whole
    with open(root / "shared-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not returned.exists():
            request.getfixturevalue("ray_local")
            d.mkdir(exist_ok=True)
            stats = pipeline.build(recipe_mod.load(write_recipe(d, model)), d / "run")
            returned.write_bytes(pickle.dumps(stats))
    return d / "run", pickle.loads(returned.read_bytes())


def samples(run: Path, sources) -> list[dict]:
    """The sample rows of `sources` (names) in `run`, unit file by unit file."""
    import pyarrow.parquet as pq

    from mmpr_pipeline import shards

    return [r for p in shards.unit_files(run) for r in pq.read_table(p).to_pylist() if r["source"] in sources]


def pairs(run: Path, sources) -> list[dict]:
    """The pair rows of `sources` (names) in `run`'s shards, in shard order."""
    import pyarrow.parquet as pq

    shard_files = sorted((run / "data").glob("train-*.parquet"))
    return [r for p in shard_files for r in pq.read_table(p).to_pylist() if r["source"] in sources]


def recipe(run: Path, **overrides):
    """The shared build's recipe (with `overrides`), as its run was built."""
    from mmpr_pipeline import recipe as recipe_mod

    return recipe_mod.load(run.parent / "recipe.yaml", overrides)
