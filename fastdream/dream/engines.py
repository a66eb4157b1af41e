"""The one registry of dream engines: the CLI's ``--engine`` choices, the config's validation and the rollout's
dispatch all read ``ENGINES``. Every engine runs the same maths and gives the same outputs for the same noise
(within float tolerance); ``eager`` is the plain-torch reference the others are tested against."""

from __future__ import annotations

ENGINES: dict[str, str] = {
    "auto": "kernels on a CPU; on CUDA cudagraph for no-grad dreams, else compile",
    "eager": "plain torch, step by step, no C++ or Triton kernel: the reference",
    "kernels": "the eager loop with the C++ kernels wherever no gradient is needed (the CPU default)",
    "compile": "torch.compile of the whole H-step rollout, policy sampling included, no graph breaks",
    "triton": "the fused step kernels of fastdream.kernels.rssm_step around torch's matmuls",
    "cudagraph": "the compiled rollout captured once per shape and replayed (CUDA, no-grad dreams)",
}


def check_engine(engine: str) -> str:
    """``engine`` if it is a registered name; else a ValueError that lists them."""
    if engine not in ENGINES:
        raise ValueError(f"unknown dream engine {engine!r}; choose from {', '.join(ENGINES)}")
    return engine


def resolve_engine(engine: str, device, grad: bool) -> str:
    """The concrete engine for ``engine`` on ``device`` (a ``torch.device`` or its name) for dreams with or without
    gradients through the dynamics (``grad``); a clear error when it cannot run there."""
    import torch

    from fastdream.kernels import rssm_step as kernels

    dev = torch.device(device)
    check_engine(engine)
    if engine == "auto":
        if dev.type != "cuda":
            return "kernels"
        return "compile" if grad else "cudagraph"
    if engine == "cudagraph" and (dev.type != "cuda" or grad):
        raise ValueError("the cudagraph engine needs a CUDA device and no-grad (discrete-action) dreams")
    if engine == "triton" and not kernels.available(dev):
        raise ValueError("the triton engine needs CUDA (or TRITON_INTERPRET=1 on a CPU, for tests)")
    return engine
