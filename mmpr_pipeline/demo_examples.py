"""How the demo model sees an example (the pipeline's sampling prompt, a tokenised batch with labels
on the response only) and how it is scored on held-out generated questions: with transformers'
generate (`heldout_accuracy_hf`, used after training) and with vLLM (`heldout_accuracy_vllm`, as
the pipeline samples; `python -m mmpr_pipeline.demo_model MODEL_DIR [N]`)."""

from __future__ import annotations

from pathlib import Path

HELDOUT_SEED, HELDOUT_OFFSET = 1, 1_000_000  # tasks.generate rows the training never sees


def messages(question: str) -> list[dict]:
    """The single user turn the pipeline sends at sampling time: [image, CoT instruction + question]."""
    from mmpr_pipeline import prompts

    return [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": prompts.render("cot_final_answer", question)},
            ],
        }
    ]


def training_batch(processor, rows: list[dict]) -> dict:
    """Tokenize prompt + response + <|im_end|> with the processor; labels only on the response."""
    import torch

    from mmpr_pipeline.records import decode_image

    tok = processor.tokenizer
    images = [decode_image(r["image"]) for r in rows]
    prompts_ = [
        tok.apply_chat_template(messages(r["question"]), tokenize=False, add_generation_prompt=True)
        for r in rows
    ]
    full = processor(
        text=[p + r["response"] + "<|im_end|>" for p, r in zip(prompts_, rows)],
        images=images,
        return_tensors="pt",
        padding=True,
        padding_side="right",
    )
    only_prompt = processor(
        text=prompts_, images=images, return_tensors="pt", padding=True, padding_side="right"
    )
    labels = full["input_ids"].clone()
    labels[full["attention_mask"] == 0] = -100
    for i, n in enumerate(only_prompt["attention_mask"].sum(1).tolist()):
        # the prompt's tokens must be a prefix of the full sequence's, or the mask would be wrong
        assert torch.equal(full["input_ids"][i, :n], only_prompt["input_ids"][i, :n]), (
            "prompt is not a prefix"
        )
        labels[i, :n] = -100
    full["labels"] = labels
    return dict(full)


def final_answer(text: str) -> str | None:
    """The X of a last line 'Final answer: X' (None when the response does not end that way)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines or not lines[-1].lower().startswith("final answer:"):
        return None
    return lines[-1].split(":", 1)[1].strip().rstrip(".").strip()


def heldout_accuracy_hf(
    model_dir: str | Path, n: int = 100, max_new_tokens: int = 64, batch_size: int = 50
) -> dict:
    """Greedy held-out accuracy per family with transformers: a quick check for the marker.

    vLLM (`heldout_accuracy_vllm`) is how the pipeline samples; the two agree within noise.
    """
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from mmpr_pipeline import tasks
    from mmpr_pipeline.records import decode_image

    processor = AutoProcessor.from_pretrained(model_dir)
    tok = processor.tokenizer
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = list(tasks.generate(n, seed=HELDOUT_SEED, offset=HELDOUT_OFFSET))
    right: dict[str, list[bool]] = {}
    with torch.no_grad():
        for i in range(0, n, batch_size):
            chunk = rows[i : i + batch_size]
            batch = processor(
                text=[
                    tok.apply_chat_template(
                        messages(r["question"]), tokenize=False, add_generation_prompt=True
                    )
                    for r in chunk
                ],
                images=[decode_image(r["image"]) for r in chunk],
                return_tensors="pt",
                padding=True,
                padding_side="left",
            )
            generated = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
            texts = tok.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for r, text in zip(chunk, texts):
                right.setdefault(r["task"], []).append(final_answer(text) == r["answer"])
    right["all"] = [x for v in right.values() for x in v]
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(right.items())}


def heldout_accuracy_vllm(
    model_dir: str | Path, n: int = 200, samples: int = 4, temperature: float = 1.0, max_tokens: int = 160
) -> dict:
    """Held-out accuracy per family as the pipeline samples: vLLM chat, [image, CoT prompt] -> responses.

    Returns {family: {"greedy": acc, "sampled": acc, "n": questions, "mixed": share of questions whose
    samples are both right and wrong}} plus "all", whether vLLM's prompt tokens equal the training
    prompt's, and one example. Needs a `__main__` guard in the caller (vLLM spawns a process).
    """
    from vllm import LLM, SamplingParams

    from mmpr_pipeline import tasks

    rows = [r for r in tasks.generate(n, seed=HELDOUT_SEED, offset=HELDOUT_OFFSET)]
    llm = LLM(model=str(model_dir), enforce_eager=True, dtype="bfloat16", max_model_len=1024, seed=0)
    conversations = _vllm_conversations(rows)
    greedy = llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    sampled = llm.chat(
        conversations, SamplingParams(n=samples, temperature=temperature, max_tokens=max_tokens)
    )
    result = _accuracy_by_family(rows, greedy, sampled, _correctness())
    result["prompt_matches_training"] = _prompt_matches_training(model_dir, rows[0], greedy[0])
    result["example"] = {
        "question": rows[0]["question"],
        "greedy": greedy[0].outputs[0].text,
        "sampled": [o.text for o in sampled[0].outputs],
    }
    return result


def _vllm_conversations(rows: list[dict]) -> list[list[dict]]:
    """One chat per row as the pipeline sends it to vLLM: [image, CoT instruction + question]."""
    from mmpr_pipeline import prompts
    from mmpr_pipeline.records import decode_image

    return [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_pil", "image_pil": decode_image(r["image"])},
                    {"type": "text", "text": prompts.render("cot_final_answer", r["question"])},
                ],
            }
        ]
        for r in rows
    ]


def _correctness():
    """correct(text, row): the project's judge when it is there; the plain last-line comparison otherwise."""
    try:
        from mmpr_pipeline.scoring.judge import judge

        def correct(text, r):
            return judge(text, r["answer"], r["answer_type"], r["options"]).correct
    except ImportError:

        def correct(text, r):
            return final_answer(text) == r["answer"]

    return correct


def _accuracy_by_family(rows, greedy, sampled, correct) -> dict:
    """{family and "all": greedy, sampled, pass_at_n and mixed shares, n} of vLLM's outputs per row."""
    per: dict[str, dict[str, list]] = {}
    for r, g, s in zip(rows, greedy, sampled):
        d = per.setdefault(r["task"], {"greedy": [], "sampled": [], "pass_at_n": [], "mixed": []})
        d["greedy"].append(correct(g.outputs[0].text, r))
        right = [correct(o.text, r) for o in s.outputs]
        d["sampled"].extend(right)
        d["pass_at_n"].append(any(right))
        d["mixed"].append(any(right) and not all(right))
    result = {}
    for fam, d in sorted(per.items()) + [
        (
            "all",
            {k: [x for v in per.values() for x in v[k]] for k in ("greedy", "sampled", "pass_at_n", "mixed")},
        )
    ]:
        result[fam] = {k: round(sum(v) / len(v), 3) for k, v in d.items()} | {"n": len(d["greedy"])}
    return result


def _prompt_matches_training(model_dir: str | Path, row: dict, output) -> bool:
    """Whether the prompt vLLM rendered is token for token the one the model was trained on."""
    from transformers import AutoProcessor

    train_ids = training_batch(AutoProcessor.from_pretrained(model_dir), [row])
    n_prompt = int((train_ids["labels"][0] == -100).cumprod(0).sum())
    trained_prompt = train_ids["input_ids"][0, :n_prompt].tolist()
    return list(output.prompt_token_ids) == trained_prompt
