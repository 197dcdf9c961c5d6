"""Device helpers shared by the stage code, the splitter and the profiler (a leaf module)."""

from __future__ import annotations

import torch


def sync_device(dev: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock times cover it."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()
