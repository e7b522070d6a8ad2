"""Progress bars: frequent on a terminal, one line per 30 s into a log."""

import io

from medsr.progress import LOG_INTERVAL, progress_bar


def test_a_bar_into_a_log_writes_rarely(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    bar = progress_bar(range(1000), file=log)
    assert bar.mininterval == LOG_INTERVAL
    for _ in bar:
        pass
    assert log.getvalue().count("\r") <= 3  # the first draw, maybe one more, the final one


def test_a_terminal_keeps_tqdm_redraws_and_an_explicit_interval_wins(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    assert progress_bar(range(3)).mininterval == 0.1
    assert progress_bar(range(3), mininterval=5).mininterval == 5
