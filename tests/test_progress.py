"""The build's progress: the sample bar moves with each finished question (through the counter actor),
not with finished units; rows set aside at load count when their unit is written; tokens per second."""

import io
import time

from mmpr_pipeline import progress


def _until(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    return check()


def test_sample_bar_moves_per_question_before_any_unit_is_written(ray_local):
    counter = progress.start_counter()
    replica = progress.CounterClient(counter)  # what a sampling replica holds
    out = io.StringIO()
    with progress.BuildProgress(counter, rows=10, units=2, file=out) as bars:
        replica.add(1, 40)
        replica.flush()
        assert _until(lambda: bars.sample_bar.n == 1)
        time.sleep(1.1)  # tokens per second needs a second of counts
        replica.add(2, 80)
        replica.flush()
        assert _until(lambda: bars.sample_bar.n == 3)
        assert bars.write_bar.n == 0  # no unit written yet: the questions moved the bar
        assert _until(lambda: "tok/s" in (bars.sample_bar.postfix or ""))
        bars.unit_done({"rows": 5, "questions": 4})  # one of its rows was set aside at load
        assert _until(lambda: bars.sample_bar.n == 4) and bars.write_bar.n == 1
    assert bars.sample_bar.n == 10 and bars.write_bar.n == 2  # all accounted for at the end
    assert "sample:" in out.getvalue() and "judge+pair+write:" in out.getvalue()
