"""Device helpers shared by the stage code, the splitter and the profiler (a leaf module)."""

from __future__ import annotations

import torch

from timeprest.errors import ConfigError


def check_available(device: str) -> None:
    """ConfigError (naming ``--device``) when ``device`` is CUDA and there is none."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but no CUDA device is available; use --device cpu")


def sync_device(dev: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock times cover it."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()
