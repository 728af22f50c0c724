"""`python -m pathdino.train` with test instrumentation, for launching under accelerate from the distribution tests.

    accelerate launch ... tests/train_driver.py --config ... key=value ...

Runs the real command-line entry point (``pathdino.train.__main__.main`` and ``exit_process``) after wrapping three
functions the loop calls, according to environment variables:

* ``PATHDINO_TEST_DUMP=<dir>`` (required): after every checkpoint each rank appends SHA-256 digests of ITS OWN copy
  of the student, teacher and loss buffers (centers) to ``hashes_rank<r>.jsonl`` (DDP keeps full replicas on
  every rank, so equal digests mean the ranks hold equal weights; FSDP2 ranks hold different shards), with how
  many times so far the gradient all-reduce was skipped (DDP ``no_sync``, FSDP2's requires-sync flag off). After a
  resume, rank 0 writes what was actually reloaded (the gathered student, teacher, optimizer state) and every
  rank writes its loss buffers and its loader position, for comparison with the checkpoint's files. Every rank
  appends the (slide id, tile index) pairs of each batch it trains on to ``batches_rank<r>.jsonl``.
* ``PATHDINO_TEST_POISON=<rank>:<step>,<step>...[;<rank>:...]``: on that rank, the DINO loss VALUE of those steps is
  NaN while its gradient stays finite (a detached NaN is added), so only that rank's own finiteness check can
  notice: the test of the all-process agreement to skip a step.

``install`` is also used in-process (pytest) for single-process resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        t = t.to_local() if hasattr(t, "to_local") else t
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RecordingLoader:
    """A loader that writes its position right after ``load_state_dict``, and each batch's tiles."""

    def __init__(self, inner, dump: Path):
        self.inner, self.dump = inner, dump
        self.samples_per_epoch = getattr(inner, "samples_per_epoch", 0)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)
        (self.dump / f"loader_rank{_rank()}.json").write_text(json.dumps(self.inner.state_dict()))

    def __iter__(self):
        # Each batch's tiles (slide, tile index) as this rank received them: for the tests of who trains on what.
        with open(self.dump / f"batches_rank{_rank()}.jsonl", "a") as fh:
            for batch in self.inner:
                tiles = [[s, int(t)] for s, t in zip(batch.slide_ids, batch.tile_indices.tolist())]
                fh.write(json.dumps(tiles) + "\n")
                fh.flush()
                yield batch

    def close(self):
        if hasattr(self.inner, "close"):
            self.inner.close()


def _count_skipped_gradient_syncs() -> dict[str, int]:
    """Count entries into DDP's ``no_sync`` and FSDP2's ``set_requires_gradient_sync(False)`` (accumulation
    micro-steps that must not all-reduce), so that a test can see the skipping path was taken."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    counts = {"ddp_no_sync": 0, "fsdp2_no_sync": 0}
    no_sync, set_sync = DistributedDataParallel.no_sync, FSDPModule.set_requires_gradient_sync

    def counted_no_sync(self):
        counts["ddp_no_sync"] += 1
        return no_sync(self)

    def counted_set_sync(self, requires_gradient_sync, *args, **kwargs):
        counts["fsdp2_no_sync"] += not requires_gradient_sync
        return set_sync(self, requires_gradient_sync, *args, **kwargs)

    DistributedDataParallel.no_sync = counted_no_sync
    FSDPModule.set_requires_gradient_sync = counted_set_sync
    return counts


def install(dump: Path, poison: str | None = None) -> None:
    """Wrap the trainer's save_checkpoint (loop.py) / load_checkpoint / build_loader (run.py), and the DINO loss when
    poisoning."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    import pathdino.train.loop as loop
    import pathdino.train.run as run
    from pathdino.losses.dino import DINOLoss
    from pathdino.train.distributed import unwrap

    dump.mkdir(parents=True, exist_ok=True)
    save, load, build = loop.save_checkpoint, run.load_checkpoint, run.build_loader
    skipped_syncs = _count_skipped_gradient_syncs()

    def save_checkpoint(out_dir, step, parts, **kwargs):
        path = save(out_dir, step, parts, **kwargs)
        model, teacher, losses = parts.models["student"], parts.models["teacher"], parts.buffers["losses"]
        record = {
            "step": step,
            "student": digest(unwrap(model).state_dict()),
            "teacher": digest(teacher.state_dict()),
            "centers": digest(losses.state_dict()),
            "skipped_syncs": dict(skipped_syncs),
        }
        with open(dump / f"hashes_rank{_rank()}.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        return path

    def load_checkpoint(path, parts):
        state = load(path, parts)
        student, teacher, losses = parts.models["student"], parts.models["teacher"], parts.buffers["losses"]
        optimizer = parts.optimizer
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        s, t = get_model_state_dict(student, options=full), get_model_state_dict(teacher, options=full)
        o = get_optimizer_state_dict(student, optimizer, options=full)
        if _rank() == 0:
            save_file({k: v.contiguous() for k, v in s.items()}, dump / "reloaded_student.safetensors")
            save_file({k: v.contiguous() for k, v in t.items()}, dump / "reloaded_teacher.safetensors")
            torch.save(o, dump / "reloaded_optimizer.pt")
        save_file(
            {k: v.contiguous() for k, v in losses.state_dict().items()},
            dump / f"reloaded_losses_rank{_rank()}.safetensors",
        )
        return state

    def build_loader(*args, **kwargs):
        return RecordingLoader(build(*args, **kwargs), dump)

    loop.save_checkpoint = save_checkpoint
    run.load_checkpoint, run.build_loader = load_checkpoint, build_loader
    if poison:
        by_rank: dict[int, set[int]] = {}
        for part in poison.split(";"):
            rank_text, steps_text = part.split(":")
            by_rank[int(rank_text)] = {int(s) for s in steps_text.split(",")}
        forward_terms = DINOLoss.forward_terms
        calls = {"n": 0}

        def poisoned(self, *args, **kwargs):
            global_term, local_term = forward_terms(self, *args, **kwargs)
            calls["n"] += 1
            # The rank is read here: the process group does not exist yet when install() runs.
            if calls["n"] in by_rank.get(_rank(), set()):
                global_term = global_term + torch.full_like(global_term, float("nan")).detach()
            return global_term, local_term

        DINOLoss.forward_terms = poisoned


if __name__ == "__main__":
    # PATHDINO_TEST_DEADLINE_S: a rank still alive then exits (124). torchrun puts workers in their own sessions,
    # so a test that gives up on a hung launch could not reach ranks waiting in a mismatched collective otherwise.
    if float(os.environ.get("PATHDINO_TEST_DEADLINE_S", 0)) > 0:
        import threading

        watchdog = threading.Timer(float(os.environ["PATHDINO_TEST_DEADLINE_S"]), os._exit, args=(124,))
        watchdog.daemon = True
        watchdog.start()
    install(Path(os.environ["PATHDINO_TEST_DUMP"]), os.environ.get("PATHDINO_TEST_POISON"))
    from pathdino.train.__main__ import main
    from pathdino.train.distributed import exit_process

    exit_process(main(sys.argv[1:]))
