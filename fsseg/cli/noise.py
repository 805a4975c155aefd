"""Third-party messages that every normal run would print and that say nothing about it, silenced narrowly: each by
the logger that emits it and the start of its text, or by the warning's text and the module it is attributed to.
fsseg's own warnings, and every other message of these libraries, still show. Standard library only."""

from __future__ import annotations

import logging
import warnings

# logger -> starts of the messages dropped from it
LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    # diffusers, on every from_pretrained without `accelerate` installed (fsseg never needs it)
    "diffusers.models.modeling_utils": (
        "Cannot initialize model with low cpu memory usage because `accelerate`",
    ),
    # Lightning's advertisements for its cloud services, on every Trainer
    **{
        name: ("💡 Tip: For seamless cloud",)
        for name in (
            "lightning.pytorch.utilities.rank_zero",
            "lightning.fabric.utilities.rank_zero",
            "lightning_utilities.core.rank_zero",
        )
    },
}
# (message regex, module regex): torch's deprecation of LeafSpec, warned from Lightning's own _pytree on every run
WARNINGS: tuple[tuple[str, str], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\."),
)


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_third_party() -> None:
    """Install the filters (idempotent)."""
    for name, starts in LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(starts))
    for message, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
