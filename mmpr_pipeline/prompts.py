"""Prompt templates, kept as data in `prompts/*.yaml`; the template id is recorded with every sample."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import yaml

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"


@functools.cache
def _templates() -> dict[str, str]:
    out = {}
    for path in sorted(PROMPTS_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "template" in data:
            out[data["id"]] = data["template"]
    return out


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
    return _templates()[template_id].replace("{question}", strip_short_answer_suffix(question))
