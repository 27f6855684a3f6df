"""Hostile model output: never run as code, always a False verdict, always within the time bound,
in the main thread, in other threads, and inside a Ray actor."""

import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mmpr_pipeline import scoring
from mmpr_pipeline.scoring import DEFAULT_TIMEOUT, judge, safe_math, screen, symbolic_check, warm_up

# The bound is DEFAULT_TIMEOUT; the slack covers thread scheduling on a loaded 2-core machine.
BOUND = DEFAULT_TIMEOUT + 0.5
TYPES = ("math", "number", "text", "multiple_choice", "yes_no", "vqa", "chart", "document")


def hostile_responses(marker: Path) -> list[str]:
    touch = f"__import__('os').system('touch {marker}')"
    return [
        f"Let me run this.\nFinal answer: {touch}",
        f"\\boxed{{{touch}}}",
        f"Final answer: open('{marker}', 'w').write('x')",
        "Final answer: ().__class__.__bases__[0].__subclasses__()",
        "Final answer: [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen']",
        "Final answer: 9**9**9**9",
        "Computing.\nFinal answer: $10^{10^{10^{10}}}$",
        "\\boxed{9^{99999999}}",
        "Final answer: 100000!",
        "Final answer: 2^{9999*9999}",
        "Final answer: " + "9" * 200_000,  # a 200 000-character answer
        "Reasoning.\nFinal answer: " + "1+" * 450 + "1",
        "Final answer: " + "{" * 5000 + "1" + "}" * 5000,  # deeply nested braces
        "\\boxed{" + "{" * 300 + "x" + "}" * 300 + "}",
        "\\boxed{" * 50_000,
        "Final answer: 1/0",
        "Final answer: \\frac{1}{0}",
        "Final answer: 0/0",
        "Final answer: \\int_0^1 x^{x} dx",
        "x" * 200_000,
    ]


def check_all(marker: Path, types=TYPES) -> list[tuple[str, str, float, bool]]:
    out = []
    for answer_type in types:
        for response in hostile_responses(marker):
            start = time.perf_counter()
            v = judge(
                response,
                "Yes" if answer_type == "yes_no" else "3",
                answer_type,
                ["1", "2", "3", "4"] if answer_type == "multiple_choice" else None,
            )
            out.append((answer_type, response[:60], time.perf_counter() - start, v.correct))
    return out


@pytest.fixture(scope="module", autouse=True)
def math_server():
    warm_up()  # the bound covers checks, not the one-time start of the server


@pytest.fixture(autouse=True)
def no_cached_verdicts():
    safe_math._cache.clear()  # each test must do the real checks, not reuse an earlier one's


def test_hostile_outputs_in_the_main_thread(tmp_path):
    marker = tmp_path / "pwned"
    results = check_all(marker)
    assert not marker.exists(), "model text was executed"
    slow = [r for r in results if r[2] > BOUND]
    assert not slow, f"calls past the {BOUND} s bound: {slow}"
    assert not [r for r in results if r[3]], "a hostile response was judged correct"


def test_hostile_outputs_in_threads(tmp_path):
    """Ray runs judge outside the main thread; signal-based timeouts would fail there."""
    marker = tmp_path / "pwned"
    with ThreadPoolExecutor(max_workers=3) as pool:
        chunks = list(pool.map(lambda t: check_all(marker, (t,)), ("math", "number", "math")))
    results = [r for chunk in chunks for r in chunk]
    assert not marker.exists()
    assert max(r[2] for r in results) <= BOUND
    assert not any(r[3] for r in results)


def test_screen_rejects_absurd_math_before_sympy():
    for expr in [
        "9**9**9**9",
        "10^{10^{10^{10}}}",
        "9^{99999999}",
        "100000!",
        "{" * 40 + "1" + "}" * 40,
        "__import__('os')",
        "1" * 300,
        "x" * 2000,
    ]:
        assert screen(expr), expr
    for expr in ["x^{2}+y^2", "e^{-x^2}", "2^{2024}-1", "\\frac{\\sqrt{3}}{2}", "(1,3]", "5!"]:
        assert screen(expr) is None, expr


def test_timeout_kills_the_check_and_the_server_recovers():
    start = time.perf_counter()
    status, _ = symbolic_check("\\int_0^1 x^{x} dx + \\int_0^2 x^{x^{2}} dx", ["7"], timeout=0.3)
    elapsed = time.perf_counter() - start
    assert status == "timeout" and elapsed < 0.3 + 0.1
    server = safe_math._server
    time.sleep(0.2)  # the killed child is reaped by the server: no leftovers
    children = [p for p in os.listdir("/proc") if p.isdigit() and _parent(p) == server.proc.pid]
    assert children == []
    assert symbolic_check("2\\sqrt{2}", ["\\sqrt{8}"]) == ("equal", "")


def _parent(pid: str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_a_dead_server_is_replaced():
    safe_math._get_server().proc.kill()
    safe_math._server.proc.wait()
    time.sleep(0.1)
    assert symbolic_check("x = 3", ["3"]) == ("equal", "")


def test_no_eval_of_model_text_in_the_source():
    """eval/exec/sympify/parse_expr never appear in the judge's code (docstrings and comments aside)."""
    package = Path(scoring.__file__).parent
    checked = 0
    for path in package.glob("*.py"):
        code = re.sub(r'""".*?"""|#[^\n]*', "", path.read_text(), flags=re.S)
        checked += "def " in code  # the stripping must leave the code itself
        assert not re.search(r"\b(?:eval|exec|sympify|parse_expr)\s*\(", code), path.name
    assert checked == len(list(package.glob("*.py"))) - 1  # all but __init__.py define functions


# What math-verify's expression extraction may hand to sympy's parse_expr (which evaluates code):
# digits, decimal points, white space, arithmetic operators and parentheses; never a name.
_ARITHMETIC_ONLY = re.compile(r"[\d.\s+\-*/^()×÷]*")


def test_only_arithmetic_reaches_parse_expr(monkeypatch):
    """Maths runs math-verify's ExprExtractionConfig on the final-answer segment (in the bounded
    worker). Its pattern must admit only arithmetic into parse_expr, whatever the model wrote."""
    from math_verify import parser

    seen = []
    monkeypatch.setattr(parser, "parse_expr_cached", lambda expr: seen.append(expr) or 0)
    for text in [
        "Final answer: __import__('os').system('touch x')",
        "The answer is 2**9**9 or os.system(1)",
        "answer: (lambda: 1)() = 3",
        "1/2 + eval('2')",
        "Answer: 3*(4+open('f').read())",
        "x = 12 + y",
    ]:
        for pattern, _ in parser.lazy_expr_regex(parser.ExprExtractionConfig()):
            for m in pattern.finditer(text):
                parser.extract_expr(m)
    assert seen, "the hostile texts must reach the expression path at all"
    assert all(_ARITHMETIC_ONLY.fullmatch(e.replace("**", "^")) for e in seen), seen


def test_hostile_outputs_inside_a_ray_actor(tmp_path):
    ray = pytest.importorskip("ray")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    # this test module is not importable on Ray workers: ship its functions by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:

        @ray.remote(num_cpus=0.5, max_concurrency=2)  # a threaded actor: calls run off the main thread
        class Judge:
            def __init__(self):
                from mmpr_pipeline.scoring import warm_up

                warm_up()

            def run(self, marker):
                from pathlib import Path

                on_main = threading.current_thread() is threading.main_thread()
                return on_main, check_all(Path(marker), ("math", "number", "multiple_choice"))

        actor = Judge.remote()
        marker = tmp_path / "pwned"
        on_main, results = ray.get(actor.run.remote(str(marker)), timeout=300)
        ray.kill(actor)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        if started_here:
            ray.shutdown()
    assert not on_main
    assert not marker.exists()
    assert max(r[2] for r in results) <= BOUND, sorted(results, key=lambda r: -r[2])[:3]
    assert not any(r[3] for r in results)
