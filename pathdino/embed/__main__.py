"""``python -m pathdino.embed STORE --encoder DIR --out OUT [...]``: ``pathdino embed`` with the same arguments,
for launchers that start a module on every process::

    accelerate launch --num_processes 8 -m pathdino.embed STORE --encoder DIR --out OUT
    accelerate launch --num_machines 4 --machine_rank $R ... -m pathdino.embed STORE --encoder DIR --out OUT

Each process reads its share from RANK / WORLD_SIZE (no process group is created: processes never wait for each
other) and uses cuda:LOCAL_RANK when GPUs are present.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import typer

    from pathdino.cli import app

    command = typer.main.get_command(app).get_command(None, "embed")  # the very command `pathdino embed` runs
    command.main(args=sys.argv[1:] if argv is None else argv, prog_name="python -m pathdino.embed")


if __name__ == "__main__":
    main()
