"""The demo judge: a tiny text-only Qwen2 model that answers "do these two answers mean the same?".

Built and trained offline and deterministically, as the demo policy is (demo_model.py): a lower-cased
byte-level BPE tokenizer, a `Qwen2ForCausalLM` from a config with seeded weights, trained from scratch
on structural answer pairs (judge_cases.structural): `yes` when one answer's words are all in the
other's with nothing added but words that do not add an item or a negation ("a black umbrella" /
"umbrella", "on the left side" / "left", "white and red" / "red and white"), `no` when the longer one
adds an item or a negation ("umbrella and a bag"), and a third word, `unsure`, for everything else
(different words, one word changed, a word glued to another). A tiny model cannot know that a couch is
a sofa; where the words differ it puts its probability on `unsure`, so the judge's yes/no reply falls
under `min_probability` and the answer stays undecided (scoring/model_judge.py).

Learning to line up the two answers' words from one verdict token per example stays at chance for
hundreds of steps (measured); so training also asks, at a middle layer, for every token of the
proposed answer: "is this token in the reference?" (a linear probe, dropped when saving). One thread,
fixed seeds and deterministic kernels, so the weights do not depend on the machine's core count.
`ensure_judge()` copies the shipped copy (demo_assets/demo-judge, hash-checked) into
build/models/demo-judge or trains it there; `model: demo-judge` in a recipe's `judge_model` names it.
`python -m mmpr_pipeline.demo_judge` prints its held-out figures (transformers).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
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
TRAIN_VERSION = 2
SPEC = dict(hidden=128, intermediate=384, layers=4, heads=4, vocab=1024)
TRAIN_DEFAULTS = dict(
    steps=600, seed=0, batch_size=48, lr=2e-3, warmup=50, match_weight=1.0, segment_weight=0.5, match_heads=2
)
MATCH_LAYER = 1  # layer 0 finds each token's answer, this layer's heads line up identical tokens
TRAIN_THREADS = 1  # a thread count splits float sums differently: fixed, so weights are the same anywhere
ABSTAIN = "unsure"  # the demo judge's third word: "I cannot tell by the words"


def _chat(question: str, reference: str, answer: str) -> str:
    """The judge's chat as the engine renders it (the demo policy's template), before the reply."""
    from mmpr_pipeline.scoring.model_judge import render_messages

    text = render_messages(question, [reference], answer, swapped=False)[0]["content"]
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def _corpus():
    from mmpr_pipeline import judge_cases
    from mmpr_pipeline.scoring.model_judge import judge_prompt

    for case in judge_cases.structural(4000, seed=999):
        yield _chat(case["question"], case["reference"], case["answer"])
    for case in judge_cases.generate(1000, seed=999):
        yield _chat(case["question"], case["reference"], case["answer"])
    prompt = judge_prompt()
    for _ in range(50):  # the replies alone, as the assistant turn starts them: one token each
        yield from (prompt.yes, prompt.no, ABSTAIN)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mmpr_pipeline.demo_model import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Lowercase()  # "Umbrella" and "umbrella" are one token to line up
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
    config = Qwen2Config(
        vocab_size=((len(tokenizer) + 63) // 64) * 64,
        hidden_size=SPEC["hidden"],
        intermediate_size=SPEC["intermediate"],
        num_hidden_layers=SPEC["layers"],
        num_attention_heads=SPEC["heads"],  # head_dim 32: vLLM's CPU attention rejects 16
        num_key_value_heads=SPEC["heads"],  # a key per head: each head can match its own thing
        max_position_embeddings=1024,
        rope_theta=1e6,  # slow rotations: a token matches its twin whatever the distance
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


def reply_ids(tokenizer) -> dict[str, int]:
    """The token of each of the judge's three words (yes, no, unsure): one token each."""
    from mmpr_pipeline.scoring.model_judge import judge_prompt

    prompt = judge_prompt()
    out = {}
    for word in (prompt.yes, prompt.no, ABSTAIN):
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the demo judge's replies must be one token each, got {word!r}: {ids}")
        out[word] = ids[0]
    return out


def _batch(tokenizer, cases: list[dict]):
    """Token ids of the cases' chats (right padding), and for every token of the proposed answer
    whether the same token is in the reference (the match probe's targets)."""
    import torch

    from mmpr_pipeline.scoring.model_judge import references_text

    texts = [_chat(c["question"], c["reference"], c["answer"]) for c in cases]
    enc = tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="right", return_offsets_mapping=True
    )
    offsets = enc.pop("offset_mapping").tolist()
    ids = enc["input_ids"].tolist()
    mask = torch.zeros(enc["input_ids"].shape, dtype=torch.bool)
    matched = torch.zeros(enc["input_ids"].shape)
    segment = torch.zeros(enc["input_ids"].shape, dtype=torch.long)  # 0 other, 1 reference, 2 proposed
    for b, (case, text) in enumerate(zip(cases, texts)):
        ref, ans = references_text([case["reference"]]), case["answer"].strip()
        a0 = text.rfind(ans)
        r0 = text.rfind(ref, 0, a0)

        def inside(start: int, end: int, span_start: int, span_len: int) -> bool:
            # a token's span starts with the space before its word ("Ġumbrella")
            return end > start and span_start - 1 <= start and end <= span_start + span_len

        in_ref = set()
        for j, (s, e) in enumerate(offsets[b]):
            if inside(s, e, r0, len(ref)):
                segment[b, j] = 1
                in_ref.add(ids[b][j])
        for j, (s, e) in enumerate(offsets[b]):
            if inside(s, e, a0, len(ans)):
                segment[b, j] = 2
                mask[b, j] = True
                matched[b, j] = float(ids[b][j] in in_ref)
    return enc, mask, matched, segment


def _forward(model, enc, hidden: bool = False):
    """Next-token logits after each chat (its last real position); with `hidden`, also every layer's
    hidden states (for the probes)."""
    import torch

    out = model.model(**enc, output_hidden_states=hidden)
    last = enc["attention_mask"].sum(1) - 1
    logits = model.lm_head(out.last_hidden_state[torch.arange(len(last)), last])
    return (logits, out.hidden_states) if hidden else logits


def _init_match_heads(model, heads: int, seed: int, scale: float = 2.0) -> None:
    """Set the first `heads` heads of MATCH_LAYER to attend from a token to identical tokens: query
    and key the same random projection of the token, on the head dimensions RoPE barely turns (so the
    match does not fade with distance). Training then learns what to read from the match; found from
    one verdict bit per example, matching stays at chance for hundreds of steps."""
    import torch

    attn = model.model.layers[MATCH_LAYER].self_attn
    head_dim = attn.head_dim
    half = head_dim // 2
    slow = [i for i in range(half // 2, half)]  # the slower half of the frequencies
    dims = slow + [i + half for i in slow]
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = attn.q_proj.in_features
    with torch.no_grad():
        for h in range(heads):
            proj = torch.randn(len(dims), hidden, generator=gen) / hidden**0.5 * scale
            for q_or_k in (attn.q_proj, attn.k_proj):
                rows = slice(h * head_dim, (h + 1) * head_dim)
                q_or_k.weight[rows] = 0.0
                q_or_k.bias[rows] = 0.0
                q_or_k.weight[[h * head_dim + d for d in dims]] = proj


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    from mmpr_pipeline.demo_model import _lr_at as lr_at

    return lr_at(step, steps, lr, warmup)


def train(out_dir: str | Path, **overrides) -> Path:
    """Build the judge in `out_dir` and train it: cross-entropy on the reply word (yes / no / unsure)
    plus the match probe's loss, fresh structural cases every step."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    settings = {**TRAIN_DEFAULTS, **overrides}
    out = build(out_dir, seed=settings["seed"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32)
    words = reply_ids(tokenizer)
    with _deterministic(settings["seed"]):
        _init_match_heads(model, settings["match_heads"], settings["seed"])
        probe = torch.nn.Linear(SPEC["hidden"], 1)  # after the match layer: is this token in the reference?
        segment_probe = torch.nn.Linear(SPEC["hidden"], 3)  # after layer 0: which answer is this token in?
        params = list(model.parameters()) + list(probe.parameters()) + list(segment_probe.parameters())
        opt = torch.optim.AdamW(params, lr=settings["lr"], betas=(0.9, 0.95), weight_decay=0.0)
        start = time.time()
        _train_steps(model, (probe, segment_probe), params, opt, tokenizer, words, settings, start)
    model.eval()
    model.to(torch.bfloat16).save_pretrained(out)  # bf16: half the size, and what vLLM runs anyway
    marker = dict(trained=True, settings=_settings(**overrides), train_seconds=round(time.time() - start, 1))
    (out / MARKER).write_text(json.dumps(marker, indent=1))
    return out


@contextlib.contextmanager
def _deterministic(seed: int):
    """TRAIN_THREADS threads, deterministic kernels and a seeded torch, restored afterwards."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(TRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train_steps(model, probes, params, opt, tokenizer, words, settings, start: float) -> None:
    """The judge's training loop: fresh structural cases every step (offset), so none repeats."""
    import torch

    from mmpr_pipeline import judge_cases

    steps, bs = settings["steps"], settings["batch_size"]
    model.train()
    for step in range(steps):
        cases = list(judge_cases.structural(bs, seed=settings["seed"], offset=step * bs))
        loss, parts, logits, target = _step_loss(model, probes, tokenizer, words, cases, settings)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, settings["lr"], settings["warmup"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            right = (logits.argmax(-1) == target).float().mean().item()
            log.info(
                "judge step %d/%d verdict loss %.3f match loss %.3f segment loss %.3f right %.2f %.0fs",
                step + 1,
                steps,
                *(part.item() for part in parts),
                right,
                time.time() - start,
            )


def _step_loss(model, probes, tokenizer, words, cases, settings):
    """One batch's loss: the reply word's cross-entropy plus the weighted match and segment probe
    losses. Also returns those three parts, the logits and the targets, for the log."""
    import torch

    probe, segment_probe = probes
    enc, mask, matched, segment = _batch(tokenizer, cases)
    logits, hidden = _forward(model, enc, hidden=True)
    target = torch.tensor([words[c["verdict"]] for c in cases])
    verdict_loss = torch.nn.functional.cross_entropy(logits, target)
    match_loss = torch.nn.functional.binary_cross_entropy_with_logits(
        probe(hidden[MATCH_LAYER + 1]).squeeze(-1)[mask], matched[mask]
    )
    real = enc["attention_mask"].bool()
    segment_loss = torch.nn.functional.cross_entropy(segment_probe(hidden[1])[real], segment[real])
    loss = verdict_loss + settings["match_weight"] * match_loss + settings["segment_weight"] * segment_loss
    return loss, (verdict_loss, match_loss, segment_loss), logits, target


def _settings(**overrides) -> dict:
    return {**TRAIN_DEFAULTS, **overrides, "version": TRAIN_VERSION, "spec": SPEC, "threads": TRAIN_THREADS}


def decide(model_dir: str | Path, cases: list[dict], min_probability: float = 0.5) -> list[bool | None]:
    """The demo judge's verdicts (transformers, not vLLM) as the judge stage reads them: asked in both
    places, a reply counts when its probability is at least `min_probability`, two agreeing replies
    decide. `cases`: dicts with question, reference, answer."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from mmpr_pipeline.scoring import model_judge as mj

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    words = reply_ids(tokenizer)
    yes, no = words[mj.judge_prompt().yes], words[mj.judge_prompt().no]
    readings = []
    with torch.no_grad():
        for swap in (False, True):
            out = []
            for i in range(0, len(cases), 64):
                part = cases[i : i + 64]
                pairs = [
                    (c["answer"], c["reference"]) if swap else (c["reference"], c["answer"]) for c in part
                ]
                texts = [_chat(c["question"], ref, ans) for c, (ref, ans) in zip(part, pairs)]
                enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
                p = torch.softmax(_forward(model, enc).float(), -1)
                for py, pn in zip(p[:, yes].tolist(), p[:, no].tolist()):
                    word, prob = (mj.YES, py) if py >= pn else (mj.NO, pn)
                    out.append(word if prob >= min_probability else mj.OFF_FORMAT)
            readings.append(out)
    return [mj.agreement(a, b) for a, b in zip(*readings)]


def heldout_figures(model_dir: str | Path, n: int = 600) -> dict:
    """On held-out structural cases (a seed training never uses): how the judge's verdicts (correct /
    wrong / undecided) fall for each intended verdict (yes / no / unsure)."""
    from collections import Counter

    from mmpr_pipeline import judge_cases

    cases = list(judge_cases.structural(n, seed=judge_cases.HELDOUT_SEED))
    got = decide(model_dir, cases)
    names = {True: "correct", False: "wrong", None: "undecided"}
    counts = Counter((c["verdict"], names[v]) for c, v in zip(cases, got))
    return {want: {k: counts[(want, k)] for k in names.values()} for want in ("yes", "no", "unsure")}


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
    place under a lock, so an interrupted run never leaves a folder that looks done
    (demo_model.ensure_model_folder, as the demo policy's)."""
    from mmpr_pipeline.demo_model import ensure_model_folder

    want = _settings(**overrides)
    return ensure_model_folder(
        Path(out) if out is not None else DEFAULT_DIR,
        "demo judge",
        MARKER,
        want,
        None if force else shipped_folder(want),
        force,
        lambda tmp: train(tmp, **overrides),
    )


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
    print(json.dumps(heldout_figures(path), indent=1))
