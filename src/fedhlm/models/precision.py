"""Mixed precision only where the machine computes it: the fit configs ask for bf16 autocast, which halves the
training time on a CPU with native bf16 kernels (oneDNN on AVX-512) and is emulated, about 35 times slower than
float32, on one without (measured on an AVX2-only 2-core EPYC: 100 s against 3 s for one MiniLM step). The
precision a model trains in is resolved here, once, before its cache key is computed, so the key names what
actually ran.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

FALLBACK_PRECISION = "32-true"


@functools.cache
def native_bf16() -> bool:
    """Whether bf16 matmuls run natively here: on the GPU Lightning would pick, else on the CPU (oneDNN)."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def runnable_precision(precision: Any) -> Any:
    """`precision` unless it is a bf16 one that this machine would emulate; then float32, said on stdout."""
    if precision is None or "bf16" not in str(precision) or native_bf16():
        return precision
    _say_fallback(str(precision))
    return FALLBACK_PRECISION


@functools.cache
def _say_fallback(precision: str) -> None:
    """Once per process and precision: every cache lookup resolves the precision, not only a training run."""
    print(f"[fedhlm] precision {precision} is emulated on this CPU (no native bf16): training in {FALLBACK_PRECISION}",
          flush=True)


def runnable_trainer_args(trainer: Mapping[str, Any]) -> dict[str, Any]:
    """Trainer arguments with their precision made runnable here (see `runnable_precision`)."""
    args = dict(trainer)
    if "precision" in args:
        args["precision"] = runnable_precision(args["precision"])
    return args
