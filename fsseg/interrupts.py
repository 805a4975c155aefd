"""How an ``fsseg`` command ends when it is stopped, and the exit statuses of every command:

    0    it did what was asked
    1    a run that failed, or had nothing to do
    2    refused before doing anything: bad input, an existing result without --overwrite, a folder that another
         process writes
    130  interrupted by SIGINT (Ctrl-C): 128 + 2, as shells report a process killed by that signal
    143  stopped by SIGTERM (a scheduler's pre-emption, ``kill``): 128 + 15

A process killed by SIGKILL cannot say anything (the shell reports 137); the lock file it leaves marks the folder it
was writing as incomplete (`fsseg.output_folder`). Standard library only: the dispatcher imports this module.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNAL_EXIT = 128  # exit status = 128 + signal number


class Interrupted(BaseException):
    """The command was stopped by signal ``signum`` (a `BaseException`, like `KeyboardInterrupt`: no ``except
    Exception`` swallows it, every cleanup on the way runs); ``exit_code`` is 128 + ``signum``."""

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = int(signum)
        self.exit_code = SIGNAL_EXIT + self.signum
        super().__init__(message or f"stopped by {signal.Signals(self.signum).name}")


@contextlib.contextmanager
def sigterm_raises() -> Iterator[list[int]]:
    """While active, SIGTERM raises `Interrupted` in the main thread wherever the program is, so that every cleanup
    on the way out runs (a lock released, earlier results put back) and the exit status says so.

    Except while a Lightning Trainer runs: Lightning then installs its own handler, which calls this one after
    setting a flag its loops act on at the end of the current batch (``fit`` saves a resumable checkpoint first,
    `fsseg.callbacks.RunCheckpoint`); this handler then only notes the signal. Yields the list of SIGTERMs received
    (empty when none), for the caller to tell a stop from a success. Outside the main thread it does nothing.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame) -> None:
        received.append(signum)
        if signal.getsignal(signal.SIGTERM) is handler:  # not called from within Lightning's handler
            raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
