"""Command line: ``python -m pathdino.slide.train`` or ``accelerate launch [...] -m pathdino.slide.train``.

    python -m pathdino.slide.train --config configs/slide/small.yaml data.embeddings=[runs/emb]
    python -m pathdino.slide.train --config ... --resume                 # newest checkpoint in train.output_dir
    python -m pathdino.slide.train --config ... --resume runs/slide/checkpoints/step_000001000
    python -m pathdino.slide.train --config ... --check                  # validate config and stores, then exit

Exit codes as ``python -m pathdino.train``: 0 done (or stopped with a checkpoint), 2 an error the user can fix
(a ``PathdinoError``), 3 too many non-finite steps in a row, 1 anything else (a bug: its traceback is printed).
"""

from __future__ import annotations

import argparse
import sys
import traceback


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pathdino.slide.train",
        description="Masked-autoencoder pretraining of a slide encoder on `pathdino embed` outputs (launch with "
        "accelerate for several processes).",
    )
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/slide/small.yaml")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="resume from the newest checkpoint in train.output_dir (or from CHECKPOINT)",
    )
    p.add_argument("--check", action="store_true", help="validate the config and embeddings stores, then exit")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides with dotted keys, e.g. optim.lr=3e-4 data.embeddings=[runs/emb]",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse, train, and return the exit code (the caller decides how to exit)."""
    args = _parser().parse_intermixed_args(argv)
    from pathdino.slide.train_config import load_pretrain_config
    from pathdino.train.health import NonFiniteError
    from tiling.errors import PathdinoError

    try:
        cfg = load_pretrain_config(args.config, args.overrides)
        if args.check:
            from pathdino.slide.data import SlideSource
            from pathdino.slide.loop import resolve_config

            d = cfg.data
            source = SlideSource(d.embeddings, feature=d.feature, min_tiles=d.min_tiles_per_slide)
            resolve_config(cfg, source, world=1)
            print(
                f"{args.config}: config and embeddings stores are valid ({len(source.slides)} slides, tile "
                f"embeddings of width {source.dim})"
            )
            return 0
        from pathdino.slide.loop import train

        train(cfg, resume=True if args.resume == "latest" else args.resume)
        return 0
    except NonFiniteError as exc:
        print(f"pathdino.slide.train: {exc}", file=sys.stderr)
        return 3
    except PathdinoError as exc:
        print(f"pathdino.slide.train: error: {exc}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - report, then exit non-zero so the launcher stops the other processes
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    from pathdino.train.distributed import exit_process

    exit_process(main())
