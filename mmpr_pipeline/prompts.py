"""Prompt templates, kept as data in `prompts/*.yaml`; the template id is recorded with every sample.

Each template file has `id`, `template` (the user turn, `{question}` where the question goes),
`language`, `answer` (the answer format it asks for) and `format`: the format rule its responses
are judged by (mmpr_pipeline.scoring.format_rules).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"


@dataclass(frozen=True)
class Template:
    id: str
    text: str
    format: str  # the format rule (scoring.format_rules.RULES)
    language: str
    answer: str  # the answer format the template asks for, for people


@functools.cache
def _templates() -> dict[str, Template]:
    from mmpr_pipeline.scoring.format_rules import RULES

    out = {}
    for path in sorted(PROMPTS_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "template" not in data:
            continue
        rule = data.get("format")
        if rule not in RULES:
            raise ValueError(
                f"{path}: format: {'missing' if rule is None else f'unknown rule {rule!r}'} "
                f"(expected one of: {', '.join(RULES)})"
            )
        out[data["id"]] = Template(
            data["id"], data["template"], rule, str(data.get("language", "")), str(data.get("answer", ""))
        )
    return out


def template(template_id: str) -> Template:
    return _templates()[template_id]


def format_rule(template_id: str) -> str:
    """The format rule responses to this template are judged by."""
    return _templates()[template_id].format


@functools.cache
def _suffix_pattern() -> re.Pattern:
    suffixes = yaml.safe_load((PROMPTS_DIR / "short_answer_suffixes.yaml").read_text())["suffixes"]
    alternatives = "|".join(re.escape(s.rstrip(".")) for s in sorted(suffixes, key=len, reverse=True))
    return re.compile(rf"(?:\s*(?:{alternatives})\.?)+\s*$", re.IGNORECASE)


def available() -> list[str]:
    return sorted(_templates())


def strip_short_answer_suffix(question: str) -> str:
    """Drop trailing 'Answer with the option's letter...' style instructions."""
    return _suffix_pattern().sub("", question).strip()


def render(template_id: str, question: str) -> str:
    """The user turn's text: the question, short-answer suffix removed, inside the template.

    Options stay as the source wrote them in the question; the `options` column only helps the
    judge map an option's text to its letter.
    """
    return _templates()[template_id].text.replace("{question}", strip_short_answer_suffix(question))


IMAGE_PLACEHOLDER = "<image>"


def placeholders(text: str) -> int:
    return text.count(IMAGE_PLACEHOLDER)


def user_content(text: str, images: list, image_part) -> list[dict]:
    """The user turn's content parts, the same for sampling, training and export: where the text
    has one `<image>` placeholder per image, each image takes its placeholder's place, in order;
    without placeholders the images come first (MMPR's layout). With no images, placeholders are
    dropped (a DropoutNTP continuation sees none of them). `image_part(image)` makes one image's part
    (a PIL image for vLLM, `{"type": "image"}` for a processor's chat template)."""
    if not images:
        return [{"type": "text", "text": re.sub(r"[ \t]*<image>[ \t]*\n?", "", text)}]
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(images):
        return [image_part(im) for im in images] + [{"type": "text", "text": text}]
    parts: list[dict] = []
    for i, piece in enumerate(pieces):
        if piece.strip():
            parts.append({"type": "text", "text": piece})
        if i < len(images):
            parts.append(image_part(images[i]))
    return parts


def tokenizer_bos(tokenizer) -> str:
    """The BOS token the tokenizer itself writes before a text (Llama's `<s>`, Gemma's `<bos>`), else ""."""
    if not tokenizer.bos_token:
        return ""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    added = with_special != tokenizer("a", add_special_tokens=False)["input_ids"]
    return tokenizer.bos_token if added and with_special[:1] == [tokenizer.bos_token_id] else ""
