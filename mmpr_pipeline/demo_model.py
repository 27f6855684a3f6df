"""Build the bundled tiny Qwen2-VL-architecture model, deterministically and offline.

No weights can be downloaded on a CI machine, so the project builds its own model: a byte-level
BPE tokenizer trained on the generator's text, a Qwen-style chat template, a small
`Qwen2VLForConditionalGeneration` from a config (seeded random weights) and an image processor
capped at 112x112 pixels (at most 16 image tokens). vLLM and transformers load the folder like
any Hub checkpoint. `mmpr demo-model` then trains it (see `train/demo.py`) so it can reason a bit.
"""
from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's template, trimmed: string or list-of-parts content, images as vision_start/pad/end.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' or part['type'] == 'image_pil' or 'image' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if not (loop.last and continue_final_message is defined and continue_final_message) %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SIZES = {
    # for tests: builds in seconds, < 1 MB
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=2, vision_depth=1, vision_embed=64, vocab=512),
    # the demo model that `mmpr demo-model` trains to solve the generated tasks a little
    "demo": dict(hidden=128, intermediate=256, layers=4, heads=4, vision_depth=2, vision_embed=96, vocab=1024),
}
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112


def _corpus(n: int = 1200):
    from mmpr_pipeline import prompts, tasks

    for row in tasks.generate(n, seed=12345, families=tasks.FAMILIES):
        yield prompts.render("cot_final_answer", row["question"])
        yield row["response"]
    for tid in prompts.available():
        yield prompts.render(tid, "Question?")
    yield "Answer: \\boxed{1} (A) B. **C** option D yes no Yes No 0 1 2 3 4 5 6 7 8 9 10 %"


def build_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - len(SPECIAL_TOKENS), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write an untrained model folder (config, weights, tokenizer, processor) and return its path."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    spec = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec["vocab"])
    vocab = ((len(tokenizer) + 63) // 64) * 64
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = 32  # vLLM's CPU attention rejects head_dim 16
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
            num_hidden_layers=spec["layers"], num_attention_heads=spec["hidden"] // head_dim,
            num_key_value_heads=1, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [4, 6, 6]},  # sums to head_dim / 2
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
        ),
        vision_config=dict(depth=spec["vision_depth"], embed_dim=spec["vision_embed"], hidden_size=spec["hidden"],
                           num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    # The video processor is required by Qwen2VLProcessor (and needs torchvision); never used here.
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    (out / "mmpr_demo_model.json").write_text(json.dumps({"size": size, "seed": seed, "trained": False}))
    return out

