"""The wire format of an activation's header: its dtype and shape, as a small int64 tensor.

The first activation of each micro-batch size on a channel is preceded by a
header; later ones of that size must match it (one output shape per size).
"""

from __future__ import annotations

import torch
from torch import Tensor

from timeprest.errors import ShapeError

Key = tuple[int, int]  # (minibatch, microbatch) within one train() call

DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
MAX_DIMS = 8
HEADER = 2 + MAX_DIMS  # dtype code, number of dims, dims

Spec = tuple[tuple[int, ...], torch.dtype]


def check_sendable(x: Tensor, sender: int, key: Key) -> None:
    """A ShapeError unless ``x``'s dtype and number of dims can be described on the wire."""
    if x.dtype not in DTYPES or x.dim() > MAX_DIMS:
        raise ShapeError(
            f"stage {sender} returned a tensor of dtype {x.dtype} with {x.dim()} dims for "
            f"micro-batch {key[0]}.{key[1]}; the runtime sends up to {MAX_DIMS} dims of "
            f"{', '.join(str(d).removeprefix('torch.') for d in DTYPES)}"
        )


def encode(x: Tensor, sender: int, key: Key) -> Tensor:
    check_sendable(x, sender, key)
    h = [DTYPES.index(x.dtype), x.dim(), *x.shape] + [0] * (MAX_DIMS - x.dim())
    return torch.tensor(h, dtype=torch.int64, device=x.device)


def decode(h: Tensor) -> Spec:
    v = [int(a) for a in h.cpu().tolist()]
    return tuple(v[2 : 2 + v[1]]), DTYPES[v[0]]
