"""Data-parallel sweeps under ``torchrun`` (DESIGN §8): one process per device.

Every rank holds the same θ₀ and S₀ and runs the same η loop; the batches are split by rows.

- Evaluation batch E: rank k scores rows ``shard(B_E)``; the per-sequence sums are gathered
  into global row order *before* any ratio is taken (H = Σh / ΣT is not a mean of per-rank
  H's, and the policy reading's weights are normalised over all of E).
- Update batch U: split by prompt, never inside a prompt's group of G generations (its
  advantages need the whole group). Each rank back-propagates its prompts with the global
  normalisation 1/(G·L_max·num_prompts) and the gradients are summed once, after the last
  micro-batch; clipping then sees the global norm and every rank takes the same AdamW step.
- Sampling is reproducible per row (``rollout.sample_responses``), so the union of the
  shards is exactly the single-process batch.

With one process (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``) every helper is a no-op, so the
single-process path runs no collective at all.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from entropy_lab.errors import EntropyLabError

# A finite timeout turns a collective that a failed rank will never join into an error
# instead of a hang (torchrun also tears the group down when one worker exits non-zero).
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "ENTROPY_LAB_DIST_TIMEOUT_S"

F = TypeVar("F", bound=Callable[..., Any])


def requested() -> bool:
    """True when launched by torchrun (or similar) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 alone writes the results folder and prints."""
    return rank() == 0


def rank_device(device: str, local_rank: int) -> str:
    """``cuda`` means this rank's own GPU, cuda:LOCAL_RANK; any other device is kept."""
    return f"cuda:{local_rank}" if device == "cuda" else device


def init(device: str, timeout_s: float | None = None) -> str:
    """Join the process group from torchrun's environment; returns this rank's device.

    gloo on CPU, nccl on CUDA. With one process it returns ``device`` unchanged.
    """
    if not requested():
        return device
    if device.startswith("cuda:"):  # nccl refuses two ranks on one GPU, and would say so late
        raise EntropyLabError(
            f"--device {device} under torchrun: pass --device cuda, each rank then takes "
            "cuda:LOCAL_RANK (choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    device = rank_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if active():  # already joined (e.g. a second sweep in the same process)
        return device
    timeout = datetime.timedelta(
        seconds=float(timeout_s or os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    )
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # before the group: nccl binds to the current device
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device(device))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def record_errors(fn: F) -> F:
    """torchrun's error recorder: the failing rank's traceback in torchrun's summary."""
    if not requested():
        return fn
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)


# -- sharding ---------------------------------------------------------------------------------


def shard_bounds(n: int, index: int, world: int) -> tuple[int, int]:
    """Rank ``index``'s rows [start, stop) of n: contiguous and balanced, the first
    n mod world ranks taking one more."""
    base, extra = divmod(n, world)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard(n: int) -> range:
    """This rank's row indices of an n-row batch (all of them with one process)."""
    start, stop = shard_bounds(n, rank(), world_size())
    return range(start, stop)


# -- collectives (no-ops with one process) ------------------------------------------------------


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_over_ranks(value: float) -> float:
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    return float(all_reduce_sum_(t).item())


def all_gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """The rows of an n-row tensor, each rank holding its ``shard(n)``, in global order."""
    if not active():
        return local
    world = world_size()
    counts = [stop - start for start, stop in (shard_bounds(n, r, world) for r in range(world))]
    if local.shape[0] != counts[rank()]:
        raise ValueError(
            f"rank {rank()} holds {local.shape[0]} rows, its shard has {counts[rank()]}"
        )
    # all_gather needs equal shapes: pad every shard to the largest, then trim.
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def cat_over_ranks(local: torch.Tensor) -> torch.Tensor:
    """Every rank's CPU tensor (any length), concatenated in rank order."""
    if not active():
        return local
    return torch.cat(all_gather_objects(local.cpu()))


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list with one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _collective_device() -> torch.device:
    # nccl moves only CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
