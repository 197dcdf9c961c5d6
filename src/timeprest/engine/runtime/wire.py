"""The wire format of an activation's header: its dtype and shape, as a small int64 tensor.

The first activation of each micro-batch size on a channel is preceded by a
header; later ones of that size must match it (one output shape per size).
"""

from __future__ import annotations

import torch
from torch import Tensor

from timeprest.errors import ShapeError

Key = tuple[int, int]  # (minibatch, microbatch) within one train() call

_DTYPES = (
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
_MAX_DIMS = 8
HEADER = 2 + _MAX_DIMS  # dtype code, number of dims, dims

Spec = tuple[tuple[int, ...], torch.dtype]


def encode(x: Tensor, sender: int, key: Key) -> Tensor:
    if x.dtype not in _DTYPES or x.dim() > _MAX_DIMS:
        raise ShapeError(
            f"stage {sender} returned a tensor of dtype {x.dtype} with {x.dim()} dims for "
            f"micro-batch {key[0]}.{key[1]}; the runtime sends up to {_MAX_DIMS} dims of "
            f"{', '.join(str(d).removeprefix('torch.') for d in _DTYPES)}"
        )
    h = [_DTYPES.index(x.dtype), x.dim(), *x.shape] + [0] * (_MAX_DIMS - x.dim())
    return torch.tensor(h, dtype=torch.int64, device=x.device)


def decode(h: Tensor) -> Spec:
    v = [int(a) for a in h.cpu().tolist()]
    return tuple(v[2 : 2 + v[1]]), _DTYPES[v[0]]
