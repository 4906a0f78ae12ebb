"""Command-line plumbing shared by the parties' commands (``he-cnn owner``, ``user``, ``demo``, ``serve``).

It lives below the command packages so that none of them imports another to reuse it.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import click

from he_cnn.errors import HECNNError

T = TypeVar("T")


def run_step(what: Callable[[], T]) -> T:
    """Run one step of a command, turning our errors and file errors into one clear line (click
    prints it, exit status 1) instead of a traceback."""
    try:
        return what()
    except HECNNError as e:
        raise click.ClickException(str(e)) from e
    except OSError as e:
        raise click.ClickException(f"{e.strerror or e}: {e.filename or ''}") from e
