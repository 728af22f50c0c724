"""The `accelerate launch` command line the multi-process tests run: CPU processes on this machine, no mixed
precision, no dynamo, a free rendezvous port each time (tests in parallel must not share one)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on now, for the launch's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(n_procs: int, *target: str, config_file: Path | None = None) -> list[str]:
    """``python -m accelerate.commands.launch ... TARGET`` for ``n_procs`` CPU processes; ``target`` is what
    follows the launcher's flags (``-m module args...`` or ``script.py args...``); ``config_file`` an accelerate
    config (FSDP2 and the like) in place of plain DDP."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
    elif n_procs > 1:
        cmd += ["--multi_gpu"]
    cmd += ["--num_processes", str(n_procs), "--num_machines", "1", "--mixed_precision", "no"]
    return [*cmd, "--dynamo_backend", "no", "--main_process_port", str(free_port()), *target]
