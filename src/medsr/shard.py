"""Work shared across the processes ``torchrun`` starts (one machine or several): where this process stands, its
device, its share of a list, and the results of all of them.

``torchrun --nproc_per_node N`` gives each process its place in the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); :func:`ranks` reads it, and a plain
process is rank 0 of 1. Only :func:`process_group` joins ``torch.distributed``, and only under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist

from medsr.infer import resolve_device

T = TypeVar("T")


class Ranks(NamedTuple):
    """This process among all (``rank`` of ``world_size``) and among those on its machine (``local_...``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


def ranks() -> Ranks:
    """This process's place among ``torchrun``'s processes, from its environment; rank 0 of 1 without ``torchrun``.

    >>> ranks()
    Ranks(rank=0, world_size=1, local_rank=0, local_world_size=1)
    """
    values = {}
    for field, default in Ranks._field_defaults.items():
        name = field.upper()
        text = os.environ.get(name, str(default))
        if not text.isdigit():
            raise ValueError(f"environment variable {name}={text!r}: expected a whole number (set by torchrun)")
        values[field] = int(text)
    place = Ranks(**values)
    if place.rank >= place.world_size or place.local_rank >= place.local_world_size:
        raise ValueError(f"environment {place}: a rank must be below its world size (set by torchrun)")
    return place


def share(items: Sequence[T], place: Ranks) -> list[T]:
    """This process's share of ``items``: every ``world_size``-th one from its ``rank`` on. The shares of all ranks
    are disjoint and together are ``items``, when every rank passes the same ``items`` (e.g. a sorted list).

    >>> share(["a", "b", "c", "d", "e"], Ranks(rank=1, world_size=2))
    ['b', 'd']
    """
    return list(items[place.rank :: place.world_size])


def rank_device(device: str = "auto") -> torch.device:
    """:func:`infer.resolve_device`, with each process on a machine on its own GPU: 'auto' (where there is a GPU)
    and 'cuda' mean ``cuda:LOCAL_RANK``. A device this machine lacks is a ValueError naming it.

    >>> rank_device("cpu")
    device(type='cpu')
    """
    chosen = resolve_device(device)
    if chosen.type != "cuda" or chosen.index is not None:
        return chosen
    local, count = ranks().local_rank, torch.cuda.device_count()
    if local >= count:
        raise ValueError(
            f"device {device!r}: {count} CUDA GPU(s) here, none for local process {local}; start at most {count} "
            "processes per machine, or pass --device cpu"
        )
    return torch.device("cuda", local)


@contextlib.contextmanager
def process_group(backend: str = "gloo", *, timeout: datetime.timedelta | None = None) -> Iterator[Ranks]:
    """Under ``torchrun``, join its process group for the block (gloo; nccl for CUDA tensors) and give this
    process its share of the machine's CPU threads; for one process, do nothing. Yields :func:`ranks`.

    Args:
        timeout: How long a collective (e.g. :func:`gather`) waits for the slowest process (torch's default: 30 min).

    >>> with process_group() as place:  # a plain process: rank 0 of 1, no process group
    ...     gather(place.rank)
    [0]
    """
    place = ranks()
    if place.world_size == 1 or dist.is_initialized():  # one process, or a caller that joined already
        yield place
        return
    torch.set_num_threads(max(1, _cpu_count() // place.local_world_size))
    dist.init_process_group(backend, **({"timeout": timeout} if timeout else {}))
    try:
        yield place
    finally:
        dist.destroy_process_group()


def gather(value: T) -> list[T]:
    """Every process's ``value`` (picklable), in rank order, on every process; ``[value]`` outside a process group.

    >>> gather({"written": 3})
    [{'written': 3}]
    """
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a batch job's share), else all of the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
