"""Several processes (`accelerate launch`, torchrun): who am I, split the work, put it back.

Every process runs every stage. A list of W·m + c prompts is split round-robin: process r of W
takes the items at positions r, r + W, r + 2W, … (shard sizes differ by at most one, and a list
sorted by length still spreads evenly), and `merge` is the exact inverse:

    shard(x, r, W)[j] = x[r + j·W]        merge([shard(x, r, W) for r in range(W)]) = x

Only the main process (rank 0) writes final artifacts and stage manifests; the others wait at
`barrier()`. With a single process nothing here initialises accelerate or torch.distributed:
rank 0, world size 1, and every barrier is a no-op, so a plain `prefloop ...` is unchanged.

Processes exchange results through files in the run directory (each writes its own shard file,
the main process merges them), so a run on several machines needs the run directory on a
filesystem that every machine sees (NFS, Lustre, a shared volume).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from prefloop.errors import PrefloopError

T = TypeVar("T")

# torchrun/accelerate set WORLD_SIZE; mpirun (accelerate's multi-CPU launcher) sets the others.
WORLD_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class Topology:
    rank: int = 0  # this process, 0 .. world_size - 1 across all machines
    world_size: int = 1
    local_rank: int = 0  # this process on its machine (picks its GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """The number of processes the launcher started (1 when none did)."""
    for key in WORLD_SIZE_VARS:
        value = os.environ.get(key)
        if value:
            try:
                return int(value)
            except ValueError:
                raise PrefloopError(f"environment variable {key}={value!r} is not an integer; "
                                    "unset it or launch with accelerate launch") from None
    return 1


def _wants_cpu() -> bool:
    """CPU processes (gloo) when there is no GPU or the launcher asked for CPU."""
    import torch

    flag = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()


def _state():
    from accelerate import PartialState

    # cpu=True is what makes accelerate pick gloo and MULTI_CPU when torchrun started several
    # processes on a machine without GPUs; on GPUs it picks NCCL and sets this process's device.
    return PartialState(cpu=_wants_cpu())


def topology() -> Topology:
    """This process's place; initialises accelerate's PartialState only under a launcher."""
    world = env_world_size()
    if world <= 1:
        return Topology()
    state = _state()
    if state.num_processes != world:
        raise PrefloopError(
            f"the launcher started {world} processes but accelerate sees "
            f"{state.num_processes} ({state.distributed_type}); launch with `accelerate launch "
            "--config_file configs/accelerate/<ddp|fsdp|cpu2>.yaml -m prefloop ...`")
    return Topology(state.process_index, state.num_processes, state.local_process_index)


def is_main() -> bool:
    return topology().is_main


def barrier() -> None:
    """Wait until every process gets here (a no-op with one process)."""
    if env_world_size() > 1:
        _state().wait_for_everyone()


@contextmanager
def main_first() -> Iterator[None]:
    """Run the block in the main process first, then in the others (e.g. begin a stage)."""
    main = is_main()
    if not main:
        barrier()
    yield
    if main:
        barrier()


# --- splitting and merging ---------------------------------------------------------------------

def _check(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Process `rank`'s items: positions rank, rank + W, rank + 2W, … (W = world_size)."""
    _check(rank, world_size)
    return list(items[rank::world_size])


def shard_sizes(n: int, world_size: int) -> list[int]:
    """len(shard(x, r, W)) for every r when len(x) = n: ceil((n − r) / W)."""
    _check(0, world_size)
    return [max(0, -(-(n - r) // world_size)) for r in range(world_size)]


def merge(shards: Sequence[Sequence[T]]) -> list[T]:
    """The inverse of `shard`: merge([shard(x, r, W) for r in range(W)]) == x."""
    world_size = len(shards)
    n = sum(len(s) for s in shards)
    if world_size == 0:
        return []
    sizes = [len(s) for s in shards]
    if sizes != shard_sizes(n, world_size):
        raise ValueError(f"shard sizes {sizes} are not a round-robin split of {n} items "
                         f"over {world_size} processes (expected {shard_sizes(n, world_size)})")
    return [shards[i % world_size][i // world_size] for i in range(n)]


# --- per-process files -------------------------------------------------------------------------

_RANK_FILE = re.compile(r"\.rank(\d+)$")


def shard_path(path: Path, rank: int) -> Path:
    """Process `rank`'s own file beside `path`: generations.jsonl -> generations.rank1.jsonl."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def shard_paths(path: Path) -> list[Path]:
    """Every existing per-process file of `path`, by rank (also those of an earlier run that
    used more processes)."""
    path = Path(path)
    found = []
    for p in path.parent.glob(f"{path.stem}.rank*{path.suffix}"):
        m = _RANK_FILE.search(p.name[: len(p.name) - len(path.suffix)])
        if m and p.name == shard_path(path, int(m.group(1))).name:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]
