"""Process setup with accelerate, checks that a multi-process launch really is distributed, FSDP2, clean exit.

accelerate 1.15 facts this module guards against (docs/training.md, "Launching"):

* without ``Accelerator(cpu=True)`` on a machine without CUDA, ``accelerate launch --multi_gpu --num_processes 2``
  starts two processes that each train alone (no process group);
* ``accelerate launch --cpu --num_processes 2`` silently starts one process (nothing in it can tell);
* ~6% of 2-process CPU runs abort at interpreter exit after all work ("terminate called without an active
  exception"); ending workers with ``destroy_process_group()`` then ``os._exit`` avoids it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from tiling.configio import ConfigError
from tiling.errors import PathdinoError

if TYPE_CHECKING:  # accelerate is imported when a run starts, not by every user of these helpers
    from accelerate import Accelerator

log = logging.getLogger("pathdino.train")


class LaunchError(PathdinoError, RuntimeError):
    """The processes were launched in a way that would not train as one distributed job."""


def make_accelerator(precision: str, project_dir: str, log_with: list[str] | None) -> Accelerator:
    """An ``Accelerator`` on CUDA when available, else on CPU with ``cpu=True`` (gloo across processes).

    Precision comes from the training config (``train.precision``: fp32 or bf16) and the loop applies it itself
    (``torch.autocast``; FSDP2's mixed-precision policy), so accelerate's own mixed precision stays "no": that also
    lets one process run several trainings of different precision (accelerate's state is a process singleton).
    torch.compile is ``train.compile``, so accelerate's dynamo must be off.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    mixed_precision = "bf16" if precision == "bf16" else "no"
    if launched and launched != mixed_precision:
        log.warning(
            "accelerate was launched with --mixed_precision %s; train.precision=%s is used", launched, precision
        )
    dynamo = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper()
    if dynamo not in ("NO", ""):
        raise LaunchError(
            f"accelerate was launched with --dynamo_backend {dynamo.lower()}; pathdino.train compiles the blocks "
            "itself: launch with --dynamo_backend no and set train.compile=true"
        )
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="no",
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=project_dir),
    )


def check_launch(accelerator: Accelerator) -> None:
    """Fail loudly unless the processes form one distributed job of ``accelerator.num_processes`` members."""
    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    initialized = dist.is_available() and dist.is_initialized()
    n = accelerator.num_processes
    hint = (
        "On CPU launch with: accelerate launch --multi_gpu --num_processes N --num_machines 1 "
        "--mixed_precision no --dynamo_backend no -m pathdino.train --config ...; on GPUs use a config from "
        "configs/accelerate/."
    )
    if env_world > 1 and n == 1:
        raise LaunchError(
            f"WORLD_SIZE={env_world} but accelerate sees 1 process: each process would train alone. {hint}"
        )
    if "LOCAL_RANK" in os.environ and env_world > 1 and not initialized:
        raise LaunchError(f"LOCAL_RANK is set but no torch.distributed process group exists. {hint}")
    if n > 1 and not initialized:
        raise LaunchError(f"accelerate reports {n} processes but no process group. {hint}")
    if initialized:
        if dist.get_world_size() != n:
            raise LaunchError(f"process group has {dist.get_world_size()} members, accelerate reports {n}. {hint}")
        # One real collective: a silently broken group fails here rather than after hours of training.
        probe = torch.ones(1, device=accelerator.device)
        dist.all_reduce(probe)
        if int(probe.item()) != n:
            raise LaunchError(f"all-reduce over {n} processes returned {probe.item()}; the process group is broken")


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def use_fsdp(parallel: str, accelerator: Accelerator) -> bool:
    """Whether to shard with FSDP2 (``train.parallel``: auto, ddp, fsdp2) under this launch."""
    from accelerate.utils import DistributedType

    # On CPU accelerate turns an FSDP config into plain MULTI_CPU but leaves ACCELERATE_USE_FSDP set.
    accelerate_fsdp = (
        accelerator.distributed_type == DistributedType.FSDP
        or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    )
    if parallel == "ddp" and accelerate_fsdp:
        raise ConfigError(
            "train.parallel=ddp, but accelerate was launched with an FSDP config: use "
            "train.parallel=auto (or fsdp2), or launch with configs/accelerate/multi_gpu.yaml"
        )
    sharded = parallel == "fsdp2" or (parallel == "auto" and accelerate_fsdp)
    if sharded and accelerator.num_processes == 1:
        log.info("train.parallel=fsdp2 with one process: nothing to shard, running unsharded")
        return False
    return sharded


def shard_fsdp2(
    model: nn.Module, units: Iterable[nn.Module], *, precision: str, reshard_after_forward: bool = True
) -> nn.Module:
    """Shard ``model`` with torch's FSDP2 ``fully_shard``: one unit per module of ``units`` (e.g. each ViT block
    and head, in forward order), then the root.

    Student and teacher are sharded identically so the EMA runs on local shards. bf16 runs keep fp32 master
    parameters and reduce gradients in fp32 (as dinov3).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "bf16"
        else MixedPrecisionPolicy()
    )
    kwargs = dict(mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps (DDP ``no_sync``; FSDP2's requires-sync flag)."""
    if enabled:
        yield
        return
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are their own unwrapped form)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def exit_process(code: int) -> None:
    """End this process now: flush, leave the process group (success only), ``os._exit(code)``.

    Used by the command-line entry point only. On failure the group is not destroyed (peers may be stuck in a
    collective); the launcher tears the job down on the non-zero exit code.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    if code == 0 and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    os._exit(code)
