"""Progress bars (tqdm) that suit both a terminal and a log file.

On a terminal the bar redraws up to 10 times a second; into a file or pipe (CI, nohup, a batch job) every redraw
is a new line of text, so the bar writes at most one line every ``LOG_INTERVAL`` seconds there.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between progress lines when stderr is not a terminal


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` with ``mininterval`` chosen for where stderr goes (unless given)."""
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else LOG_INTERVAL)
    kwargs.setdefault("maxinterval", max(kwargs["mininterval"], 10.0))  # tqdm's monitor would refresh sooner
    return tqdm(iterable, **kwargs)
