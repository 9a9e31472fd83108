"""Running one training over several processes with PyTorch's own engine (torchrun + torch.distributed).

`torchrun --nproc-per-node N -m visiontune train ...` (or `visiontune train --nproc N`, which starts that
command) sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR in each process; :func:`start`
joins the process group (gloo on CPU, NCCL when every process has a GPU) and gives each process its share
of the machine's cores. What the ranks split, and how, lives where the work is:

- caching (cache/features.py): each rank computes every W-th block of the images no shard holds and writes
  its own shards; the feature store's O_EXCL shard ids already make concurrent writers safe, and after a
  barrier every rank reads the union.
- training (train/loop.py): each global batch of the plan's size is cut into W contiguous blocks, one per
  rank; DistributedDataParallel averages the gradients, each rank's loss weighted by its block's share, so a
  step is the single-process step on the whole batch (same effective batch, same schedule).
- validation during fine-tuning: each rank predicts its block of the validation images, the logits are
  gathered, and every rank computes the same metrics (so early stopping decides alike everywhere).
- everything that writes the run directory, prints, or decides (the plan, automatic choices) happens on
  rank 0; the others receive its decisions (:func:`broadcast`). The run directory is rank 0's alone
  (runs.py: RunDir.follower writes nothing).

Objects cross processes with torch.distributed's object collectives (pickle between our own processes
of one job, never a file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """Where this process stands in the job: its rank among `size` processes, `local_size` on this machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def shared(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, from the variables torchrun sets (one process when they are absent)."""
    def number(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    size = number("WORLD_SIZE", 1)
    return World(number("RANK", 0), size, number("LOCAL_RANK", 0), number("LOCAL_WORLD_SIZE", size))


def threads_per_process(local_size: int, cores: int | None = None) -> int:
    """The machine's cores split evenly between the processes on it (at least one each)."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, local_size))


def start() -> World:
    """Join the job's process group when torchrun started several processes; a no-op for one.

    Followers (rank > 0) print nothing: one console speaks for the job."""
    here = world()
    if not here.shared:
        return here
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from visiontune.device import bind_local_gpu, distributed_backend

        backend = distributed_backend()
        if backend == "nccl":
            bind_local_gpu(here.local_rank)
        dist.init_process_group(backend)
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun sets 1 when unset; `--nproc` sets cores / N
        torch.set_num_threads(threads_per_process(here.local_size))
    if not here.main:
        from visiontune.progress import console

        console.quiet = True
    return here


def active() -> bool:
    """True inside a job of several processes whose group is joined."""
    import torch.distributed as dist

    return world().shared and dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def broadcast(value: T) -> T:
    """Rank 0's `value` on every rank (unchanged in a single process)."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank ([value] in a single process)."""
    if not active():
        return [value]
    import torch.distributed as dist

    out: list = [None] * world().size
    dist.all_gather_object(out, value)
    return out


def total(*numbers: float) -> tuple[float, ...]:
    """The sums of `numbers` over all ranks."""
    if not active():
        return tuple(numbers)
    import torch
    import torch.distributed as dist

    from visiontune.device import collective_device

    values = torch.tensor(numbers, dtype=torch.float64, device=collective_device())
    dist.all_reduce(values)
    return tuple(values.cpu().tolist())


def block(n: int, here: World | None = None) -> slice:
    """This rank's contiguous block of `n` items (sizes differ by at most one; ranks beyond `n` get none)."""
    here = here or world()
    return slice(here.rank * n // here.size, (here.rank + 1) * n // here.size)


def blocks_of_batches(order: list[int], batch_size: int, here: World | None = None) -> list[int]:
    """This rank's :func:`block` of each global batch of `order`, concatenated in step order: the items it
    loads itself, so no rank decodes another's images."""
    batches = (order[start : start + batch_size] for start in range(0, len(order), batch_size))
    return [i for batch in batches for i in batch[block(len(batch), here)]]


def my_blocks(n: int, block_size: int, here: World | None = None) -> list[int]:
    """Positions 0..n-1 cut in blocks of `block_size`, of which this rank takes every W-th: its share of work
    done block by block (cache shards), so each block is written by one rank."""
    here = here or world()
    starts = range(here.rank * block_size, n, here.size * block_size)
    return [i for start in starts for i in range(start, min(n, start + block_size))]


def launch(nproc: int, visiontune_args: list[str], env: dict[str, str] | None = None) -> int:
    """`visiontune ARGS` as a torchrun job of `nproc` processes on this machine (a free local port, each
    process given cores / nproc threads; `env` added, e.g. the GPUs it may see); returns torchrun's exit code."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "visiontune", *visiontune_args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads_per_process(nproc))), **(env or {})}
    try:
        return subprocess.run(command, env=env).returncode
    except KeyboardInterrupt:  # torchrun passed Ctrl-C on to its processes, which saved their checkpoint
        return 130
