"""The learning-rate schedule's length is ``trainer.max_steps``, given once: a step-wise scheduler whose length
the configs leave out gets it from ``trainer.max_steps`` (recorded in the run's ``config.yaml``), one given with
another length is refused by name (a run trained for 500 steps on a schedule of 10000 is a config mistake that
would otherwise pass silently: the LR never reaches its end value). A scheduler that requires its length
(``CosineAnnealingLR`` ``T_max``, ``OneCycleLR`` ``total_steps``: the config does not parse without it) has it
checked against ``trainer.max_steps`` the same way.
"""

from __future__ import annotations

from jsonargparse import Namespace

#: torch schedulers whose length is an init argument: class name -> the argument
LENGTH_ARGS = {
    "LinearLR": "total_iters",
    "ConstantLR": "total_iters",
    "PolynomialLR": "total_iters",
    "CosineAnnealingLR": "T_max",
    "OneCycleLR": "total_steps",
}
KEY = "model.init_args.scheduler"


def derive_schedule_length(cfg: Namespace, given: Namespace) -> str | None:
    """Set ``cfg``'s scheduler length from ``trainer.max_steps`` where ``given`` (what the configs and command
    line set, without defaults) leaves it out; refuse a different given length. Returns a note of what was set
    (None: nothing to derive: no scheduler, one without a length argument, or an epoch-wise one)."""
    scheduler = cfg.get(KEY)
    if not isinstance(scheduler, Namespace) or cfg.get("model.init_args.scheduler_interval") != "step":
        return None
    name = str(scheduler.get("class_path", "")).rpartition(".")[2]
    arg = LENGTH_ARGS.get(name)
    if arg is None:
        return None
    key = f"{KEY}.init_args.{arg}"
    value, max_steps = given.get(key), cfg.get("trainer.max_steps")
    if max_steps is None or max_steps < 0:
        if value is None:
            raise ValueError(
                f"{key} is derived from trainer.max_steps, which is not set: give trainer.max_steps (the "
                f"training length; the {name} schedule runs over it)"
            )
        return None
    if value is not None and value != max_steps:
        raise ValueError(
            f"{key} {value} differs from trainer.max_steps {max_steps}: drop it from the config (the schedule's "
            f"length is derived from trainer.max_steps), or give the same value"
        )
    scheduler.init_args[arg] = max_steps
    return None if value is not None else f"{name} {arg} = trainer.max_steps ({max_steps})"
