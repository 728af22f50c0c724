"""``pathdino train``: one process runs ``python -m pathdino.train`` in this process; more print the launch line.

Several processes need a launcher that starts them (``accelerate launch``, torchrun, SLURM); the CLI does not try to
be one. It prints the exact ``accelerate launch ... -m pathdino.train ...`` command instead, with the same config,
overrides and ``--resume`` given here, so the two entry points cannot drift apart.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from tiling.configio import ConfigError, load_yaml

# accelerate's own precision and compile flags are unused (train.precision / train.compile decide); see
# docs/training.md. These make a CPU-only machine start real processes (gloo), and are harmless on GPUs.
_MULTI_PROCESS_FLAGS = ("--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")


@dataclass(frozen=True)
class TrainLaunch:
    """What ``pathdino train`` was asked to do, as ``python -m pathdino.train`` arguments plus the launch shape."""

    train_argv: tuple[str, ...]
    """Arguments for ``python -m pathdino.train`` (config, overrides, --resume, --check)."""
    num_processes: int
    """Processes in total; 1 runs in this process."""
    accelerate_config: Path | None
    """An accelerate config file (configs/accelerate/*.yaml); given, the launch line is always printed."""
    module: str = "pathdino.train"
    """The trainer's entry module: ``pathdino.train`` (tiles, DINOv2) or ``pathdino.slide.train`` (slide encoder)."""

    @property
    def in_process(self) -> bool:
        return self.num_processes == 1 and self.accelerate_config is None

    def accelerate_command(self) -> list[str]:
        """The ``accelerate launch`` command line (as a list) that runs this training."""
        cmd = ["accelerate", "launch"]
        if self.accelerate_config is not None:
            cmd += ["--config_file", str(self.accelerate_config)]
        elif self.num_processes > 1:
            cmd += list(_MULTI_PROCESS_FLAGS)
        cmd += ["--num_processes", str(self.num_processes), "-m", self.module, *self.train_argv]
        return cmd


def plan_launch(
    *,
    config: Path,
    overrides: list[str],
    resume: bool,
    resume_from: str | None,
    check: bool,
    num_processes: int | None,
    accelerate_config: Path | None,
    module: str = "pathdino.train",
) -> TrainLaunch:
    """Turn the command's flags into a :class:`TrainLaunch`; ConfigError names the flag at fault."""
    if resume and resume_from:
        raise ConfigError("give either --resume (newest checkpoint in train.output_dir) or --resume-from CHECKPOINT")
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num-processes {num_processes}: must be >= 1")
    argv = ["--config", str(config), *overrides]
    if resume:
        argv.append("--resume")
    elif resume_from:
        argv += ["--resume", resume_from]
    if check:
        argv.append("--check")
    n = num_processes
    if n is None and accelerate_config is not None:
        n = _accelerate_processes(accelerate_config)
    return TrainLaunch(train_argv=tuple(argv), num_processes=n or 1, accelerate_config=accelerate_config, module=module)


def _accelerate_processes(path: Path) -> int:
    data = load_yaml(path)
    n = data.get("num_processes", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{path}: num_processes={n!r} is not a positive integer")
    return n


def train_command(launch: TrainLaunch) -> int:
    """Run in this process (returns pathdino.train's exit code) or print the launch line (returns 0)."""
    if launch.in_process:
        if launch.module == "pathdino.slide.train":
            from pathdino.slide.train import main
        else:
            from pathdino.train.__main__ import main

        return main(list(launch.train_argv))
    line = shlex.join(launch.accelerate_command())
    note = (
        f"{launch.num_processes} processes"
        if launch.accelerate_config is None
        else f"the accelerate config {launch.accelerate_config}"
    )
    print(
        f"# {note}: start the processes with accelerate (on several machines: on each, adding --machine_rank, "
        "--main_process_ip and --main_process_port; see docs/training.md):",
        file=sys.stderr,
    )
    print(line)
    return 0
