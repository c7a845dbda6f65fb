"""Progress off a terminal: a log line per tenth of a stage, with the loss."""

from sparsekernels.recipes.progress import LogProgress, progress


def test_log_progress_writes_a_line_per_tenth_and_the_last():
    lines = []
    with LogProgress(25, "distill", lines.append, every_s=1e9) as bar:
        for _ in range(25):
            bar.update(1)
            bar.set_postfix(loss="0.123")
    steps = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 25]
    assert all("distill" in line and "steps/s" in line for line in lines)
    assert lines[-1].endswith("loss 0.123")


def test_log_progress_resumed_midway_and_empty_stage():
    lines = []
    bar = LogProgress(100, "movement", lines.append, every_s=1e9)
    bar.update(57)  # a resumed stage starts past its first marks
    bar.update(1)
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == ["57/100"]
    LogProgress(0, "nothing", lines.append).close()


def test_resumed_steps_count_toward_the_total_but_not_the_rate(monkeypatch):
    import sparsekernels.recipes.progress as progress_module

    clock = iter([0.0, 10.0])  # start, then the first update 10 s later
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    lines = []
    bar = LogProgress(1000, "distill", lines.append, every_s=1e9, initial=514)
    bar.update(86)  # 86 steps in 10 s, past the 600 mark
    assert lines == ["  distill: 600/1000 steps, 8.60 steps/s, 0.8 min left"]


def test_progress_off_a_terminal_logs(capsys):
    lines = []
    bar = progress(10, "fine-tune", lines.append)  # pytest's stderr is not a TTY
    assert isinstance(bar, LogProgress)
    bar.update(10)
    assert lines and "10/10" in lines[-1]
