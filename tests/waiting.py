"""Polling helper shared by the tests of background work (pool fillers, queued queries)."""
from __future__ import annotations

import time
from typing import Callable


def wait_for(condition: Callable[[], bool], seconds: float = 60.0, step: float = 0.02) -> bool:
    """True as soon as ``condition()`` holds, False if it still does not after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False
