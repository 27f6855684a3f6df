"""Tiny random-weight models of other vision-language families, built offline from `transformers` configs.

Each family gets its own processor (the family's image processor and placeholder expansion) and a
chat template of the same form as the one the family publishes (image placement, role names,
end-of-turn token, generation prompt), so that the pipeline and the trainer see prompts shaped like
the real model's. The shapes are the smallest each family allows (text head_dim 32: vLLM's CPU
attention rejects 16), a few image tokens per image, and a byte-level BPE of ~550 tokens trained on
the generator's text (as `demo_model` does). Random weights: the models answer gibberish; they
exist to prove that build, DropoutNTP, training and export handle each family's format.

    python -m mmpr_pipeline.model_zoo OUT_DIR [family ...]    # build, then check that vLLM samples each

`FAMILIES` maps a family name to its builder; `build(family, out_dir)` writes a folder that
`AutoModelForImageTextToText`, `AutoProcessor` and vLLM load like a Hub checkpoint.

Image size per family (a recipe source's `image_max_pixels` downscales the image itself, so every
family gets, and trains on, the smaller image; README "Model families"): Qwen2-VL/2.5-VL size images
by a pixel budget, so fewer pixels mean fewer image tokens. LLaVA-1.5 (336 px crop) and Gemma 3
(896 px) resize to a fixed size, InternVL3 picks its 448 px tile grid by aspect ratio and Idefics3 /
SmolVLM scales up to `size.longest_edge` before splitting: for these a cap lowers detail, not tokens;
their tile counts are processor settings (`max_patches`, `do_image_splitting`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmpr_pipeline.demo_model import HEAD_DIM  # vLLM's CPU attention rejects head_dim 16

VOCAB = 512  # BPE merges + special tokens; the embedding is padded to a multiple of 64
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=HEAD_DIM,
    max_position_embeddings=4096,
)
MARKER = "mmpr_model_zoo.json"  # {"family": ...}

# --- chat templates: the published form of each family, trimmed to what the pipeline sends -------
# Every template takes string content and list-of-parts content (the pipeline sends both).

# LLaVA-1.5 (llava-hf): "USER: <image>\n{text} ASSISTANT: {answer} " -- no BOS, no end-of-turn token.
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# InternVL3-hf: ChatML with <IMG_CONTEXT> per image (the processor expands it to <img>...</img>).
INTERNVL_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# SmolVLM / Idefics3:
# "<|im_start|>User:<image>{text}<end_of_utterance>\nAssistant: {answer}<end_of_utterance>\n".
IDEFICS3_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% else %}{{ message['role'] | capitalize }}"
    "{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Gemma 3: BOS written by the template; roles user/model; <start_of_image> per image (the processor
# expands it to the soft tokens); turns end with <end_of_turn>, which is not the tokenizer's EOS.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


# --- shared pieces ---------------------------------------------------------------------------------


def tokenizer(
    special: list[str],
    *,
    eos: str,
    pad: str,
    bos: str | None = None,
    unk: str | None = None,
    add_bos: bool = False,
    extra: dict[str, str] | None = None,
    chat_template: str | None = None,
):
    """A byte-level BPE trained on the generator's text (`demo_model`'s corpus) with this family's
    special tokens. `add_bos`: the tokenizer writes BOS itself (Llama-style post-processor), as
    LLaVA's and Gemma's do; `extra`: named special tokens a processor reads (e.g. `boi_token`)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from mmpr_pipeline.demo_model import train_bpe

    tok = train_bpe(VOCAB - len(special), special)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    named = {k: v for k, v in dict(eos_token=eos, pad_token=pad, bos_token=bos, unk_token=unk).items() if v}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **named,
        extra_special_tokens=extra or {},
        additional_special_tokens=[t for t in special if t not in named.values()],
    )
    fast.chat_template = chat_template
    return fast


def _vocab(tok) -> int:
    return ((len(tok) + 63) // 64) * 64


def _ids(tok, *tokens: str) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in tokens}


def _save(model, processor, out: Path, family: str, renames: dict[str, str] | None = None) -> Path:
    """Save model and processor; `renames` rewrites weight-name prefixes into the layout vLLM reads
    (transformers 5 saves some families under names vLLM 0.32 refuses)."""
    import torch

    model.generation_config.eos_token_id = model.config.get_text_config().eos_token_id
    model.save_pretrained(out)
    if renames:
        from safetensors.torch import load_file, save_file

        path = out / "model.safetensors"
        weights = load_file(path)
        fixed = {}
        for name, w in weights.items():
            for old, new in renames.items():
                if name.startswith(old) and not name.startswith(new):
                    name = new + name[len(old) :]
                    break
            fixed[name] = w.contiguous() if isinstance(w, torch.Tensor) else w
        save_file(fixed, path, metadata={"format": "pt"})
    processor.save_pretrained(out)
    (out / MARKER).write_text(json.dumps({"family": family}))
    return out


# transformers 5 saves a CLIP or SigLIP tower (LLaVA, Gemma 3) without its `vision_model.` level;
# vLLM 0.32 refuses that ("no module or parameter named 'vision_tower.embeddings'"), transformers
# reads both layouts.
VISION_TOWER_RENAMES = {"vision_tower.": "vision_tower.vision_model."}


# --- the families ------------------------------------------------------------------------------------


def build_qwen2_5_vl(out: Path) -> Path:
    """Qwen2.5-VL: window attention in the vision encoder, Qwen2VL image processor (dynamic resolution)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from mmpr_pipeline import demo_model

    tok = demo_model.build_tokenizer(VOCAB)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            **TEXT,
            vocab_size=_vocab(tok),
            **demo_model.mrope_kwargs(HEAD_DIM, 1e4),
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=64,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        **demo_model.vision_token_ids(tok),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(
            min_pixels=demo_model.MIN_PIXELS, max_pixels=demo_model.MAX_PIXELS
        ),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=demo_model.CHAT_TEMPLATE,
    )
    return _save(model, processor, out, "qwen2_5_vl")


def build_llava(out: Path) -> Path:
    """LLaVA-1.5: CLIP vision tower (28x28 crops, 4 image tokens), Llama text model, llava-hf's template."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        eos="</s>",
        pad="<pad>",
        bos="<s>",
        unk="<unk>",
        add_bos=True,
        chat_template=LLAVA_TEMPLATE,
    )
    ids = _ids(tok, "<s>", "</s>", "<pad>", "<image>")
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=64,
        ),
        text_config=dict(
            model_type="llama",
            **TEXT,
            vocab_size=_vocab(tok),
            bos_token_id=ids["<s>"],
            eos_token_id=ids["</s>"],
            pad_token_id=ids["<pad>"],
            tie_word_embeddings=False,
        ),
        image_token_index=ids["<image>"],
        image_seq_length=4,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return _save(model, processor, out, "llava", renames=VISION_TOWER_RENAMES)


def build_internvl(out: Path) -> Path:
    """InternVL3 in transformers' native form: InternViT-style encoder, pixel-shuffle projector,
    Qwen2 text."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tok = tokenizer(
        special,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        chat_template=INTERNVL_TEMPLATE,
        extra=dict(
            start_image_token="<img>",
            end_image_token="</img>",
            context_image_token="<IMG_CONTEXT>",
            video_token="<video>",
        ),
    )
    ids = _ids(tok, *special)
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=[56, 56],
            patch_size=[14, 14],
        ),
        text_config=dict(
            model_type="qwen2",
            **TEXT,
            vocab_size=_vocab(tok),
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False,
        ),
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=4,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 56, "width": 56}, crop_to_patches=False, min_patches=1, max_patches=1
    )
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=InternVLVideoProcessor(),
        image_seq_length=4,
        chat_template=INTERNVL_TEMPLATE,
    )
    return _save(model, processor, out, "internvl")


def build_idefics3(out: Path) -> Path:
    """Idefics3 / SmolVLM: SigLIP-style encoder, pixel-shuffle connector, Llama text, no image splitting."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    special = [
        "<|endoftext|>",
        "<|im_start|>",
        "<end_of_utterance>",
        "<fake_token_around_image>",
        "<image>",
        "<global-img>",
    ]
    tok = tokenizer(
        special,
        eos="<end_of_utterance>",
        pad="<|endoftext|>",
        bos="<|im_start|>",
        chat_template=IDEFICS3_TEMPLATE,
    )
    ids = _ids(tok, *special)
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        ),
        text_config=dict(
            model_type="llama",
            **TEXT,
            vocab_size=_vocab(tok),
            bos_token_id=ids["<|im_start|>"],
            eos_token_id=ids["<end_of_utterance>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False,
        ),
        image_token_id=ids["<image>"],
        scale_factor=2,
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 56}, max_image_size={"longest_edge": 56}, do_image_splitting=False
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE
    )
    return _save(model, processor, out, "idefics3")


GEMMA3_SPECIAL = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]


def build_gemma3(out: Path) -> Path:
    """Gemma 3: SigLIP encoder, average-pooled to `mm_tokens_per_image` soft tokens, Gemma 3 text."""
    import torch
    from transformers import Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = _gemma3_tokenizer()
    config = _gemma3_config(tok)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    image_processor = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_length=4, chat_template=GEMMA3_TEMPLATE
    )
    return _save(model, processor, out, "gemma3", renames=VISION_TOWER_RENAMES)


def _gemma3_tokenizer():
    """Gemma 3's special tokens, bos added, its chat template and image tokens, and newline runs."""
    from tokenizers import AddedToken

    tok = tokenizer(
        GEMMA3_SPECIAL,
        eos="<eos>",
        pad="<pad>",
        bos="<bos>",
        unk="<unk>",
        add_bos=True,
        chat_template=GEMMA3_TEMPLATE,
        extra=dict(
            boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>"
        ),
    )
    # Gemma's SentencePiece vocabulary has newline runs as single tokens, and vLLM's Gemma 3
    # processor merges the "\n\n" around each image into them: give ours the same tokens.
    tok.add_tokens([AddedToken("\n" * k, normalized=False, special=False) for k in (4, 3, 2, 1)])
    return tok


def _gemma3_config(tok):
    """A tiny Gemma 3 config for `tok`: one sliding and one full attention layer, a one-layer SigLIP
    on 28x28 images pooled to 4 soft tokens."""
    from transformers import Gemma3Config

    ids = _ids(tok, *GEMMA3_SPECIAL)
    return Gemma3Config(
        text_config=dict(
            **TEXT,
            vocab_size=_vocab(tok),
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
            bos_token_id=ids["<bos>"],
            eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
            pad_token_id=ids["<pad>"],
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )


FAMILIES = {
    "qwen2_5_vl": build_qwen2_5_vl,
    "llava": build_llava,
    "internvl": build_internvl,
    "idefics3": build_idefics3,
    "gemma3": build_gemma3,
}


def build(family: str, out_dir: str | Path) -> Path:
    """Write a tiny random-weight model of `family` (a key of FAMILIES) to `out_dir`; returns the path."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r} (expected one of: {', '.join(FAMILIES)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return FAMILIES[family](out)


def _vllm_check(path: Path) -> str:
    """Load `path` in vLLM and sample one answer to an image prompt; returns the text."""
    from vllm import LLM, SamplingParams

    from mmpr_pipeline import tasks
    from mmpr_pipeline.records import decode_image

    image = decode_image(next(iter(tasks.generate(1, seed=0)))["image"])
    llm = LLM(
        model=str(path),
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=512,
        seed=0,
        limit_mm_per_prompt={"image": 1},
    )
    out = llm.chat(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_pil", "image_pil": image},
                    {"type": "text", "text": "What is shown?"},
                ],
            }
        ],
        SamplingParams(max_tokens=8),
    )
    return out[0].outputs[0].text


def main(argv: list[str]) -> int:
    """Build the families named (default: all) under argv[0] and check that vLLM loads and samples
    each, every check in its own process (a vLLM engine holds ~3 GB until its process ends)."""
    import os
    import subprocess

    if argv[:1] == ["--vllm-check"]:
        print(f"{argv[1]}: vLLM sampled {_vllm_check(Path(argv[1]))!r}", flush=True)
        return 0
    if not argv:
        print("usage: python -m mmpr_pipeline.model_zoo OUT_DIR [family ...]", file=sys.stderr)
        return 2
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    }
    failed = []
    for family in argv[1:] or list(FAMILIES):
        path = build(family, Path(argv[0]) / family)
        print(f"{family}: built {path}", flush=True)
        if subprocess.run(
            [sys.executable, "-m", "mmpr_pipeline.model_zoo", "--vllm-check", str(path)], env=env
        ).returncode:
            failed.append(family)
    if failed:
        print(f"vLLM could not run: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
