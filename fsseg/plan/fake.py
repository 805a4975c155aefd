"""Building modules on fake tensors (`torch._subclasses.fake_tensor.FakeTensorMode`) as their constructors do.

Two accommodations, neither of which changes what is built:

- fake parameters are swapped, not re-assigned, by ``module.to(...)`` (``torch.nn.Module._apply``), and a swap is
  refused while a weak reference points at the tensor; the fake mode's converter memoises every fake tensor it
  makes by weak reference, so during construction its memo holds strong references instead (restored after);
- transformers loads weights in a thread pool, which a fake mode (thread-local) does not reach:
  ``HF_DEACTIVATE_ASYNC_LOAD=1`` loads them in this thread.
"""

from __future__ import annotations

import contextlib
import os

from torch._subclasses.fake_tensor import FakeTensorMode


@contextlib.contextmanager
def fake_construction(mode: FakeTensorMode):
    """Build modules under ``mode`` (see the module docstring)."""
    converter = mode.fake_tensor_converter.meta_converter
    memo, env = converter.tensor_memo, os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    converter.tensor_memo = {}
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        with mode:
            yield
    finally:
        converter.tensor_memo = memo
        if env is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = env
