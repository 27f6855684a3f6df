"""The trainer scores what the sampler sampled.

vLLM samples responses to image questions with the request the pipeline builds (the engine settings
of `engine.engine_kwargs`, the user turn of `engine.user_message` with the question rendered by
`prompts.render`, chat-templated by `LLM.chat`) and returns each sampled token's log-probability
(`SamplingParams(logprobs=0)`). The same responses, written as pairs the way the pair stage writes
them, go through the trainer's encoder and scorer (`PairEncoder`, `collate`, `response_logps`). If
the two saw different prompts (another template, the image elsewhere or missing, the question text
changed), the per-token log-probabilities would disagree; they agree within 0.05 nats/token on
average, allowing for a bf16 engine against a float32 trainer.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpr_pipeline import prompts, tasks
from mmpr_pipeline.train.data import PairEncoder, collate
from mmpr_pipeline.train.model import load_model, load_processor, response_token_logps

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
MAX_MEAN_ABS_NATS = 0.05

SAMPLER = r"""
import json, sys

from mmpr_pipeline.engine import engine_kwargs, user_message
from mmpr_pipeline.prompts import render
from mmpr_pipeline.records import decode_image


def main(model, questions_file, out_file):
    from vllm import LLM, SamplingParams

    questions = json.loads(open(questions_file).read())
    llm = LLM(**engine_kwargs(model, {"max_model_len": 1024}, seed=0))
    conversations = [[user_message(render("cot_final_answer", q["question"]),
                                   decode_image(bytes.fromhex(q["image"])))]
                     for q in questions]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=96, logprobs=0)
    outputs = llm.chat(conversations, params)
    rows = []
    for q, out in zip(questions, outputs):
        for o in out.outputs:
            rows.append(dict(qid=q["qid"], prompt_token_ids=list(out.prompt_token_ids), text=o.text,
                             token_ids=list(o.token_ids), finish_reason=o.finish_reason,
                             logprobs=[lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]))
    open(out_file, "w").write(json.dumps(rows))


if __name__ == "__main__":
    main(*sys.argv[1:])
"""


@pytest.fixture(scope="module")
def sampled(trained_model, tmp_path_factory):
    """Six image questions x 2 samples from vLLM, with the log-probability of each sampled token."""
    tmp = tmp_path_factory.mktemp("sampled")
    questions = [dict(q, qid=f"q{i}") for i, q in enumerate(tasks.generate(6, seed=11))]
    (tmp / "questions.json").write_text(
        json.dumps([dict(qid=q["qid"], question=q["question"], image=q["image"].hex()) for q in questions])
    )
    (tmp / "sampler.py").write_text(SAMPLER)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(tmp / "sampler.py"),
            trained_model,
            str(tmp / "questions.json"),
            str(tmp / "samples.json"),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = json.loads((tmp / "samples.json").read_text())
    assert len(samples) == 12
    return {q["qid"]: q for q in questions}, samples


def as_pair_rows(questions: dict, samples: list[dict]) -> list[dict]:
    """Each sampled response as the chosen side of a pair row, as stages/pair.py writes it."""
    rows = []
    for s in samples:
        q = questions[s["qid"]]
        rows.append(
            dict(
                images=[{"bytes": q["image"], "path": None}],
                question=prompts.render("cot_final_answer", q["question"]),
                chosen=s["text"],
                rejected="-",
                id=s["qid"],
            )
        )
    return rows


def trainer_token_logps(model_dir: str, rows: list[dict], encoder_cls=PairEncoder):
    processor = load_processor(model_dir)
    model = load_model(model_dir).eval()
    encoder = encoder_cls(processor, 4096, with_rejected=False)
    items = [encoder.encode(r, i) for i, r in enumerate(rows)]
    out = []
    for item in items:
        batch = collate([item], processor.tokenizer.pad_token_id)
        with torch.no_grad():
            token_logps, _ = response_token_logps(model, batch)
        out.append((item, token_logps.tolist()))
    return out


def compare(samples: list[dict], scored: list) -> tuple[float, int, int]:
    """Mean |trainer - vLLM| per token over the sampled tokens the trainer scores with the same ids,
    the number of such tokens, and the number of responses whose prompt ids were identical."""
    diffs, same_prompt = [], 0
    for s, (item, logps) in zip(samples, scored):
        same_prompt += item.prompt["input_ids"][0].tolist() == s["prompt_token_ids"]
        n = 0  # the common prefix of the sampled ids and the trainer's (re-tokenized) ids
        while n < min(len(s["token_ids"]), len(item.chosen_ids)) and s["token_ids"][n] == item.chosen_ids[n]:
            n += 1
        diffs += [abs(a - b) for a, b in zip(logps[:n], s["logprobs"][:n])]
    return sum(diffs) / len(diffs), len(diffs), same_prompt


def test_trainer_log_probs_match_the_samplers(sampled, trained_model):
    questions, samples = sampled
    scored = trainer_token_logps(trained_model, as_pair_rows(questions, samples))
    mean_abs, n_tokens, same_prompt = compare(samples, scored)
    print(f"mean |trainer - vLLM| = {mean_abs:.4f} nats/token over {n_tokens} tokens")
    # the very prompt vLLM rendered (chat template, image tokens, question)
    assert same_prompt == len(samples)
    # the responses re-tokenize to the sampled ids (so the trainer trains on the sampled tokens),
    # ending with the end-of-turn token that stopped sampling
    stopped = [s for s in samples if s["finish_reason"] == "stop"]
    assert stopped
    for s, (item, _) in zip(samples, scored):
        if s["finish_reason"] == "stop":
            assert item.chosen_ids == s["token_ids"]
    assert n_tokens >= 0.9 * sum(len(s["token_ids"]) for s in samples)
    assert mean_abs <= MAX_MEAN_ABS_NATS


def test_a_prompt_that_differs_from_the_samplers_is_caught(sampled, trained_model):
    """The check's power: the same responses scored without their image (as if the trainer's
    template dropped it) move the log-probabilities far beyond the tolerance."""
    questions, samples = sampled

    class NoImageEncoder(PairEncoder):
        def encode(self, row, index):
            return super().encode(dict(row, images=[]), index)

    mean_abs, _, same_prompt = compare(
        samples, trainer_token_logps(trained_model, as_pair_rows(questions, samples), NoImageEncoder)
    )
    assert same_prompt == 0 and mean_abs > 2 * MAX_MEAN_ABS_NATS
