"""Data parallelism with torch.distributed, for `torchrun --nproc_per_node=N script.py` (NCCL
for GPU tensors, gloo for CPU ones).

Every rank holds the whole model and draws the same global batch (its randomness derives from the
seed and the step); each rank works on its own slice of it. Losses are normalised by *global* counts
and gradients are summed across ranks, so a step equals the single-process step on the same global
batch. Only rank 0 writes files. Without torchrun (no RANK in the environment) every function here
is a no-op on a single process.
"""
import atexit
import os
import sys

import torch
import torch.distributed as dist


def init(device):
    if "RANK" in os.environ and not dist.is_initialized():
        if device.type == "cuda":  # before the group: NCCL binds each rank to its current GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # NCCL reduces GPU tensors only; the counts and losses summed here are CPU numbers
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        # Left to interpreter shutdown, gloo's worker threads can be torn down unjoined
        # ("terminate called without an active exception", SIGABRT after a finished run).
        atexit.register(_destroy)
        if not is_main():
            sys.stdout = open(os.devnull, "w")  # one rank speaks; errors still reach stderr


def _destroy():
    if dist.is_initialized():
        dist.destroy_process_group()


def finish():
    """End a finished run on every rank together, then tear the process group down: one rank
    destroying it while another still talks made gloo abort a finished run (SIGABRT, seen in CI)."""
    if dist.is_initialized():
        dist.barrier()
        _destroy()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def under_torchrun():
    """Whether torchrun started this process beside other ranks (readable before `init`, so that
    a script that runs on one process can refuse before any work)."""
    return os.environ.get("WORLD_SIZE", "1") != "1"


def is_main():
    return rank() == 0


def shard_bounds(n):
    """(start, stop) of this rank's contiguous slice of a global batch of n."""
    r, w = rank(), world()
    return r * n // w, (r + 1) * n // w


def shard(items):
    """This rank's contiguous slice of a global batch (a list or a tensor's first dimension)."""
    start, stop = shard_bounds(len(items))
    return items[start:stop]


def all_sum(x):
    """Sum of a number over ranks."""
    if world() == 1:
        return x
    t = torch.tensor(float(x), dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def sync_grads(params):
    """Sum every gradient over ranks: with globally normalised losses this is the
    full-batch gradient."""
    if world() > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)


def barrier():
    """Wait for every rank (e.g. until rank 0 has written a checkpoint the others will read)."""
    if world() > 1:
        dist.barrier()


def all_max(n):
    """Largest int over ranks (e.g. the response width every rank must pad to)."""
    if world() == 1:
        return n
    t = torch.tensor(n)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def gather_rows(*tensors):
    """Concatenate each rank's tensor along dim 0, in rank order (equal shapes on every rank)."""
    if world() == 1:
        return tensors
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(world())]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return tuple(out)
