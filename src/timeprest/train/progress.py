"""The progress display of an epoch, on stderr.

On a terminal: a ``tqdm`` bar with the smoothed loss and the rate in samples/s.
Elsewhere (a log file, a pipe, a batch job): four plain lines per epoch, at
25 %, 50 %, 75 % and the end, so logs stay readable. Nothing when disabled.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any


class EpochProgress:
    """Progress of one epoch of ``total`` mini-batches; ``update`` is the pipeline's ``on_loss``."""

    def __init__(self, epoch: int, epochs: int, total: int, batch_size: int, enabled: bool) -> None:
        self.label = f"epoch {epoch + 1}/{epochs}"
        self.total, self.batch_size = total, batch_size
        self.enabled = enabled
        self.done = 0
        self.loss = float("nan")
        self.start = time.perf_counter()
        self._next_fraction = 0.25
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=self.label,
                unit="batch",
                file=sys.stderr,
                leave=True,
                dynamic_ncols=True,
                mininterval=0.2,
            )

    def update(self, minibatch: int, loss: float) -> None:
        """Count one finished mini-batch and fold its loss into the smoothed loss."""
        self.done += 1
        self.loss = loss if math.isnan(self.loss) else 0.9 * self.loss + 0.1 * loss
        if not self.enabled:
            return
        if self._bar is not None:
            rate = self.done * self.batch_size / max(time.perf_counter() - self.start, 1e-9)
            self._bar.set_postfix_str(f"loss {self.loss:.4f}, {rate:,.0f} samples/s", refresh=False)
            self._bar.update(1)
            return
        fraction = self.done / self.total
        if fraction >= self._next_fraction or self.done == self.total:
            while self._next_fraction <= fraction:
                self._next_fraction += 0.25
            print(self._line(), file=sys.stderr, flush=True)

    def _line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done * self.batch_size / elapsed
        eta = elapsed * (self.total - self.done) / self.done
        return (
            f"{self.label}: {self.done}/{self.total} mini-batches, loss {self.loss:.4f}, "
            f"{rate:,.0f} samples/s, eta {eta:.0f}s"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
