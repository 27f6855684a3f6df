"""A judge model for what the rules leave undecided: is a response's final answer the reference's?

The model sees the question, the reference answer(s) and the response's extracted final answer (never
the chain of thought) in the judge prompt (prompts/judge_equivalence.yaml), and may reply only `yes` or
`no` (vLLM's `allowed_token_ids`, one token, greedy). It is asked twice, the second time with the two
answers' places swapped; only two agreeing replies count:

    yes + yes -> correct      no + no -> wrong      anything else -> undecided

A reply counts only when the model's own, unconstrained probability of it is at least
`min_probability` (vLLM's raw logprobs): below that the model wanted to say something else, which
is an off-format answer. A failed or timed-out request, an off-format reply, or two replies that
disagree leave the response undecided: never a crash, never a guessed label.

Verdicts are cached (VerdictCache) under a key of (judge model, prompt version, question, references,
extracted answer), so a resumed or re-run build never asks twice. Which responses a source sends to
the judge (`judge: rules | rules+model | model`) and how the verdicts land in the sample rows is
stages/judge.py's part.
"""

from __future__ import annotations

import asyncio
import functools
import math
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from mmpr_pipeline.records import stable_hash
from mmpr_pipeline.scoring.free_form import initialism_of_either
from mmpr_pipeline.scoring.modes import undecided

PROMPT_FILE = Path(__file__).resolve().parent.parent.parent / "prompts" / "judge_equivalence.yaml"
MAX_REFERENCES = 5  # VQA has ten annotator answers: the five most common say what they agree on
MAX_ANSWER_CHARS = 300  # a final answer longer than this is not a short answer to compare

# What a verdict is. Stored in the cache and in the sample rows' `judge_answers`.
YES, NO = "yes", "no"
FAILED = "failed"  # the request failed or timed out (not cached: the next run asks again)
OFF_FORMAT = "off-format"  # a reply that is not yes/no, or one the model itself did not mean


@dataclass(frozen=True)
class JudgePrompt:
    id: str
    version: int
    text: str
    yes: str
    no: str


@functools.cache
def judge_prompt(path: str | Path = PROMPT_FILE) -> JudgePrompt:
    data = yaml.safe_load(Path(path).read_text())
    yes, no = (str(r) for r in data["replies"])
    return JudgePrompt(data["id"], int(data["version"]), data["judge_prompt"], yes, no)


def references_text(references: list[str]) -> str:
    """The reference answers as one line: distinct ones, most common first (VQA's annotators), at most
    MAX_REFERENCES, joined by ' | '."""
    counts = Counter(r.strip() for r in references if r and r.strip())
    top = [r for r, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_REFERENCES]]
    return " | ".join(top)


def render_messages(question: str, references: list[str], answer: str, swapped: bool) -> list[dict]:
    """The judge's chat: one user turn. Swapped, the proposed answer takes the reference's place."""
    prompt = judge_prompt()
    reference = references_text(references)
    first, second = (answer, reference) if swapped else (reference, answer)
    text = prompt.text.format(question=question.strip(), reference=first, answer=second.strip())
    return [{"role": "user", "content": text}]


def cache_key(
    judge_id: str, question: str, references: list[str], answer: str, min_probability: float
) -> str:
    """What a verdict depends on: the judge (model and prompt version), the question, the references as
    the judge sees them, the extracted answer, and the probability a reply needs to count (the cache
    holds the readings, so a cache shared by runs with another `min_probability` must not answer)."""
    prompt = judge_prompt()
    return stable_hash(
        "judge",
        judge_id,
        prompt.id,
        prompt.version,
        question.strip(),
        references_text(references),
        answer.strip(),
        f"p>={min_probability!r}",
    )


def agreement(first: str, second: str) -> bool | None:
    """The verdict of two replies (asked as written, then swapped): True / False when both say the same
    yes / no, else None (undecided)."""
    if first == second == YES:
        return True
    if first == second == NO:
        return False
    return None


def read_reply(text: str, logprob: float | None, min_probability: float) -> str:
    """One reply as YES, NO or OFF_FORMAT. `logprob`: the model's own (unconstrained) log-probability of
    the token it was allowed to say; None when the engine gave none."""
    prompt = judge_prompt()
    word = text.strip().strip(".").lower()
    if word not in (prompt.yes.lower(), prompt.no.lower()):
        return OFF_FORMAT
    if logprob is not None and (math.isnan(logprob) or math.exp(logprob) < min_probability):
        return OFF_FORMAT
    return YES if word == prompt.yes.lower() else NO


# -- the verdict cache ------------------------------------------------------------------------------

CACHE_SCHEMA = None  # built on first use (pyarrow is imported late by workers that never judge)


def _cache_schema():
    import pyarrow as pa

    global CACHE_SCHEMA
    if CACHE_SCHEMA is None:
        CACHE_SCHEMA = pa.schema(
            [
                ("key", pa.string()),
                ("judge", pa.string()),
                ("answer", pa.string()),  # the extracted answer, for people reading the cache
                ("replies", pa.list_(pa.string())),  # the two readings: yes / no / off-format
                ("raw", pa.list_(pa.string())),  # the two replies as the engine gave them, with p
            ]
        )
    return CACHE_SCHEMA


class VerdictCache:
    """Verdicts on disk, in `folder` (a run's `judge_cache/`, or a folder shared by several runs): one
    Parquet file per batch that asked the judge, written by the worker that asked (atomically, so a
    kill never leaves half a file), never rewritten. Readers take every file they have not read yet,
    so one replica sees what another wrote. Failed requests are not cached: the next run asks again."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.entries: dict[str, tuple[list[str], list[str]]] = {}
        self._read: set[str] = set()

    def refresh(self) -> None:
        import pyarrow.parquet as pq

        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("*.parquet")):
            if path.name in self._read:
                continue
            try:
                rows = pq.read_table(path).to_pylist()
            except Exception:  # noqa: BLE001 - a damaged file only costs its verdicts being asked again
                continue
            for r in rows:
                self.entries[r["key"]] = (list(r["replies"]), list(r["raw"]))
            self._read.add(path.name)

    def get(self, key: str) -> tuple[list[str], list[str]] | None:
        return self.entries.get(key)

    def put(self, judge_id: str, new: dict[str, tuple[str, list[str], list[str]]]) -> Path | None:
        """Write `new` ({key: (answer, replies, raw)}) as one file; returns it (None when empty)."""
        import pyarrow as pa

        from mmpr_pipeline import shards

        rows = [
            dict(key=k, judge=judge_id, answer=a, replies=replies, raw=raw)
            for k, (a, replies, raw) in new.items()
            if FAILED not in replies
        ]
        if not rows:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"verdicts-{uuid.uuid4().hex}.parquet"
        path = shards.write_table(pa.Table.from_pylist(rows, schema=_cache_schema()), self.folder / name)
        for r in rows:
            self.entries[r["key"]] = (r["replies"], r["raw"])
        self._read.add(name)
        return path


# -- asking the model -------------------------------------------------------------------------------


class ModelJudge:
    """Asks a judge model held in an `engine.Engine`: `await judge.replies(question, refs, answer)` ->
    (two readings, two raw replies). Never raises: a failure reads as FAILED."""

    def __init__(self, engine, min_probability: float, timeout_s: float = 60.0):
        self.engine = engine
        self.min_probability = min_probability
        self.timeout_s = timeout_s
        self.allowed = reply_token_ids(engine.llm.get_tokenizer())

    def params(self):
        # greedy, one token out of the replies' tokens; logprobs=0: the chosen token's own (raw,
        # unconstrained) log-probability only
        return self.engine.params(
            n=1,
            temperature=0.0,
            top_k=-1,
            top_p=1.0,
            max_tokens=1,
            allowed_token_ids=self.allowed,
            logprobs=0,
        )

    async def ask(self, messages: list[dict]) -> tuple[str, str]:
        """(reading, raw) of one request."""
        try:
            comp = await asyncio.wait_for(self.engine.chat(messages, self.params()), self.timeout_s)
        except Exception as e:  # noqa: BLE001 - a failing judge leaves the answer undecided
            return FAILED, f"{FAILED}: {type(e).__name__}: {e}"[:200]
        if comp.error or not comp.texts:
            return FAILED, f"{FAILED}: {comp.error or 'no output'}"[:200]
        logprob = comp.logprobs[0] if comp.logprobs else None
        raw = comp.texts[0] if logprob is None else f"{comp.texts[0]} p={math.exp(logprob):.3f}"
        return read_reply(comp.texts[0], logprob, self.min_probability), raw

    async def replies(self, question: str, references: list[str], answer: str) -> tuple[list[str], list[str]]:
        asked = await asyncio.gather(
            *(self.ask(render_messages(question, references, answer, swap)) for swap in (False, True))
        )
        return [a[0] for a in asked], [a[1] for a in asked]


def reply_token_ids(tokenizer) -> list[int]:
    """Token ids the judge may reply with: the prompt's yes/no words, as written and capitalised, where
    each is a single token of this tokenizer (Qwen's, Llama's and the demo judge's are)."""
    prompt = judge_prompt()
    ids = []
    for word in (prompt.yes, prompt.no, prompt.yes.capitalize(), prompt.no.capitalize()):
        enc = tokenizer.encode(word, add_special_tokens=False)
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
    words = {tokenizer.decode([i]).strip().lower() for i in ids}
    if words != {prompt.yes.lower(), prompt.no.lower()}:
        raise ValueError(
            f"the judge model's tokenizer has no single token for {prompt.yes!r} or {prompt.no!r}; "
            "the judge replies with one constrained token"
        )
    return ids


# -- which responses go to the judge, and what its verdicts do to a sample row -----------------------

MODES = ("rules", "rules+model", "model")
RULES, MODEL = "rules", "model"  # who decided, in the rows' `decided_by` ("" for nobody: undecided)
# A response's verdict, as `rules_verdict` and `judge_verdict` record it ("" where not asked).
CORRECT_V, WRONG_V, UNDECIDED_V, FORMAT_V = "correct", "wrong", "undecided", "format"
JUDGE_COLUMNS = ("decided_by", "rules_verdict", "judge_verdict", "judge_replies", "judge_cached")


def rules_verdict(correct: bool, reason: str, extracted: str | None) -> str:
    """What the rules said of one response: correct, wrong, undecided, or format (no final answer)."""
    if extracted is None:
        return FORMAT_V
    if undecided(reason):
        return UNDECIDED_V
    return CORRECT_V if correct else WRONG_V


def in_agreement_sample(qid: str, index: int, share: float) -> bool:
    """A fixed share of rule-decided answers also goes to the judge, to measure how often the two agree
    (chosen by hash: the same responses in every run)."""
    return share > 0 and int(stable_hash("agreement", qid, index), 16) / 16**16 < share


def to_ask(row: dict, mode: str, agreement_share: float) -> list[int]:
    """Indices of the responses of a scored sample row that the judge is asked about. Never one without
    an extracted answer (nothing to compare; a crashed rules check leaves "")."""
    if mode == RULES or row["pipeline"] != "correctness":
        return []
    out = []
    for i, (ok, why, found) in enumerate(zip(row["correct"], row["reason"], row["extracted"])):
        if not found or len(found) > MAX_ANSWER_CHARS:
            continue
        state = rules_verdict(ok, why, found)
        if mode == MODEL or state == UNDECIDED_V or in_agreement_sample(row["qid"], i, agreement_share):
            out.append(i)
    return out


def references(row: dict) -> list[str]:
    return [a for a in (row["answers"] or [row["answer"]]) if a]


def fill_rules_columns(row: dict) -> dict:
    """The judge columns of a row only the rules judged: who decided each response, nothing asked."""
    states = [rules_verdict(*v) for v in zip(row["correct"], row["reason"], row["extracted"])]
    row.update(
        decided_by=["" if s == UNDECIDED_V else RULES for s in states],
        rules_verdict=states,
        judge_verdict=[""] * len(states),
        judge_replies=[""] * len(states),
        judge_cached=[False] * len(states),
    )
    return row


def decision(verdict: bool | None, answer: str, refs: list[str]) -> bool | None:
    """The judge model's verdict as it decides a response: a "no" on an answer that is an initialism of
    a reference, or the reverse ("Research and Development" / "R&D"), stays undecided, since the model
    may simply not know the abbreviation (measured: the demo judge's only misses on the free-form
    corpus); a "yes" decides it."""
    if verdict is False and initialism_of_either(answer, refs):
        return None
    return verdict


def apply_verdicts(row: dict, mode: str, asked: dict[int, tuple[list[str], list[str], bool]]) -> dict:
    """Write the judge's verdicts into a scored sample row. `asked`: {response index: (readings, raw
    replies, from the cache)}. rules+model: the model decides only what the rules left undecided (its
    verdicts on rule-decided answers are kept for the agreement figure). model: the model decides every
    response with a final answer, and one it cannot decide is undecided, whatever the rules said."""
    from mmpr_pipeline.scoring import modes

    fill_rules_columns(row)
    for i, (readings, raw, cached) in asked.items():
        verdict = agreement(*readings)
        state = row["rules_verdict"][i]
        row["judge_verdict"][i] = UNDECIDED_V if verdict is None else CORRECT_V if verdict else WRONG_V
        row["judge_replies"][i] = " | ".join(
            r if reading in (YES, NO, FAILED) else f"{reading}: {r}" for reading, r in zip(readings, raw)
        )
        row["judge_cached"][i] = cached
        verdict = decision(verdict, row["extracted"][i], references(row))
        if mode == MODEL or state == UNDECIDED_V:
            if verdict is None:
                if mode == MODEL and state != UNDECIDED_V:  # the rules' verdict does not count here
                    row["correct"][i], row["reason"][i], row["decided_by"][i] = False, modes.UNDECIDED, ""
                continue
            row["correct"][i] = verdict
            row["reason"][i] = modes.CORRECT if verdict else modes.WRONG
            row["score"][i] = 1.0 if verdict else 0.0
            row["decided_by"][i] = MODEL
    return row


def verdict_counts(row: dict) -> tuple[dict[str, int], dict[str, int]]:
    """A scored sample row's part of stats.json: who decided its verdicts ({rules, model, undecided}),
    and the judge model's figures (units.JUDGE_MODEL_COUNTS). Rows written before these columns
    existed count from their reasons."""
    n = len(row["responses"])
    decided_by = row.get("decided_by") or []
    if len(decided_by) != n:
        decided_by = fill_rules_columns(dict(row))["decided_by"]
    verdicts = {
        "rules": decided_by.count(RULES),
        "model": decided_by.count(MODEL),
        "undecided": decided_by.count(""),
    }
    judged = dict.fromkeys(
        ("asked", "cache_hits", "failed", "off_format", "disagreed", "both_decided", "agree"), 0
    )
    judge_verdict = row.get("judge_verdict") or [""] * n
    for i, jv in enumerate(judge_verdict):
        if not jv:
            continue
        judged["asked"] += 1
        judged["cache_hits"] += bool((row.get("judge_cached") or [False] * n)[i])
        replies = (row.get("judge_replies") or [""] * n)[i]
        if jv == UNDECIDED_V:
            cause = "failed" if FAILED in replies else "off_format" if _off_format(replies) else "disagreed"
            judged[cause] += 1
        rv = (row.get("rules_verdict") or [""] * n)[i]
        if rv in (CORRECT_V, WRONG_V) and jv in (CORRECT_V, WRONG_V):
            judged["both_decided"] += 1
            judged["agree"] += rv == jv
    return verdicts, judged


def _off_format(replies: str) -> bool:
    """Was one of the two replies (judge_replies' "a | b") not a yes/no the model meant?"""
    return OFF_FORMAT in replies
