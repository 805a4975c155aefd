"""What the device computes natively: the one rule that chooses bf16 (the demo's test precision, the speed
benchmark's fastest path)."""

from __future__ import annotations


def native_bf16(accelerator: str) -> tuple[bool, str]:
    """Whether the device that ``trainer.accelerator`` names computes in bfloat16 natively, and why (for the log)."""
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        has = torch.cuda.is_bf16_supported()
        return has, f"{torch.cuda.get_device_name()} {'has' if has else 'lacks'} bf16"
    if accelerator not in ("cpu", "auto"):
        return False, f"accelerator {accelerator!r}"
    found = [name for name, check in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
             if getattr(torch.cpu, check, lambda: False)()]  # fmt: skip
    why = f"this CPU has {' and '.join(found)}" if found else "this CPU has no bf16 instructions"
    return bool(found), why
