"""Work-loop marks: what .ci/gpu-check uses to time GPU utilisation during a stage's loop alone."""

import pytest

from pipeline.progress import MARKS_ENV, bar


def test_a_bar_marks_the_start_and_end_of_its_loop_when_asked(tmp_path, monkeypatch):
    marks = tmp_path / "marks.txt"
    with bar(3, "extract [bf16]") as progress:  # no file named: nothing written
        progress.update(3)
    assert not marks.exists()

    monkeypatch.setenv(MARKS_ENV, str(marks))
    with bar(3, "extract [bf16]") as progress:
        progress.update(3)
    with pytest.raises(RuntimeError), bar(2, "predict"):
        raise RuntimeError("a loop that fails has no end mark")
    lines = [line.split() for line in marks.read_text().splitlines()]
    assert [(kind, name) for _, kind, name in lines] == [
        ("start", "extract-loop"), ("end", "extract-loop"), ("start", "predict-loop")]
    times = [float(when) for when, _, _ in lines]
    assert times == sorted(times) and times[0] > 1.7e9  # unix seconds, as `date +%s.%N` writes them
