"""Build the bundled tiny Qwen2-VL-architecture model, deterministically and offline.

No weights can be downloaded on a CI machine, so the project builds its own model: a byte-level
BPE tokenizer trained on the generator's text, a Qwen-style chat template, a small
`Qwen2VLForConditionalGeneration` from a config (seeded random weights) and an image processor
capped at 112x112 pixels (at most 16 image tokens). vLLM and transformers load the folder like
any Hub checkpoint. The "demo" size is trained from scratch on the generator's chain-of-thought
traces (`train_demo`), so it answers some questions right and some wrong, which is what the
correctness pipeline needs to make pairs.

The trained demo model and the demo loop's base ship with the package (`demo_assets/`, with a
SHA256SUMS file): `ensure_trained` checks their hashes and copies them into build/models/, so every
machine samples from the same weights. Trained here they would differ with the core count and CPU
(float reductions split by thread). `mmpr demo-model --rebuild` retrains both with one thread and
fixed seeds and rewrites the shipped files and their hashes.
`python -m mmpr_pipeline.demo_model` measures its held-out accuracy with vLLM.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from mmpr_pipeline.demo_examples import HELDOUT_OFFSET, HELDOUT_SEED, heldout_accuracy_hf, training_batch

log = logging.getLogger(__name__)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's template, trimmed: string or list-of-parts content, images as vision_start/pad/end.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' or part['type'] == 'image_pil' "
    "or 'image' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if not (loop.last and continue_final_message is defined and continue_final_message) %}"
    "<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SIZES = {
    # for tests: builds in seconds, < 1 MB
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=2, vision_depth=1, vision_embed=64, vocab=512),
    # the demo model that `mmpr demo-model` trains to solve the generated tasks a little
    # (a one-block vision tower is enough for these flat shapes and keeps a training step ~0.26 s)
    "demo": dict(
        hidden=128, intermediate=256, layers=4, heads=4, vision_depth=1, vision_embed=96, vocab=1024
    ),
}
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
HEAD_DIM = 32  # vLLM's CPU attention rejects head_dim 16 (the zoo's families use it too)
MARKER = "mmpr_demo_model.json"  # {"size", "trained", ...}: what `ensure_trained` trusts


def _corpus(n: int = 1200):
    from mmpr_pipeline import prompts, tasks

    for row in tasks.generate(n, seed=12345, families=tasks.FAMILIES):
        yield prompts.render("cot_final_answer", row["question"])
        yield row["response"]
    # the templates there were when the demo model was made: a new template must not change its tokenizer
    for tid in ("cot_boxed", "cot_final_answer", "raw"):
        yield prompts.render(tid, "Question?")
    yield "Answer: \\boxed{1} (A) B. **C** option D yes no Yes No 0 1 2 3 4 5 6 7 8 9 10 %"


def train_bpe(vocab_size: int, special_tokens: list[str]):
    """A byte-level BPE (`tokenizers.Tokenizer`) trained offline and deterministically on the
    generator's text, with `special_tokens` first; shared by the demo model and model_zoo."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def build_tokenizer(vocab: int):
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(vocab - len(SPECIAL_TOKENS), SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write an untrained model folder (config, weights, tokenizer, processor) and return its path."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    spec = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec["vocab"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = qwen2_vl_config(
        vocab=((len(tokenizer) + 63) // 64) * 64,
        hidden=spec["hidden"],
        intermediate=spec["intermediate"],
        layers=spec["layers"],
        heads=spec["hidden"] // HEAD_DIM,
        kv_heads=1,
        vision_depth=spec["vision_depth"],
        vision_embed=spec["vision_embed"],
        vision_heads=2,
        token_ids={"bos": ids["<|endoftext|>"], "eos": ids["<|im_end|>"], "pad": ids["<|endoftext|>"]},
        vision_tokens=vision_token_ids(tokenizer),
        rope_theta=10000.0,
        max_positions=4096,
        tie=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    _processor(tokenizer).save_pretrained(out)
    (out / MARKER).write_text(json.dumps({"size": size, "seed": seed, "trained": False}))
    return out


def vision_token_ids(tokenizer) -> dict[str, int]:
    """A Qwen-VL config's image, video and vision start/end token ids, from `tokenizer`."""
    tokens = ("image_pad", "video_pad", "vision_start", "vision_end")
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return {name: tokenizer.convert_tokens_to_ids(f"<|{t}|>") for name, t in zip(names, tokens)}


def mrope_kwargs(head_dim: int, theta: float, *, legacy: bool = False) -> dict:
    """A Qwen-VL text config's multimodal RoPE: sections [hd/8, 3hd/16, 3hd/16] (time, height, width;
    they sum to head_dim / 2). transformers 5 spells it `rope_parameters`; `legacy` gives the
    `rope_theta` + `rope_scaling` spelling that transformers 4.x also reads (4.x ignores
    `rope_parameters` and its attention then fails on a missing `rope_scaling`)."""
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    if legacy:
        return {"rope_theta": theta, "rope_scaling": {"type": "mrope", "mrope_section": section}}
    return {"rope_parameters": {"rope_type": "default", "rope_theta": theta, "mrope_section": section}}


def qwen2_vl_config(
    *,
    vocab: int,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vision_depth: int,
    vision_embed: int,
    vision_heads: int,
    token_ids: dict[str, int],
    vision_tokens: dict[str, int],
    rope_theta: float,
    max_positions: int,
    tie: bool,
    legacy_rope: bool = False,
):
    """A `Qwen2VLConfig` of these shapes (head_dim = hidden // heads). `token_ids` maps bos, eos and pad
    to ids; `vision_tokens` is `vision_token_ids(tokenizer)`. Shared by the demo model and
    benchmarks/bench_train.py, which differ only in these arguments."""
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=max_positions,
            **mrope_kwargs(hidden // heads, rope_theta, legacy=legacy_rope),
            bos_token_id=token_ids["bos"],
            eos_token_id=token_ids["eos"],
            pad_token_id=token_ids["pad"],
            tie_word_embeddings=tie,
        ),
        vision_config=dict(
            depth=vision_depth,
            embed_dim=vision_embed,
            hidden_size=hidden,
            num_heads=vision_heads,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **vision_tokens,
        tie_word_embeddings=tie,
    )


def _processor(tokenizer):
    """The model's processor: images capped at MAX_PIXELS, the tokenizer, the chat template."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    # The video processor is required by Qwen2VLProcessor (and needs torchvision); never used here.
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


# ---------------------------------------------------------------------------------------------
# Training the demo model
# ---------------------------------------------------------------------------------------------

# MMPR_DEMO_MODEL_DIR points the whole pipeline ("model: demo") at another folder, e.g. to try
# other training settings without touching the cached default.
DEFAULT_DIR = Path(
    os.environ.get("MMPR_DEMO_MODEL_DIR")
    or Path(__file__).resolve().parent.parent / "build" / "models" / "demo"
)
# Bump when the data, the prompt or the loop changes in a way that makes an old model stale.
# 2: trained with one thread, so the weights no longer depend on the machine's core count.
TRAIN_VERSION = 2
TRAIN_DEFAULTS = dict(steps=280, seed=0, batch_size=32, lr=3e-3, warmup=40, weight_decay=0.0)
# The demo loop's base policy (`make demo-loop`): the same model and data, stopped at 120 steps on
# purpose. 280 steps solve count and compare outright, which leaves MPO nothing to improve; at 120
# steps the model counts one kind of shape but still errs when it counts and compares two, errors
# its own samples often avoid (see the README's "Close the loop").
LOOP_BASE_DIR = DEFAULT_DIR.parent / "demo-loop-base"
LOOP_BASE_SETTINGS = dict(steps=120)
# The shipped copies: package data, so an installed (not only a cloned) project has them.
ASSETS_DIR = Path(__file__).resolve().parent / "demo_assets"
SHIPPED = {"demo": {}, "demo-loop-base": LOOP_BASE_SETTINGS}  # folder -> training settings
CHECKSUMS = "SHA256SUMS"  # `sha256sum -c SHA256SUMS` format: every file of the folder but itself


class DemoAssetError(RuntimeError):
    """A shipped demo model's files do not match their recorded hashes."""


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    import math

    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_demo(
    out_dir: str | Path,
    *,
    steps: int = TRAIN_DEFAULTS["steps"],
    seed: int = TRAIN_DEFAULTS["seed"],
    batch_size: int = TRAIN_DEFAULTS["batch_size"],
    lr: float = TRAIN_DEFAULTS["lr"],
    warmup: int = TRAIN_DEFAULTS["warmup"],
    weight_decay: float = TRAIN_DEFAULTS["weight_decay"],
    eval_n: int = 100,
    log_every: int = 50,
) -> Path:
    """Build the "demo" model in `out_dir` and train it from scratch on generated CoT traces.

    Plain next-token cross-entropy on the response tokens of `tasks.generate` rows (all families,
    "describe" included), each step on fresh rows, so no row repeats. Deterministic for a given
    seed and thread count. Writes the marker with the held-out greedy accuracy on `eval_n` rows.
    """

    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    out = build(out_dir, size="demo", seed=seed)
    processor = AutoProcessor.from_pretrained(out)
    model = Qwen2VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    # fp32: bf16 autocast measured slower on this CPU (0.33 s vs 0.21 s per forward+backward)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    with one_thread():
        train_seconds = _train_steps(model, processor, opt, steps, seed, batch_size, lr, warmup, log_every)
    log.info("trained %d steps in %.0f s", steps, train_seconds)
    model.eval()
    model.save_pretrained(out)
    with one_thread():  # greedy decoding too: the marker is part of the shipped, hashed files
        acc = heldout_accuracy_hf(out, n=eval_n) if eval_n else {}
    heldout = (
        f"greedy, transformers, {eval_n} rows of tasks.generate(seed={HELDOUT_SEED}, offset={HELDOUT_OFFSET})"
    )
    settings = _settings(
        steps=steps, seed=seed, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay
    )
    marker = dict(
        size="demo", trained=True, steps=steps, settings=settings, heldout_accuracy=acc, heldout_eval=heldout
    )
    (out / MARKER).write_text(json.dumps(marker, indent=1))
    return out


def _train_steps(model, processor, opt, steps, seed, batch_size, lr, warmup, log_every) -> float:
    """The demo model's training loop; returns its seconds. Deterministic on any machine of the same
    CPU kind: one thread (a thread count splits float sums differently), deterministic kernels, seeded."""
    import time

    import torch

    from mmpr_pipeline import tasks

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    start = time.time()
    try:
        model.train()
        for step in range(steps):
            # fresh rows every step (offset), so the model never sees a row twice
            rows = list(
                tasks.generate(batch_size, seed=seed, families=tasks.FAMILIES, offset=step * batch_size)
            )
            batch = training_batch(processor, rows)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr, warmup)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if log_every and (step % log_every == 0 or step == steps - 1):
                log.info(
                    "step %d/%d loss %.3f lr %.2e %.0fs",
                    step + 1,
                    steps,
                    loss.item(),
                    _lr_at(step, steps, lr, warmup),
                    time.time() - start,
                )
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return time.time() - start


@contextlib.contextmanager
def one_thread():
    """torch on one thread, restored afterwards: another thread count sums floats in another order."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _settings(**overrides) -> dict:
    """What the trained weights depend on; a marker with other settings is stale."""
    unknown = set(overrides) - set(TRAIN_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown training setting(s): {sorted(unknown)}; known: {sorted(TRAIN_DEFAULTS)}")
    return {**TRAIN_DEFAULTS, **overrides, "version": TRAIN_VERSION, "spec": SIZES["demo"]}


def _read_marker(folder: Path, name: str = MARKER) -> dict | None:
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None


def ensure_trained(
    out: str | Path | None = None, force: bool = False, eval_n: int = 100, **train_kwargs
) -> Path:
    """Return a trained demo model folder: a copy of the shipped one, or trained here when needed.

    `out` defaults to build/models/demo in the repository. Settings (`train_kwargs` over
    TRAIN_DEFAULTS, the code's version and the model size) that a shipped folder was trained with
    give that folder's files, checked against its SHA256SUMS; `out` is returned at once when it
    already holds exactly them. Other settings, or `force`, train here (the weights then depend on
    this machine); a folder whose marker says trained with the same settings is returned at once.
    Either way the new folder is made in a temporary sibling and renamed into place, under a lock
    (parallel test sessions share build/models), so an interrupted run never leaves a folder that
    looks done. A non-empty folder that is not a demo model is never overwritten. `eval_n`
    held-out rows are answered greedily after training, for the marker's `heldout_accuracy`.
    """
    out = Path(out) if out is not None else DEFAULT_DIR
    want = _settings(**train_kwargs)
    return ensure_model_folder(
        out,
        "demo model",
        MARKER,
        want,
        None if force else shipped_folder(want),
        force,
        lambda tmp: train_demo(tmp, eval_n=eval_n, **train_kwargs),
    )


def ensure_model_folder(
    out: Path, what: str, marker_name: str, want: dict, shipped: Path | None, force: bool, train
) -> Path:
    """`out` as a trained model folder (the demo model's, the demo judge's): a copy of `shipped`
    (its files checked against its CHECKSUMS) when there is one, else trained by `train(folder)`
    unless `out`'s marker (`marker_name`) says trained with `want`, or `force`. The new folder is
    made in a temporary sibling and renamed into place, under a lock (parallel test sessions share
    build/models), so an interrupted run never leaves a folder that looks done; a non-empty folder
    without a readable marker is never overwritten."""
    import fcntl
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(out.parent, os.O_RDONLY)  # a lock on the folder itself leaves no file behind
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = _read_marker(out, marker_name)
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
            raise FileExistsError(
                f"{out} exists and is not a {what} folder (no readable {marker_name}); "
                "pass another --out or remove it"
            )
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if shipped is not None:
                verify_checksums(shipped)
                log.info("copying the shipped %s %s to %s", what, shipped, out)
                shutil.copytree(shipped, tmp)
            else:
                log.info("training the %s into %s (settings %s)", what, out, want)
                train(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _replace_folder(tmp, out)
    finally:
        os.close(lock)  # releases the flock
    return out


def _replace_folder(new: Path, target: Path) -> None:
    """Rename `new` to `target`, replacing what is there (the old folder is removed afterwards)."""
    import shutil

    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old)
    else:
        new.rename(target)


# -- the shipped copies -----------------------------------------------------------------------------


def file_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every file directly in `folder` but CHECKSUMS ({} for a missing folder)."""
    import hashlib

    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != CHECKSUMS
    }


def _recorded_hashes(folder: Path) -> dict[str, str]:
    """The hashes `folder`'s CHECKSUMS records, by file name."""
    lines = (folder / CHECKSUMS).read_text().splitlines()
    return {name: digest for digest, name in (ln.split(maxsplit=1) for ln in lines if ln.strip())}


def write_checksums(folder: Path) -> None:
    (folder / CHECKSUMS).write_text("".join(f"{h}  {n}\n" for n, h in file_hashes(folder).items()))


def verify_checksums(folder: Path) -> None:
    """Raise DemoAssetError naming each file of `folder` whose hash is not the recorded one."""
    try:
        recorded = _recorded_hashes(folder)
    except (OSError, ValueError) as e:
        raise DemoAssetError(f"{folder / CHECKSUMS}: unreadable ({e})") from None
    actual = file_hashes(folder)
    bad = [
        f"{name}: sha256 {actual.get(name, 'missing')}, recorded {recorded.get(name, 'none')}"
        for name in sorted(set(recorded) | set(actual))
        if recorded.get(name) != actual.get(name)
    ]
    if bad:
        raise DemoAssetError(
            f"{folder}: files differ from {CHECKSUMS} ({'; '.join(bad)}); restore them from git, "
            "or retrain with `mmpr demo-model --rebuild`"
        )


def shipped_folder(settings: dict) -> Path | None:
    """The shipped folder trained with `settings`, if there is one."""
    for name in SHIPPED:
        marker = _read_marker(ASSETS_DIR / name)
        if marker and marker.get("settings") == settings:
            return ASSETS_DIR / name
    return None


def rebuild_shipped() -> list[Path]:
    """Retrain every shipped folder (one thread, fixed seeds) and rewrite its CHECKSUMS."""
    import shutil

    done = []
    for name, settings in SHIPPED.items():
        target = ASSETS_DIR / name
        tmp = ASSETS_DIR / f".{name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            train_demo(tmp, **settings)
            write_checksums(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _replace_folder(tmp, target)
        done.append(target)
    return done


def ensure_loop_base(out: str | Path | None = None) -> Path:
    """The demo loop's under-trained base model (LOOP_BASE_SETTINGS), trained only when needed."""
    return ensure_trained(out or LOOP_BASE_DIR, **LOOP_BASE_SETTINGS)


if __name__ == "__main__":
    # python -m mmpr_pipeline.demo_model [MODEL_DIR] [N]: train if needed, then measure held-out
    # accuracy with vLLM, the way the pipeline samples.
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    path = ensure_trained(sys.argv[1] if len(sys.argv) > 1 else None)
    from mmpr_pipeline.demo_examples import heldout_accuracy_vllm

    print(json.dumps(heldout_accuracy_vllm(path, n=int(sys.argv[2]) if len(sys.argv) > 2 else 200), indent=1))
