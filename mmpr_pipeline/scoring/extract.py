"""Find the final answer in a model response, and strip its dress (Markdown, LaTeX wrappers).

Where the answer is looked for, in this order:
1. the last `Final answer:` / `Final Answer:` / `Answer:` marker (also `**Final Answer**: `,
   `### Final Answer`, `The final answer is`): the rest of its line, or the next non-empty line
   when the marker ends its line; a `\\boxed{...}` inside it is unwrapped;
2. else the last `\\boxed{...}` (nested braces allowed);
3. else the last "the answer is ..." / "the correct option is ..." phrase;
4. else a terse response (one short line, e.g. LLaVA's "B" or "Yes") is its own answer.
Nothing found gives None with reason "no final answer". When a boxed answer and a marker answer
both exist and are different texts, both are returned, so the judge can refuse a response that
names two different final answers.

`format_ok` follows the paper's format rules: a non-empty rationale, then the final-answer line
(marker or box), and nothing after it. It is reported, not used to judge correctness.

Only the last `TAIL_CHARS` characters are searched and all patterns are linear, so a response of
any length costs at most a few tens of microseconds here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

TAIL_CHARS = 4000        # the final answer is at the end; a 200 000-character response costs nothing
MAX_ANSWER_CHARS = 1000  # longer "answers" are refused ("answer too long")
TERSE_CHARS = 200        # a marker-less response this short, on one line, is its own answer
NO_ANSWER = "no final answer"
TOO_LONG = "answer too long"

# `Final answer` followed by a colon, "is", "=" or the end of its line, with Markdown around it.
_FINAL_MARKER = re.compile(r"(?i)\bfinal[ \t]+answer(?:[ \t]*[*_#]+)?[ \t]*(?:[:：=]|is\b|(?=[ \t]*$))",
                           re.MULTILINE)
# `Answer:` at the start of a line (after Markdown such as `**`, `#`, `>`, `-`).
_LINE_MARKER = re.compile(r"(?im)^[ \t>#*_-]*answer(?:[ \t]*[*_]+)?[ \t]*[:：]")
# "the answer is B", "the correct option is (B)", "so the answer would be 3"
_PHRASE_MARKER = re.compile(r"(?i)\b(?:correct|right|best|final)?[ \t]*(?:answer|option|choice)[ \t]+"
                            r"(?:is|would[ \t]+be|should[ \t]+be|will[ \t]+be)\b[ \t]*:?")
_BOXED = re.compile(r"\\(?:boxed|fbox)[ \t]*\{")
_BRACE = re.compile(r"\\[{}]|[{}]")       # \{ and \} are set braces, not groups
_LEADING_PHRASE = re.compile(r"(?i)^(?:(?:so|thus|therefore|hence)[ ,]+)?(?:the[ \t]+)?(?:final[ \t]+|correct[ \t]+)?"
                             r"answer[ \t]*(?:is|:)[ \t]*:?[ \t]*")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|emph|mbox|operatorname)"
                           r"[ \t]*\{([^{}]*)\}")
_MATH_DELIMITERS = re.compile(r"\$\$|\\\(|\\\)|\\\[|\\\]")
_EMPHASIS = re.compile(r"\*\*|__|`+|~~")
_TRAILING = re.compile(r"(?:[\s.,;:?。，；：]|(?<![0-9})\]])!)+$")   # "5!" keeps its factorial
_DELIMITER_LINE = re.compile(r"^[\s$\\\[\]()*_#>-]*$")   # "$$", "\[", "**" ...: not an answer


@dataclass(frozen=True, slots=True)
class Extraction:
    answer: str | None             # the primary final answer, cleaned; None when none was found
    others: tuple[str, ...]        # other final answers the response names (a conflicting box)
    source: str                    # "marker" | "boxed" | "phrase" | "terse" | "none"
    format_ok: bool
    reason: str = ""               # why answer is None: "no final answer" | "answer too long"


def last_boxed(text: str) -> tuple[str, int, int] | None:
    """Content, start and end of the last `\\boxed{...}` in `text` whose braces balance; None if
    none. One pass with a stack, so even thousands of unclosed boxes cost linear time."""
    opens = {m.end() - 1: m.start() for m in _BOXED.finditer(text)}
    if not opens:
        return None
    stack, best = [], None
    for m in _BRACE.finditer(text, min(opens)):
        ch = m.group()
        if ch == "{":
            stack.append(m.start())
        elif ch == "}" and stack:
            left = stack.pop()
            if left in opens and (best is None or opens[left] > best[1]):
                best = (text[left + 1:m.start()], opens[left], m.end())
    return best


def clean(answer: str) -> str:
    """Strip an answer's dress: box, math delimiters, \\text{}, Markdown, leading phrases, end dots."""
    s = answer.strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed[0]
    for _ in range(3):                          # \text{\textbf{B}} needs two passes
        s, n = _TEXT_WRAPPER.subn(r"\1", s)
        if not n:
            break
    s = _MATH_DELIMITERS.sub("", s)
    if s.count("$") >= 2:                       # $...$ math; a single $ is a currency sign
        s = s.replace("\\$", "\0").replace("$", "").replace("\0", "\\$")
    s = _EMPHASIS.sub("", s).strip()
    s = _LEADING_PHRASE.sub("", s)
    s = s.strip().strip("*_#").strip()
    s = _TRAILING.sub("", re.sub(r"[ \t]+", " ", s))
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        s = s[1:-1].strip()
    return s


def _line_after(text: str, pos: int) -> tuple[str, int]:
    """The rest of the line at `pos`, or the next line that is not just delimiters; and its end."""
    end = text.find("\n", pos)
    end = len(text) if end < 0 else end
    line = text[pos:end]
    while _DELIMITER_LINE.match(line) and end < len(text):
        start = end + 1
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        line = text[start:end]
    return line, end


def _has_rationale(text: str, pos: int, tail_start: int) -> bool:
    """Is there reasoning before `pos`? (A cut-off tail always had some.)"""
    return tail_start > 0 or bool(text[:pos].strip(" \t\n*_#>-:$\\[]"))


def _only_delimiters(text: str) -> bool:
    """Nothing but blank lines and closing delimiters ("$$", "\\]") after the answer line?"""
    return all(_DELIMITER_LINE.match(line) for line in text.split("\n"))


def _last(pattern: re.Pattern, text: str) -> re.Match | None:
    match = None
    for match in pattern.finditer(text):
        pass
    return match


def extract(response: str) -> Extraction:
    """The final answer of `response` (see the module docstring for the rules)."""
    tail_start = max(len(response) - TAIL_CHARS, 0)
    text = response[tail_start:].replace("\r\n", "\n")
    marker = max((m for m in (_last(_FINAL_MARKER, text), _last(_LINE_MARKER, text)) if m),
                 key=lambda m: m.end(), default=None)
    boxed = last_boxed(text)

    if marker is not None:
        raw, end = _line_after(text, marker.end())
        source = "marker"
        others = []
        if boxed is not None and not (marker.end() <= boxed[1] < end):
            others.append(boxed[0])
        rationale_ok = _has_rationale(text, marker.start(), tail_start)
        format_ok = rationale_ok and _only_delimiters(text[end:])
    elif boxed is not None:
        raw, source, others = boxed[0], "boxed", []
        line_end = text.find("\n", boxed[2])
        rest = "" if line_end < 0 else text[line_end:]
        format_ok = _has_rationale(text, boxed[1], tail_start) and _only_delimiters(rest)
    else:
        phrase = _last(_PHRASE_MARKER, text)
        stripped = text.strip()
        if phrase is not None:
            raw, _ = _line_after(text, phrase.end())
            source, others = "phrase", []
        elif stripped and "\n" not in stripped and len(stripped) <= TERSE_CHARS and tail_start == 0:
            raw, source, others = stripped, "terse", []
        else:
            return Extraction(None, (), "none", False, NO_ANSWER)
        format_ok = False

    if len(raw) > MAX_ANSWER_CHARS:
        return Extraction(None, (), source, False, TOO_LONG)
    answer = clean(raw)
    if not answer:
        return Extraction(None, (), source, False, NO_ANSWER)
    others = tuple(o for o in (clean(x) for x in others if len(x) <= MAX_ANSWER_CHARS) if o and o != answer)
    return Extraction(answer, others, source, format_ok)
