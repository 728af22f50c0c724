"""Command line: ``python -m pathdino.train`` or ``accelerate launch [...] -m pathdino.train``.

    python -m pathdino.train --config configs/train/vits14.yaml data.stores=[/data/tiles] train.batch_size=256
    python -m pathdino.train --config ... --resume                 # newest checkpoint in train.output_dir
    python -m pathdino.train --config ... --resume runs/x/checkpoints/step_000010000
    python -m pathdino.train --config ... --check                  # validate config and stores, then exit

Exit codes: 0 done (or stopped by stop_at_step / a signal, with a checkpoint; or --resume of a finished run), 2 an
error the user can fix (a ``PathdinoError``: config, stores, checkpoint, launch), 3 too many non-finite steps in a
row, 130 a second Ctrl-C (stopped mid-step; the last checkpoint is kept), 1 anything else (a bug: its traceback is
printed). Every process ends through ``exit_process`` (see distributed.py).
"""

from __future__ import annotations

import argparse
import sys
import traceback


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pathdino.train",
        description="DINOv2 pretraining on pathdino tile stores (launch with accelerate for several processes).",
    )
    p.add_argument("--config", required=True, help="YAML training config, e.g. configs/train/vits14.yaml")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="resume from the newest checkpoint in train.output_dir (or from CHECKPOINT)",
    )
    p.add_argument("--check", action="store_true", help="validate the config and tile stores, then exit")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides with dotted keys, e.g. optim.base_lr=2e-4 train.batch_size=512",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse, train, and return the exit code (the caller decides how to exit)."""
    args = _parser().parse_intermixed_args(argv)  # overrides may come before or after flags
    from pathdino.train.config import load_config
    from pathdino.train.health import NonFiniteError
    from pathdino.train.validate import validate_config
    from tiling.errors import PathdinoError

    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        if args.check:
            catalog = validate_config(cfg, world_size=1, check_stores=True)
            print(f"{args.config}: config and stores are valid" + (f"; trains on {catalog.uses}" if catalog else ""))
            return 0
        from pathdino.train.loop import train

        resume = True if args.resume == "latest" else args.resume
        if resume and _already_finished(cfg, resume):
            return 0
        summary = train(cfg, resume=resume)
        if summary.get("stopped_early"):
            _say_how_to_resume(cfg, "stopped by a signal")
        return 0
    except KeyboardInterrupt:  # a second Ctrl-C: stopped mid-step, the last checkpoint is what is kept
        _say_how_to_resume(cfg, "interrupted")
        return 130
    except NonFiniteError as exc:
        print(f"pathdino.train: {exc}", file=sys.stderr)
        return 3
    except PathdinoError as exc:  # a config, store, checkpoint or launch the user can fix
        print(f"pathdino.train: error: {exc}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - report, then exit non-zero so the launcher stops the other processes
        traceback.print_exc()
        return 1


def _say_how_to_resume(cfg, what: str) -> None:
    """One line: what was kept (the newest checkpoint) and how to continue; from the main process only."""
    import os

    from pathdino.train.checkpoint import list_checkpoints

    if os.environ.get("RANK", "0") != "0":
        return
    found = list_checkpoints(cfg.train.output_dir) if cfg is not None else []
    kept = (
        (
            f"last checkpoint step {found[-1][0]} ({found[-1][1]}); rerun the same command with --resume to "
            "continue from it"
        )
        if found
        else "no checkpoint was written yet; rerun the same command to start again"
    )
    print(f"pathdino.train: {what}: {kept}", file=sys.stderr, flush=True)


def _already_finished(cfg, resume: bool | str) -> bool:
    """--resume of a run whose checkpoint is at train.total_steps already: say so in one line (every process
    returns 0 without starting; the main process prints), rather than rebuild the run to do nothing."""
    import os

    from pathdino.train.checkpoint import list_checkpoints, read_trainer_state, resume_point

    found = list_checkpoints(cfg.train.output_dir)
    if resume is True and (not found or found[-1][0] < cfg.train.total_steps):
        return False  # the usual resume: decided from the folder names, without reading a checkpoint twice
    checkpoint = resume_point(cfg.train.output_dir, resume)
    if checkpoint is None:
        return False
    step = int(read_trainer_state(checkpoint)["step"])
    if step < cfg.train.total_steps:
        return False
    if os.environ.get("RANK", "0") == "0":
        print(
            f"pathdino.train: nothing to do: the run in {cfg.train.output_dir} already finished (checkpoint "
            f"{checkpoint.name}, step {step} of train.total_steps={cfg.train.total_steps}); raise "
            "train.total_steps to train further, or export it: pathdino export "
            f"{cfg.train.output_dir} --out ENCODER",
            file=sys.stderr,
        )
    return True


if __name__ == "__main__":
    from pathdino.train.distributed import exit_process

    exit_process(main())
