"""A callback that sends a signal to its own process at a chosen batch, as a scheduler's pre-emption (SIGTERM) or a
Ctrl-C (SIGINT) would, at a point of the run the test decides (tests/test_harness.py runs it in an `fsseg`
subprocess, with this folder on PYTHONPATH)."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class SignalAt(Callback):
    """Send ``signame`` to this process when ``stage`` (``train`` | ``test``) starts its batch ``batch``."""

    def __init__(self, signame: str = "SIGTERM", stage: str = "train", batch: int = 1) -> None:
        self.signum, self.stage, self.batch = signal.Signals[signame], stage, batch

    def _maybe(self, stage: str, batch_idx: int) -> None:
        if stage == self.stage and batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe("train", batch_idx)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._maybe("test", batch_idx)
