"""Pair: one scored question (a Sample row) -> its Pair rows and the counts that go to stats.json.

Pairs are always derived from the kept samples, never stored separately: a resumed run re-pairs
every unit's samples, so its output is exactly what the rules give on the full set of samples.
"""

from __future__ import annotations

import json
from typing import Any

from mmpr_pipeline.pairing import REFERENCE, fix_answer, pair_correctness, pair_dropout
from mmpr_pipeline.prompts import render
from mmpr_pipeline.records import WHITE, pair_id
from mmpr_pipeline.scoring import JUDGE_ERROR, undecided


def same_text(chosen: str, rejected: str) -> bool:
    """Chosen and rejected the same text but for white space: such a pair teaches nothing."""
    return "".join(chosen.split()) == "".join(rejected.split())


def answer_fixed(row: dict[str, Any], unjudged: frozenset[int]) -> tuple[list[str], set[int]]:
    """`pairing.answer_fix`: the question's responses with every one judged correct carrying the
    reference answer's own text as its final answer (pairing.fix_answer), and the indices changed.
    Wrong and unjudged responses are never touched, so a rejected side stays as sampled."""
    texts, fixed = list(row["responses"]), set()
    for i, ok in enumerate(row["correct"]):
        if ok and i not in unjudged and (new := fix_answer(texts[i], row["answer"])) is not None:
            texts[i] = new
            fixed.add(i)
    return texts, fixed


def pair_unit(rows: list[dict], source_cfg, *, seed: int, model: str, stats) -> tuple[list[dict], list[str]]:
    """Pair a unit's scored sample rows in their order, adding each row's counts to `stats`
    (units.SourceStats); returns (pair rows, qids of the questions answered all wrong)."""
    pairs, all_wrong_qids = [], []
    for row in rows:
        found, counts = pair_rows(row, source_cfg, seed=seed, model=model)
        stats.add_row(row, counts)
        if counts["all_wrong"] and not row["error"]:
            all_wrong_qids.append(row["qid"])
        pairs += found
    return pairs, all_wrong_qids


def pair_rows(row: dict[str, Any], source_cfg, *, seed: int, model: str) -> tuple[list[dict], dict]:
    """(pair rows in records.PAIR_SCHEMA, counts) for one Sample row. A pair records the sampling
    settings its sample row records: the ones the engine was asked with."""
    counts: dict[str, Any] = dict(
        correctness=0, format=0, dropout_ntp=0, all_right=0, all_wrong=0, judge_errors=0, same_text=0
    )
    if row["error"]:
        return [], counts
    common = dict(
        qid=row["qid"],
        source=row["source"],
        task=row["task"],
        images=[{"bytes": b, "path": None} for b in row["images"]],
        question=render(row["prompt_template"], row["question"]),
        answer=row["answer"],
        model=model,
        prompt_template=row["prompt_template"],
        sampling=row["sampling"],
        cut_ratio=None,
        prefix_words=None,
        provenance="{}",
    )
    if row["pipeline"] == "correctness":
        found = correctness_pairs(row, source_cfg, seed=seed, counts=counts)
    else:
        found = dropout_pairs(row, source_cfg, counts=counts)
    background = list(getattr(source_cfg, "image_background", WHITE))
    out = []
    for kind, p in found:
        if background != list(WHITE):  # the trainer and the exports composite over the same colour
            p["provenance"] = json.dumps(
                {**json.loads(p["provenance"]), "image_background": background}, sort_keys=True
            )
        if same_text(p["chosen"], p["rejected"]):  # whichever rule let it through: dropped, counted
            counts["same_text"] += 1
            continue
        counts[kind] += 1
        out.append(
            {**common, **p, "pair_type": kind, "id": pair_id(row["qid"], kind, p["chosen"], p["rejected"])}
        )
    return out, counts


def correctness_pairs(row: dict[str, Any], source_cfg, *, seed: int, counts: dict) -> list[tuple[str, dict]]:
    """(kind, pair fields) of a correctness question (pairing.pair_correctness): a correct response
    chosen, a wrong one rejected; undecided responses on neither side. Fills the question's counts."""
    unjudged = frozenset(i for i, r in enumerate(row["reason"]) if undecided(r))
    counts["judge_errors"] = sum(1 for r in row["reason"] if r.startswith(JUDGE_ERROR))
    texts, fixed = answer_fixed(row, unjudged) if source_cfg.pairing.answer_fix else (row["responses"], set())
    reference = row.get("rationale") or ""  # the source's worked solution (fields.rationale), else ""
    qp = pair_correctness(
        texts,
        row["correct"],
        row["extracted"],
        qid=row["qid"],
        seed=seed,
        max_pairs_per_question=source_cfg.pairing.max_pairs_per_question,
        format_pairs=source_cfg.pairing.format_pairs,
        unjudged=unjudged,
        reference=reference,
    )
    counts.update(all_right=int(qp.all_right), all_wrong=int(qp.all_wrong))
    found = []
    for kind, idx_pairs in (("correctness", qp.correctness), ("format", qp.format)):
        for c, r in idx_pairs:
            provenance = (
                {"chosen": "reference"} if c == REFERENCE else {"answer_fix": True} if c in fixed else {}
            )
            pair = dict(
                chosen=reference if c == REFERENCE else texts[c],
                rejected=texts[r],
                chosen_index=c,
                rejected_index=r,
                provenance=json.dumps(provenance, sort_keys=True),
            )
            found.append((kind, pair))
    return found


def dropout_pairs(row: dict[str, Any], source_cfg, *, counts: dict) -> list[tuple[str, dict]]:
    """(kind, pair fields) of a DropoutNTP question (pairing.pair_dropout): the original chosen, its
    continued prefix rejected; with_image (continued with the images) is recorded in provenance."""
    pairs, counts["dropout"] = pair_dropout(row)
    provenance = '{"with_image": true}' if source_cfg.dropout.with_image else "{}"
    return [
        ("dropout_ntp", dict(p, cut_ratio=source_cfg.dropout.ratio, provenance=provenance)) for p in pairs
    ]
