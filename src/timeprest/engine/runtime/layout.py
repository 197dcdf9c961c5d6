"""Where each rank sits in a job of D replicas of a W-stage pipeline (docs/design.md section 10).

By default rank = ``replica * W + stage``: the W ranks of a replica are
consecutive, so a replica fills a node when W processes run per node. A 2-D
``torch.distributed.device_mesh.DeviceMesh`` with dimension names
``("dp", "pp")`` gives any other placement: ``mesh[replica][stage]`` is the
rank. Point-to-point traffic stays within a replica (its ``pp`` row); the
copies of a stage combine their gradients over their ``dp`` column.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from timeprest.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """The rank of every (replica, stage), and this process's rank."""

    ranks: tuple[tuple[int, ...], ...]  # ranks[replica][stage]
    rank: int

    @property
    def num_replicas(self) -> int:
        return len(self.ranks)

    @property
    def num_stages(self) -> int:
        return len(self.ranks[0])

    def position(self, rank: int) -> tuple[int, int]:
        """(replica, stage) of ``rank``."""
        for r, row in enumerate(self.ranks):
            if rank in row:
                return r, row.index(rank)
        raise ValueError(f"rank {rank} is not in the layout")

    @property
    def replica(self) -> int:
        return self.position(self.rank)[0]

    @property
    def stage(self) -> int:
        return self.position(self.rank)[1]

    def name(self, rank: int) -> str:
        """How failure messages name ``rank``: its stage, and its replica when there are several."""
        r, s = self.position(rank)
        if self.num_replicas == 1:
            return f"rank {rank} (stage {s})"
        return f"rank {rank} (replica {r}, stage {s})"

    def pipeline_ranks(self) -> tuple[int, ...]:
        """The ranks of this process's replica, by stage (its point-to-point peers)."""
        return self.ranks[self.replica]

    def copies(self, stage: int) -> list[int]:
        """The ranks that run ``stage``, by replica."""
        return [row[stage] for row in self.ranks]


def default_layout(rank: int, world_size: int, num_replicas: int) -> Layout:
    """rank = replica * W + stage, with W = world_size / num_replicas."""
    if world_size % num_replicas:
        raise ConfigError(
            f"data_parallel={num_replicas} does not divide WORLD_SIZE {world_size}: "
            "launch data_parallel x num_stages processes"
        )
    w = world_size // num_replicas
    ranks = tuple(tuple(r * w + s for s in range(w)) for r in range(num_replicas))
    return Layout(ranks, rank)


def mesh_layout(mesh: Any, rank: int, world_size: int) -> Layout:
    """The layout of a 2-D ``DeviceMesh`` with dimension names ``("dp", "pp")``."""
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    grid = getattr(mesh, "mesh", None)
    if names != ("dp", "pp") or grid is None or grid.dim() != 2:
        raise ConfigError(
            "device_mesh must be a 2-D DeviceMesh with mesh_dim_names=('dp', 'pp'), e.g. "
            "init_device_mesh('cuda', (D, W), mesh_dim_names=('dp', 'pp'))"
        )
    ranks = tuple(tuple(int(v) for v in row) for row in grid.tolist())
    if sorted(v for row in ranks for v in row) != list(range(world_size)):
        raise ConfigError(
            f"device_mesh covers ranks {sorted(v for row in ranks for v in row)}, but the job "
            f"has WORLD_SIZE {world_size}: the mesh must hold every rank once"
        )
    return Layout(ranks, rank)


def dp_group(layout: Layout, mesh: Any, timeout: float) -> Any:
    """The process group of this rank's stage copies (None with one replica).

    Without a mesh every rank creates one group per stage, in stage order (group
    creation is collective), on the default backend: gloo on CPU, NCCL on GPUs.
    """
    if layout.num_replicas == 1:
        return None
    if mesh is not None:
        return mesh.get_group("dp")
    mine = None
    for s in range(layout.num_stages):
        group = dist.new_group(layout.copies(s), timeout=datetime.timedelta(seconds=timeout))
        if s == layout.stage:
            mine = group
    return mine
