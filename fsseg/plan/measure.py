"""Measured peaks of the plan's steps run on real tensors, through the allocator rather than through tensors.

- CUDA: ``torch.cuda.max_memory_allocated()`` over the step, the module and batch already on the GPU.
- CPU: this torch keeps no allocator statistics for the CPU, so the CPU allocator's own accounting is read from
  ``torch.profiler`` (``profile_memory=True`` records every allocation and free of c10's CPU allocator, in
  order): the peak of their running sum, plus the parameters and buffers alive before the step. It counts what
  the plan counts (bytes of live tensors) by another route, and also sees allocations that never become an
  operation's output (kernels' scratch buffers).
"""

from __future__ import annotations

import gc

import torch

from fsseg.plan.core import run_steps


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def allocator_peak(prof) -> int:
    """The peak of the running sum of the CPU allocator's allocations and frees a profiler recorded."""
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    running = peak = 0
    for _, n in sorted(events, key=lambda e: e[0]):  # stable: equal times keep the recorded order
        running += n
        peak = max(peak, running)
    return peak


def measure_step(module, setting, stage: str, device: torch.device) -> dict:
    """The real peak of ``stage`` (``fit``: two optimizer steps; ``test``: one evaluation batch) of ``setting``
    on ``module`` (already on ``device``), and the plan's tracker on the same real tensors."""
    key = "train" if stage == "fit" else "eval"
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        out = run_steps(module, setting, (stage,), device, 512, emulate_cuda=False, notes=[])
        torch.cuda.synchronize(device)
        return {
            "measured_bytes": torch.cuda.max_memory_allocated(device),
            "max_memory_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "tracker_on_real_tensors_bytes": out[key]["peak_bytes"],
            "method": "torch.cuda.max_memory_allocated",
        }
    from torch.profiler import ProfilerActivity, profile

    static = storage_bytes([*module.parameters(), *module.buffers()])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run_steps(module, setting, (stage,), device, 1, emulate_cuda=False, notes=[])
    return {
        "measured_bytes": static + allocator_peak(prof),
        "static_bytes": static,
        "tracker_on_real_tensors_bytes": out[key]["peak_bytes"],
        "method": "torch.profiler CPU allocator events (peak of the running sum) + parameters and buffers",
    }
