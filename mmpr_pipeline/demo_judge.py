"""The demo judge: a tiny text-only Qwen2 model that answers "do these two answers mean the same?".

Built and trained offline and deterministically, as the demo policy is (demo_model.py): a byte-level
BPE tokenizer trained on the judge's own synthetic cases (judge_cases.py), a `Qwen2ForCausalLM` from
a config with seeded weights, trained from scratch to reply `yes` or `no` to the judge prompt
(prompts/judge_equivalence.yaml) with the two answers in either place. One thread, fixed seeds and
deterministic kernels, so the weights do not depend on the machine's core count. `ensure_judge()`
caches it in build/models/demo-judge; `model: demo-judge` in a recipe's `judge_model` names it.
`python -m mmpr_pipeline.demo_judge` trains it and prints its held-out accuracy (transformers).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_DIR = Path(
    os.environ.get("MMPR_DEMO_JUDGE_DIR")
    or Path(__file__).resolve().parent.parent / "build" / "models" / "demo-judge"
)
MARKER = "mmpr_demo_judge.json"
# The shipped copy (beside the demo policy's): the same weights on every machine, checked by hash.
ASSETS_DIR = Path(__file__).resolve().parent / "demo_assets" / "demo-judge"
# Bump when the cases, the prompt or the loop change in a way that makes an old judge stale.
TRAIN_VERSION = 1
SPEC = dict(hidden=128, intermediate=256, layers=2, vocab=768)
TRAIN_DEFAULTS = dict(steps=800, seed=0, batch_size=24, lr=3e-3, warmup=40, easy=0.4, lm_weight=0.3)
TRAIN_THREADS = 1  # a thread count splits float sums differently: fixed, so weights are the same anywhere


def _corpus():
    from mmpr_pipeline import judge_cases
    from mmpr_pipeline.scoring.model_judge import judge_prompt

    prompt = judge_prompt()
    for case in judge_cases.generate(3000, seed=999):
        yield prompt.text.format(
            question=case["question"], reference=case["reference"], answer=case["answer"]
        )
    for _ in range(50):  # the replies alone, as the assistant turn starts them: one token each
        yield from (prompt.yes, prompt.no, prompt.yes.capitalize(), prompt.no.capitalize())


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mmpr_pipeline.demo_model import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SPEC["vocab"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """An untrained judge folder (config, seeded weights, tokenizer)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    head_dim = 32  # vLLM's CPU attention rejects head_dim 16
    config = Qwen2Config(
        vocab_size=((len(tokenizer) + 63) // 64) * 64,
        hidden_size=SPEC["hidden"],
        intermediate_size=SPEC["intermediate"],
        num_hidden_layers=SPEC["layers"],
        num_attention_heads=SPEC["hidden"] // head_dim,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / MARKER).write_text(json.dumps({"trained": False, "seed": seed}))
    return out


def _prompts(tokenizer, cases: list[dict], swapped: list[bool]) -> list[str]:
    from mmpr_pipeline.scoring.model_judge import render_messages

    return [
        tokenizer.apply_chat_template(
            render_messages(c["question"], [c["reference"]], c["answer"], swap),
            tokenize=False,
            add_generation_prompt=True,
        )
        for c, swap in zip(cases, swapped)
    ]


def _last_logits(model, tokenizer, texts: list[str], lm_loss: bool = False):
    """The next-token logits after each prompt (right padding: the last real position of each row);
    with `lm_loss`, also the mean next-token loss over the prompts themselves."""
    import torch

    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100) if lm_loss else None
    out = model(**batch, labels=labels)
    last = batch["attention_mask"].sum(1) - 1
    logits = out.logits[torch.arange(len(texts)), last]
    return (logits, out.loss) if lm_loss else logits


def answer_ids(tokenizer) -> tuple[int, int]:
    from mmpr_pipeline.scoring.model_judge import judge_prompt

    prompt = judge_prompt()
    ids = [tokenizer.encode(w, add_special_tokens=False) for w in (prompt.yes, prompt.no)]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the judge's replies must be one token each, got {ids}")
    return ids[0][0], ids[1][0]


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    from mmpr_pipeline.demo_model import _lr_at as lr_at

    return lr_at(step, steps, lr, warmup)


def _with_easy_cases(cases: list[dict], rng, share: float) -> list[dict]:
    """Replace `share` of the cases with easy ones: the reference itself (re-cased), or another case's
    answer. They teach the model to line up the two answers' tokens first, which the near misses need;
    without them the loss stays at chance for hundreds of steps."""
    out = []
    for c in cases:
        if rng.random() < share:
            if rng.random() < 0.5:
                c = dict(c, answer=rng.choice([c["reference"], c["reference"].capitalize()]), equivalent=True)
            else:
                other = rng.choice([o for o in cases if o["reference"] != c["reference"]])
                c = dict(c, answer=other["answer"], equivalent=False)
        out.append(c)
    return out


def train(out_dir: str | Path, **overrides) -> Path:
    """Build the judge in `out_dir` and train it: cross-entropy on the reply token only, fresh
    synthetic cases every step, each in a random one of the two orders."""
    import random
    import time

    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from mmpr_pipeline import judge_cases

    settings = {**TRAIN_DEFAULTS, **overrides}
    out = build(out_dir, seed=settings["seed"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32)
    yes, no = answer_ids(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(TRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(settings["seed"])
    rng = random.Random(settings["seed"])
    steps, bs = settings["steps"], settings["batch_size"]
    start = time.time()
    try:
        model.train()
        for step in range(steps):
            cases = _with_easy_cases(
                list(judge_cases.generate(bs, seed=settings["seed"], offset=step * bs)), rng, settings["easy"]
            )
            swapped = [rng.random() < 0.5 for _ in cases]
            # the prompts' own next-token loss too: dense gradients that teach the model to read and line
            # up the two answers (copying), where the one-token verdict alone stays at chance for long
            logits, lm = _last_logits(model, tokenizer, _prompts(tokenizer, cases, swapped), lm_loss=True)
            target = torch.tensor([yes if c["equivalent"] else no for c in cases])
            loss = torch.nn.functional.cross_entropy(logits, target) + settings["lm_weight"] * lm
            right = ((logits[:, yes] > logits[:, no]) == (target == yes)).float().mean().item()
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, settings["lr"], settings["warmup"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 25 == 0 or step == steps - 1:
                log.info(
                    "judge step %d/%d loss %.3f right %.2f %.0fs",
                    step + 1,
                    steps,
                    loss.item(),
                    right,
                    time.time() - start,
                )
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    model.eval()
    model.to(torch.bfloat16).save_pretrained(out)  # bf16: half the size, and what vLLM runs anyway
    marker = dict(trained=True, settings=_settings(**overrides), train_seconds=round(time.time() - start, 1))
    (out / MARKER).write_text(json.dumps(marker, indent=1))
    return out


def _settings(**overrides) -> dict:
    return {**TRAIN_DEFAULTS, **overrides, "version": TRAIN_VERSION, "spec": SPEC, "threads": TRAIN_THREADS}


def heldout_accuracy(model_dir: str | Path, n: int = 400) -> dict:
    """Share of held-out cases whose greedy reply (yes/no only) is right, per family, in both orders."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from mmpr_pipeline import judge_cases

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    yes, no = answer_ids(tokenizer)
    cases = list(judge_cases.generate(n, seed=judge_cases.HELDOUT_SEED))
    right: dict[str, list[bool]] = {}
    with torch.no_grad():
        for swap in (False, True):
            logits = _last_logits(model, tokenizer, _prompts(tokenizer, cases, [swap] * n))
            says_yes = (logits[:, yes] > logits[:, no]).tolist()
            for c, y in zip(cases, says_yes):
                right.setdefault(c["family"], []).append(y == c["equivalent"])
    right["all"] = [x for v in right.values() for x in v]
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(right.items())}


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def shipped_folder(settings: dict) -> Path | None:
    """The shipped judge (package data, with a SHA256SUMS file) when it was trained with `settings`."""
    marker = _read_marker(ASSETS_DIR)
    return ASSETS_DIR if marker and marker.get("settings") == settings else None


def ensure_judge(out: str | Path | None = None, force: bool = False, **overrides) -> Path:
    """A trained demo judge folder: a copy of the shipped one (its files checked against their recorded
    hashes), or, for other settings or `force`, trained here. Made in a temporary sibling renamed into
    place under a lock, so an interrupted run never leaves a folder that looks done."""
    import fcntl

    from mmpr_pipeline.demo_model import _recorded_hashes, _replace_folder, file_hashes, verify_checksums

    out = Path(out) if out is not None else DEFAULT_DIR
    want = _settings(**overrides)
    shipped = None if force else shipped_folder(want)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = _read_marker(out)
        if shipped is not None and _recorded_hashes(shipped) == file_hashes(out):
            return out
        if (
            shipped is None
            and not force
            and marker
            and marker.get("trained")
            and marker.get("settings") == want
        ):
            return out
        if out.exists() and (not out.is_dir() or (marker is None and any(out.iterdir()))):
            raise FileExistsError(f"{out} exists and is not a demo judge folder (no readable {MARKER})")
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if shipped is not None:
                verify_checksums(shipped)
                shutil.copytree(shipped, tmp)
            else:
                log.info("training the demo judge into %s", out)
                train(tmp, **overrides)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _replace_folder(tmp, out)
    return out


def rebuild_shipped() -> Path:
    """Retrain the shipped judge (one thread, fixed seeds) and rewrite its SHA256SUMS."""
    from mmpr_pipeline.demo_model import _replace_folder, write_checksums

    tmp = ASSETS_DIR.parent / f".{ASSETS_DIR.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        train(tmp)
        write_checksums(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_folder(tmp, ASSETS_DIR)
    return ASSETS_DIR


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    path = (
        rebuild_shipped()
        if sys.argv[1:] == ["--rebuild"]
        else ensure_judge(sys.argv[1] if sys.argv[1:] else None)
    )
    print(json.dumps(heldout_accuracy(path), indent=1))
