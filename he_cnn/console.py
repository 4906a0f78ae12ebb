"""Command-line plumbing shared by the parties' commands (``he-cnn owner``, ``user``, ``demo``, ``serve``).

It lives below the command packages so that none of them imports another to reuse it: :func:`run_step`
turns expected failures into one line, :class:`Reporter` decides what progress reaches stderr.
"""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

import click
from tqdm import tqdm

from he_cnn.errors import HECNNError, PeerError, PeerKeyChanged, PeerUnavailable

T = TypeVar("T")

#: an error a cloud reported about *its* partner cloud (only S1 has one: S2), by the error's code, as a
#: sentence for the person at a client; the client's transport tags relayed errors with ``peer``,
#: ``peer_code`` and ``peer_message`` (:func:`he_cnn.transport.http_channel.error_from_response`)
PARTNER_FAILURES = {
    PeerUnavailable.code: "{peer} could not reach its partner cloud: {message}; try again later, and tell the "
                          "operator of the clouds if it persists",
    PeerError.code: "{peer}'s partner cloud refused its request ({message}); tell the operator of the clouds",
    PeerKeyChanged.code: "{peer} cannot work with its partner cloud: {message}",
}


def describe_failure(error: HECNNError) -> str:
    """One sentence for a person: an error a cloud reported about its partner cloud (S1 about S2) says
    so and what to do; any other error is its own message."""
    template = PARTNER_FAILURES.get(getattr(error, "peer_code", ""))
    if template is None:
        return str(error)
    return template.format(peer=getattr(error, "peer", "the cloud"), message=getattr(error, "peer_message", error))


def run_step(what: Callable[[], T]) -> T:
    """Run one step of a command, turning our errors and file errors into one clear line (click
    prints it, exit status 1) instead of a traceback."""
    try:
        return what()
    except HECNNError as e:
        raise click.ClickException(describe_failure(e)) from e
    except OSError as e:
        raise click.ClickException(f"{e.strerror or e}: {e.filename or ''}") from e


class Reporter:
    """Where a command's progress goes: notes and progress bars on stderr, neither with ``quiet``.

    Bars are drawn only on a terminal unless ``progress`` says otherwise: in a log file or a pipe their
    carriage-return redraws pile up as noise. Warnings and errors are not progress: they always show.
    """

    def __init__(self, quiet: bool = False, progress: bool | None = None):
        self.quiet = quiet
        self.bars = not quiet and (sys.stderr.isatty() if progress is None else progress)

    def note(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    def bar(self, total: int, desc: str, unit: str) -> tqdm:
        """A progress bar on stderr (a silent one when bars are off), cleared when it closes."""
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not self.bars, leave=False)
