"""The build's progress: the sample bar moves with each finished question (through the counter actor),
not with finished units; rows set aside at load count when their unit is written; tokens per second."""

import io
import re
import time

from mmpr_pipeline import progress


def _until(check, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    return check()


def test_sample_bar_moves_per_question_before_any_unit_is_written(ray_local):
    import ray

    counter = progress.start_counter()
    # A new actor's worker can take more than 10 s to start on a busy CI machine (the bar then failed
    # waiting for its first count): the bar's behaviour is under test here, not Ray's start time.
    assert ray.get(counter.totals.remote(), timeout=300) == (0, 0)
    replica = progress.CounterClient(counter)  # what a sampling replica holds
    out = io.StringIO()
    with progress.BuildProgress(counter, rows=10, units=2, file=out) as bars:
        assert bars.sample_bar.postfix == "starting the engine"
        replica.add(1, 40)
        replica.flush()
        assert _until(lambda: bars.sample_bar.n == 1)
        time.sleep(1.1)  # tokens per second needs a second of counts
        replica.add(2, 80)
        replica.flush()
        assert _until(lambda: bars.sample_bar.n == 3)
        assert bars.write_bar.n == 0  # no unit written yet: the questions moved the bar
        assert _until(lambda: "tok/s" in (bars.sample_bar.postfix or ""))
        assert re.match(r"(ETA \d+:\d+, )?\d+\.\d q/s, [\d,]+ tok/s$", bars.sample_bar.postfix)
        bars.unit_done({"rows": 5, "questions": 4})  # one of its rows was set aside at load
        assert _until(lambda: bars.sample_bar.n == 4) and bars.write_bar.n == 1
    assert bars.sample_bar.n == 10 and bars.write_bar.n == 2  # all accounted for at the end
    assert "sample:" in out.getvalue() and "judge+pair+write:" in out.getvalue()


def test_rates_and_eta_count_from_the_first_question_not_the_engines_start(ray_local):
    """tqdm's own ETA counted the engine's start as sampling (the demo showed "2:35:21" left after its
    first question); the bar's rates start with the first counts."""
    with progress.BuildProgress(progress.start_counter(), rows=10, units=2, file=io.StringIO()) as bars:
        bars.first_tokens = (100.0, 40, 1)  # the first counts: 1 question, 40 tokens, at t = 100 s
        assert bars._rates(now=101.0, questions=3, tokens=120) == "ETA 00:03, 2.0 q/s, 80 tok/s"
        bars.set_aside = 7  # the rest were set aside at load: nothing left to wait for
        assert bars._rates(now=101.0, questions=3, tokens=120) == "2.0 q/s, 80 tok/s"
