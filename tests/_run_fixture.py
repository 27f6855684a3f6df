"""A small, realistic run folder, as `mmpr build` writes it, for the card / publish / export tests.

Real generated images and questions (tasks.py), hand-written responses, pair shards written with the
schema metadata the shard writer attaches, sample units, rejects, recipe.json and stats.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmpr_pipeline import prompts, records, tasks
from mmpr_pipeline import recipe as recipe_mod

RECIPE = {
    "name": "demo",
    "model": "build/models/demo",
    "sampling": {"n": 4, "temperature": 1.0, "max_tokens": 64},
    "card": {"pretty_name": "Demo MMPR pairs", "license": "mit", "extra": "Built by the test-suite."},
    "sources": [
        {
            "name": "shapes",
            "loader": "generated",
            "generator": {"families": ["count", "color", "bars", "compare"]},
        },
        {
            "name": "scenes",
            "loader": "generated",
            "generator": {"families": ["describe"]},
            "pipeline": "dropout_ntp",
            "dropout": {"ratio": 0.5, "min_words": 4},
        },
    ],
}
SAMPLING = json.dumps(RECIPE["sampling"], sort_keys=True)


def _pair(
    q: dict,
    source: str,
    pair_type: str,
    chosen: str,
    rejected: str,
    ci: int,
    ri: int,
    prompt_template: str,
    cut_ratio=None,
    prefix_words=None,
) -> dict:
    qid = records.question_id(source, q["image"], q["question"], q["answer"])
    return dict(
        id=records.pair_id(qid, pair_type, chosen, rejected),
        qid=qid,
        source=source,
        task=q["task"],
        images=[{"bytes": q["image"], "path": None}],
        question=prompts.render(prompt_template, q["question"]),
        answer=q["answer"],
        chosen=chosen,
        rejected=rejected,
        pair_type=pair_type,
        model=RECIPE["model"],
        prompt_template=prompt_template,
        sampling=SAMPLING,
        chosen_index=ci,
        rejected_index=ri,
        cut_ratio=cut_ratio,
        prefix_words=prefix_words,
    )


def _sample_row(
    q: dict, source: str, pipeline: str, unit: int, i: int, responses: list[str], correct: list[bool]
) -> dict:
    n = len(responses)
    return dict(
        qid=records.question_id(source, q["image"], q["question"], q["answer"]),
        source=source,
        row_index=i,
        unit=unit,
        pipeline=pipeline,
        task=q["task"],
        images=[q["image"]],
        question=q["question"],
        answer=q["answer"],
        answer_type=q["answer_type"],
        options=q.get("options") or [],
        given_response="",
        prompt_template="cot_final_answer",
        responses=responses,
        n_tokens=[len(r.split()) for r in responses],
        finish_reasons=["stop"] * n,
        error="",
        extracted=[None] * n if pipeline == "dropout_ntp" else ["x"] * n,
        correct=correct,
        score=[float(c) for c in correct],
        reason=["match" if c else "mismatch" for c in correct],
        prefix_words=[],
        continuations=[],
        continuation_tokens=[],
        sample_seconds=0.01,
        continue_seconds=0.0,
        score_seconds=0.001,
    )


def make_run(
    run_dir: str | Path,
    n_shapes: int = 12,
    n_scenes: int = 6,
    n_shards: int = 2,
    recipe_overrides: dict | None = None,
) -> Path:
    """Write a finished run folder (without README.md and figures) and return it."""
    run_dir = Path(run_dir)
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    pairs, samples = [], {"shapes": [], "scenes": []}
    counts = {s: dict(correctness=0, format=0, dropout_ntp=0) for s in ("shapes", "scenes")}

    for i, q in enumerate(tasks.generate(n_shapes, seed=7)):
        good = q["response"]
        wrong = f"{q['rationale']}\nFinal answer: {'B' if q['answer'] != 'B' else 'C'}"
        unparsable = "It is hard to say what the image shows."
        pairs.append(_pair(q, "shapes", "correctness", good, wrong, 0, 1, "cot_final_answer"))
        counts["shapes"]["correctness"] += 1
        if i % 2 == 0:
            pairs.append(_pair(q, "shapes", "format", good, unparsable, 0, 2, "cot_final_answer"))
            counts["shapes"]["format"] += 1
        samples["shapes"].append(
            _sample_row(
                q, "shapes", "correctness", 0, i, [good, wrong, unparsable, good], [True, False, False, True]
            )
        )

    for i, q in enumerate(tasks.generate(n_scenes, seed=8, families=["describe"])):
        words = q["response"].split()
        keep = max(1, len(words) // 2)
        rejected = " ".join(
            words[:keep] + ["and", "a", "small", "dog", "sleeps", "beside", "a", "red", "car."]
        )
        pairs.append(
            _pair(
                q,
                "scenes",
                "dropout_ntp",
                q["response"],
                rejected,
                0,
                0,
                "raw",
                cut_ratio=0.5,
                prefix_words=keep,
            )
        )
        counts["scenes"]["dropout_ntp"] += 1
        samples["scenes"].append(_sample_row(q, "scenes", "dropout_ntp", 0, i, [q["response"]], []))

    schema = records.PAIR_SCHEMA.with_metadata(_metadata())
    shards = []
    per = -(-len(pairs) // n_shards)
    for s in range(n_shards):
        rel = f"data/train-{s:05d}-of-{n_shards:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(pairs[s * per : (s + 1) * per], schema=schema), run_dir / rel)
        shards.append(rel)

    for source, rows in samples.items():
        (run_dir / "samples" / source).mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.Table.from_pylist(rows, schema=records.SAMPLE_SCHEMA),
            run_dir / "samples" / source / "unit-00000.parquet",
        )
        finish_unit(run_dir / "samples" / source / "unit-00000.parquet")
    (run_dir / "rejects").mkdir(exist_ok=True)
    pq.write_table(
        pa.Table.from_pylist(
            [dict(source="shapes", row_index=99, reason="corrupt image", row="{'image': b'\\x00...'}")],
            schema=records.REJECT_SCHEMA,
        ),
        run_dir / "rejects" / "shapes.parquet",
    )

    data = json.loads(json.dumps(RECIPE))
    for key, value in (recipe_overrides or {}).items():
        data[key] = value
    recipe = recipe_mod.from_dict(data, "demo.yaml")
    (run_dir / "recipe.json").write_text(recipe_mod.to_json(recipe))

    n_samples = {"shapes": 4 * n_shapes, "scenes": n_scenes}
    stats_sources = {
        "shapes": dict(
            pipeline="correctness",
            rows=n_shapes + 1,
            rejects=1,
            reject_reasons={"corrupt image": 1},
            questions=n_shapes,
            samples=n_samples["shapes"],
            engine_errors=0,
            correct=2 * n_shapes,
            correct_rate=0.5,
            unparsable=n_shapes,
            all_right=0,
            all_wrong=0,
            questions_with_pairs=n_shapes,
            pairs=counts["shapes"],
            dropout=dict(sampled=0, cut=0, too_short=0, continued=0, empty_continuation=0, identical=0),
        ),
        "scenes": dict(
            pipeline="dropout_ntp",
            rows=n_scenes,
            rejects=0,
            reject_reasons={},
            questions=n_scenes,
            samples=n_samples["scenes"],
            engine_errors=0,
            correct=0,
            correct_rate=None,
            unparsable=0,
            all_right=0,
            all_wrong=0,
            questions_with_pairs=n_scenes,
            pairs=counts["scenes"],
            dropout=dict(
                sampled=n_scenes,
                cut=n_scenes,
                too_short=0,
                continued=n_scenes,
                empty_continuation=0,
                identical=0,
            ),
        ),
    }
    totals = {
        k: sum(s[k] for s in stats_sources.values()) for k in ("rows", "rejects", "questions", "samples")
    }
    totals["pairs"] = {t: sum(s["pairs"][t] for s in stats_sources.values()) for t in records.PAIR_TYPES}
    stats = {
        "recipe": recipe.name,
        "model": recipe.model,
        "fingerprint": recipe.fingerprint(),
        "created": "2026-11-26T06:30:00+00:00",
        "sources": stats_sources,
        "totals": totals,
        "all_wrong_qids": {"shapes": [], "scenes": []},
        "stage_seconds": {
            "plan": 0.5,
            "sample": 12.0,
            "continue": 1.0,
            "score": 0.3,
            "pair": 0.2,
            "write": 0.4,
            "total": 14.4,
        },
        "shards": shards,
    }
    (run_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    return run_dir


def finish_unit(unit_file: Path) -> None:
    """The counts file that marks a samples unit file finished, as a build writes it last."""
    unit_file.with_suffix(".json").write_text(json.dumps({"key": "written by the test fixture"}))


def _metadata():
    from mmpr_pipeline import card

    return card.schema_metadata()


def read_pairs(run_dir: Path) -> list[dict]:
    """All pair rows of a run, in shard order, as plain Python (images as bytes)."""
    stats = json.loads((Path(run_dir) / "stats.json").read_text())
    rows = []
    for rel in stats["shards"]:
        rows += pq.read_table(Path(run_dir) / rel).to_pylist()
    return rows


def trainer_image_tokens(run_dir: Path, pairs: list[dict]) -> list[int]:
    """How many image tokens the trainer's prompt of each pair carries (the run's own model)."""
    from mmpr_pipeline.train.data import PairEncoder
    from mmpr_pipeline.train.model import load_processor

    processor = load_processor(json.loads((Path(run_dir) / "recipe.json").read_text())["model"])
    encoder = PairEncoder(processor, max_length=1024)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return [
        encoder.encode(p, i).prompt["input_ids"].flatten().tolist().count(pad) for i, p in enumerate(pairs)
    ]


def train_two_steps(run_dir, out: Path) -> dict:
    """Two MPO steps of the run's own model on its pairs (a run folder, local or on S3); the trainer's
    summary."""
    from mmpr_pipeline.storage import as_path
    from mmpr_pipeline.train import MPOConfig, train

    model = json.loads((as_path(run_dir) / "recipe.json").read_text())["model"]
    return train(
        MPOConfig(
            model=model,
            data=str(run_dir),
            output_dir=str(out),
            batch_size=4,
            max_steps=2,
            learning_rate=1e-4,
            warmup_ratio=0.0,
            eval_fraction=0.0,
            max_length=1024,
            progress_bar=False,
            save_model=False,
        )
    )
