"""Training checkpoints: atomic, resumable with any number of processes, no pickled objects.

Layout of ``<output_dir>/checkpoints/step_<step:09d>/`` (see docs/training.md); the DINOv2 trainer's parts::

    student.safetensors     full (unsharded) student state: backbone.*, dino_head.*, ibot_head.*
    teacher.safetensors     full teacher state, same names
    losses.safetensors      loss buffers (DINO and iBOT centers)
    optimizer.pt            AdamW state keyed by parameter name (tensors, numbers, strings only)
    rng_rank<r>.pt          each process's RNG states as tensors (torch, CUDA, numpy, python)
    trainer_state.json      step, counters, world size, every process's loader state, the resolved config

Nothing here knows DINO: a trainer names its parts in a ``CheckpointParts`` (models gathered to full tensors,
buffers saved as they are, one optimizer) and its counters in the trainer state, so another trainer (a slide
encoder) saves, resumes and reshards the same way.

A checkpoint is written into ``checkpoints/.tmp-step_<step>`` and renamed when complete, so a directory named
``step_*`` is always whole; the newest ``keep`` are kept. Model and optimizer states are gathered to full
tensors (``torch.distributed.checkpoint.state_dict``), so DDP, FSDP2 and single-process runs read each other's
checkpoints and a run may resume with a different number of processes.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from tiling.configio import ConfigError
from tiling.errors import PathdinoError
from tiling.fsio import publish_dir, read_json, safetensors_problem, zip_problem

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"


class CheckpointError(PathdinoError, RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model being trained."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)`` in ``output_dir``, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resume_point(output_dir: str | Path, resume: bool | str | Path | None) -> Path | None:
    """The checkpoint a run starts from (None: from scratch), as ``train(resume=...)`` / ``--resume`` ask.

    None/False: from scratch, refused when ``output_dir`` already holds checkpoints (nothing is overwritten by
    accident); True or "latest": the newest checkpoint there (from scratch if none); a path: that checkpoint.
    """
    if resume is None or resume is False:
        found = list_checkpoints(output_dir)
        if found:
            raise ConfigError(
                f"{output_dir} already holds checkpoints (newest: {found[-1][1].name}); pass --resume to continue "
                "that run, or set train.output_dir to a new directory"
            )
        return None
    if resume is True or resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            log.info("--resume: no checkpoint in %s yet, starting from scratch", output_dir)
            return None
        damaged = []
        for _, path in reversed(found):  # newest first: the newest complete one wins
            problem = checkpoint_problem(path)
            if problem is None:
                if damaged:
                    log.warning(
                        "--resume: %s; resuming from the newest complete checkpoint, %s", "; ".join(damaged), path.name
                    )
                return path
            damaged.append(f"{path.name} is damaged ({problem})")
        raise CheckpointError(
            f"--resume: every checkpoint in {checkpoint_root(output_dir)} is damaged: "
            f"{'; '.join(damaged[:3])}; start a new run in another train.output_dir"
        )
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(
            f"--resume {path}: no such checkpoint directory; give a step_* folder of a run, or "
            "--resume alone for the newest one in train.output_dir"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(
            f"--resume {path}: the checkpoint is damaged ({problem}); give another step_* "
            "folder, or --resume alone for the newest complete one in train.output_dir"
        )
    return path


def checkpoint_problem(path: str | Path) -> str | None:
    """What makes a checkpoint folder unusable (no trainer state, a truncated weights or optimizer file), or
    None. Reads file headers only: a resume finds a damaged checkpoint before building anything."""
    path = Path(path)
    try:
        read_trainer_state(path)
    except CheckpointError as exc:
        return str(exc)
    for file in sorted(path.iterdir()):
        problem = (
            safetensors_problem(file)
            if file.suffix == ".safetensors"
            else zip_problem(file)
            if file.suffix == ".pt"
            else None
        )
        if problem is not None:
            return f"{file.name}: {problem}"
    return None


@dataclass(frozen=True)
class CheckpointParts:
    """What a checkpoint holds besides the trainer state, each entry saved as ``<name>.safetensors``.

    ``models`` are gathered to full tensors over the processes (so they may be DDP-wrapped or FSDP2-sharded);
    ``buffers`` are saved from this process's ``state_dict`` (identical on every process, e.g. loss centers);
    ``optimizer`` steps the parameters of ``models[optimized]`` and is saved by parameter name (optimizer.pt).
    """

    models: Mapping[str, nn.Module]
    buffers: Mapping[str, nn.Module]
    optimizer: torch.optim.Optimizer
    optimized: str


# ----------------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as plain tensors (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
        "python_meta": torch.tensor([py_version, py_gauss is not None], dtype=torch.int64),
        "python_gauss": torch.tensor([py_gauss or 0.0], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda_{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"])
    meta = state["numpy_meta"].tolist()
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), meta[0], meta[1], float(state["numpy_gauss"][0]))
    )
    py_version, has_gauss = state["python_meta"].tolist()
    gauss = float(state["python_gauss"][0]) if has_gauss else None
    random.setstate((py_version, tuple(state["python_internal"].tolist()), gauss))
    if torch.cuda.is_available():
        cuda = [state[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in state]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------------------- save

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses views and shared storage; the copies are on CPU already.
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    parts: CheckpointParts,
    *,
    trainer_state: dict[str, Any],
    keep: int,
    name: str | None = None,
) -> Path:
    """Write checkpoint ``step`` of ``parts`` (every process must call this: the state is gathered collectively).

    ``trainer_state`` must be JSON-friendly and already hold every process's loader state; the newest ``keep``
    complete ``step_*`` checkpoints are kept. ``name`` (e.g. ``best``) writes ``checkpoints/<name>`` instead of
    ``step_<step>``, replacing the previous one atomically; named checkpoints are never pruned and never picked as
    the newest. Returns the final directory.
    """
    root = checkpoint_root(output_dir)
    final = root / (name or f"step_{step:09d}")
    tmp = root / f".tmp-{final.name}"
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over from a run killed while saving
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    # Collective: every rank takes part, only rank 0 receives the full tensors (cpu_offload).
    model_sds = {name: get_model_state_dict(module, options=_FULL) for name, module in parts.models.items()}
    optim_sd = get_optimizer_state_dict(parts.models[parts.optimized], parts.optimizer, options=_FULL)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        for name, sd in model_sds.items():
            save_file(_contiguous(sd), tmp / f"{name}.safetensors")
        for name, module in parts.buffers.items():
            save_file(_contiguous(module.state_dict()), tmp / f"{name}.safetensors")
        torch.save(optim_sd, tmp / "optimizer.pt")
        state = {"format_version": FORMAT_VERSION, "step": step, **trainer_state}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    _barrier()
    if rank == 0:
        # durable before the rename publishes it; replaces the same step saved again (e.g. the final save right
        # after a periodic one)
        publish_dir(tmp, final)
        prune_checkpoints(output_dir, keep)
    _barrier()
    return final


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    found = list_checkpoints(output_dir)
    for _, path in found[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------- load


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint folder; CheckpointError unless it is complete and of this format."""
    path = Path(path)
    file = path / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE}); pick another step_* folder")
    state = read_json(file, error=CheckpointError, hint="pick another step_* folder")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: checkpoint format {state.get('format_version')}, expected {FORMAT_VERSION}")
    return state


def load_model_file(module: nn.Module, file: Path) -> None:
    """Load one model file of a checkpoint into ``module`` (position embedding resampled to its grid; an error
    naming the file when the keys differ): a distillation teacher read from another run's checkpoint."""
    _load_model(module, file)


def _load_model(module: nn.Module, file: Path) -> None:
    from pathdino.models.pos_embed import resample_position_embeddings

    sd = load_file(file)
    own_sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=False))
    own = set(own_sd.keys())
    # A checkpoint from another crop-size phase: its position embedding is fitted to this model's grid.
    resized = resample_position_embeddings(sd, {k: v.shape for k, v in own_sd.items()})  # global shapes (DTensor)
    if resized:
        log.info("%s: resampled %s to this model's grid", file.name, ", ".join(resized))
    missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
    shapes = {k: (tuple(sd[k].shape), tuple(own_sd[k].shape)) for k in sorted(own & set(sd))}
    resized_shape = [f"{k} {list(a)} in the checkpoint, {list(b)} here" for k, (a, b) in shapes.items() if a != b]
    if missing or unexpected or resized_shape:
        what = [f"missing {missing[:5]}"] * bool(missing) + [f"unexpected {unexpected[:5]}"] * bool(unexpected)
        what += [f"{len(resized_shape)} tensor(s) of another shape ({'; '.join(resized_shape[:2])})"] * bool(
            resized_shape
        )
        raise CheckpointError(
            f"{file} does not fit the model ({', '.join(what)}); was it saved with another model config?"
        )
    set_model_state_dict(module, sd, options=StateDictOptions(full_state_dict=True))


def drop_mismatched_optimizer_state(optim_state: dict, shapes: dict[str, torch.Size]) -> list[str]:
    """Drop AdamW moments whose shape no longer fits their parameter (a resampled position embedding): the
    parameter starts fresh moments (and bias correction) at the switch. Returns the dropped names."""
    dropped = []
    for name, entry in list(optim_state["state"].items()):
        moments = [v for k, v in entry.items() if k != "step" and isinstance(v, torch.Tensor) and v.dim() > 0]
        if name in shapes and any(tuple(v.shape) != tuple(shapes[name]) for v in moments):
            del optim_state["state"][name]
            dropped.append(name)
    return dropped


def _load_optimizer(student: nn.Module, optimizer: torch.optim.Optimizer, file: Path) -> None:
    """Load AdamW state by parameter name; the current param groups' settings (multipliers, betas) are kept."""
    # mmap: the 2x-model-size moments are paged in as they are copied, not read whole on every process.
    optim_sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    module = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
    named = dict(module.named_parameters())
    unknown = sorted(set(optim_sd["state"]) - set(named))
    if unknown:
        raise CheckpointError(f"{file} has optimizer state for parameters this model lacks: {unknown[:5]}")
    # A resampled position embedding (phase switch) restarts its AdamW moments.
    dropped = drop_mismatched_optimizer_state(optim_sd, {n: p.shape for n, p in named.items()})
    if dropped:
        log.info("%s: AdamW state of %s restarts (shape changed)", file.name, ", ".join(dropped))
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    # strict=False: a parameter without state is legitimate (the last layer while it is frozen) ...
    set_optimizer_state_dict(student, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True, strict=False))
    # ... but the loader first creates state for every parameter (a zero-lr step); remove what the checkpoint
    # did not have, or AdamW's step count (its bias correction) would differ from the uninterrupted run.
    for name, param in named.items():
        if name not in optim_sd["state"]:
            optimizer.state.pop(param, None)
    if len(settings) != len(optimizer.param_groups):
        raise CheckpointError(f"{file}: {len(optimizer.param_groups)} parameter groups, expected {len(settings)}")
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


def load_checkpoint(path: str | Path, parts: CheckpointParts) -> dict[str, Any]:
    """Load a checkpoint into ``parts`` (possibly wrapped or sharded) on every process; returns the trainer state.

    Every process reads the files itself (the output directory must be shared between nodes). This process's
    RNG state is restored when the checkpoint has one for its rank; ``state["rng_restored"]`` says whether it did.
    """
    path = Path(path)
    state = read_trainer_state(path)
    needed = [f"{name}.safetensors" for name in (*parts.models, *parts.buffers)] + ["optimizer.pt"]
    absent = [name for name in needed if not (path / name).is_file()]
    if absent:
        raise CheckpointError(f"checkpoint {path} lacks {absent}: it is incomplete; pick another step_* folder")
    for name, module in parts.models.items():
        _load_model(module, path / f"{name}.safetensors")
    for name, module in parts.buffers.items():
        module.load_state_dict(load_file(path / f"{name}.safetensors"))
    _load_optimizer(parts.models[parts.optimized], parts.optimizer, path / "optimizer.pt")
    rng_file = path / f"rng_rank{_rank()}.pt"
    state["rng_restored"] = rng_file.is_file()
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state
