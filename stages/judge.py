"""Judge: scored sample rows -> the same rows with a judge model's verdicts (a Ray Data actor stage).

Runs only when a source has `judge: rules+model` or `judge: model`, between scoring and pairing.
Each replica owns one `Engine` holding the judge model (built on the first verdict the cache does not
have, so a re-run whose verdicts are all cached starts no engine), and a `VerdictCache` it reads and
writes. Every distinct (question, references, answer) of a batch not in the cache is asked twice, with
the answers' places swapped, all requests of the batch at once (mmpr_pipeline/scoring/model_judge.py).
The batch's new verdicts are written to the cache before the rows move on, so a build killed after
this stage asks nothing again when resumed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pyarrow as pa

from mmpr_pipeline.records import SAMPLE_SCHEMA
from mmpr_pipeline.scoring import model_judge as mj


class JudgeStage:
    def __init__(
        self,
        model: str,
        engine_options: dict,
        seed: int,
        modes: dict[str, str],
        judge_id: str,
        cache_dir: str,
        min_probability: float,
        agreement_sample: float,
        timeout_s: float,
    ):
        self.model = model
        self.engine_options = engine_options
        self.seed = seed
        self.modes = modes  # source -> rules+model | model (sources not named: rules)
        self.judge_id = judge_id
        self.cache = mj.VerdictCache(cache_dir)
        self.min_probability = min_probability
        self.agreement_sample = agreement_sample
        self.timeout_s = timeout_s
        self._judge: mj.ModelJudge | None = None
        self._starting = asyncio.Lock()

    async def judge(self) -> mj.ModelJudge:
        async with self._starting:
            if self._judge is None:
                from mmpr_pipeline.engine import Engine

                engine = await asyncio.to_thread(Engine, self.model, self.engine_options, self.seed)
                self._judge = mj.ModelJudge(engine, self.min_probability, self.timeout_s)
        return self._judge

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        rows = batch.to_pylist()
        self.cache.refresh()
        wanted: dict[str, tuple[str, list[str], str]] = {}  # key -> (question, references, answer)
        plan = []  # (row, mode, {index: key})
        for row in rows:
            mode = self.modes.get(row["source"], mj.RULES)
            keys = {}
            for i in mj.to_ask(row, mode, self.agreement_sample):
                refs, answer = mj.references(row), row["extracted"][i]
                keys[i] = mj.cache_key(self.judge_id, row["question"], refs, answer, self.min_probability)
                if self.cache.get(keys[i]) is None:
                    wanted[keys[i]] = (row["question"], refs, answer)
            plan.append((row, mode, keys))
        new = {}
        if wanted:
            judge = await self.judge()
            found = await asyncio.gather(*(judge.replies(*args) for args in wanted.values()))
            new = {k: (wanted[k][2], *r) for k, r in zip(wanted, found)}
            self.cache.put(self.judge_id, new)
        for row, mode, keys in plan:
            if row["pipeline"] != "correctness":
                continue
            asked = {}
            for i, k in keys.items():
                if k in new:
                    asked[i] = (new[k][1], new[k][2], False)
                else:
                    readings, raw = self.cache.get(k)
                    asked[i] = (readings, raw, True)
            mj.apply_verdicts(row, mode, asked)
        yield pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
