"""The trainer recipes under 2-process DDP and FSDP2 (gloo on CPU): one run with all three at once (a backbone
continued with a freeze and lr ramp, Gram anchoring with a refresh, distillation from a checkpoint teacher) equals
the 1-process run of the same global batch, as tests/test_train_distributed.py shows for the plain objective.

Under FSDP2 the distillation teacher is sharded and the Gram teacher is refreshed from the sharded EMA teacher
(gathered); under DDP both are replicated.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pathdino.train.config import load_config
from pathdino.train.loop import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train_distributed import (  # noqa: E402
    EXACT,
    SMOKE,
    assert_close_losses,
    assert_close_weights,
    ckpt,
    launch,
    records,
)
from test_train_recipes import smoke_backbone  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def restore_logging():
    import logging

    logger = logging.getLogger("pathdino")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    logger.handlers[:] = handlers
    logger.propagate, logger.level = propagate, level


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> tuple[list[str], Path]:
    """The overrides of the combined recipe, and its 1-process reference run (checkpoints at steps 2 and 4)."""
    base = tmp_path_factory.mktemp("recipe")
    teacher = base / "teacher"
    train(
        load_config(
            SMOKE,
            [
                f"train.output_dir={teacher}",
                *EXACT,
                "train.total_steps=1",
                "model.backbone.embed_dim=96",
                "model.backbone.num_heads=4",
            ],
        )
    )
    overrides = [
        f"model.init_checkpoint={smoke_backbone(base)}",
        "train.freeze_backbone_steps=2",
        "train.backbone_lr_ramp_steps=1",
        "loss.gram.weight=1.0",
        "loss.gram.start_step=1",
        "loss.gram.refresh_every_steps=2",
        f"train.distill.teacher={teacher}",
    ]
    ref = base / "ref"
    train(load_config(SMOKE, [f"train.output_dir={ref}", *EXACT, *overrides]))
    return overrides, ref


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_recipes_two_processes_match_one(recipe, tmp_path, fsdp):
    overrides, ref = recipe
    out = tmp_path / "run"
    proc = launch(out, tmp_path / "dump", *overrides, fsdp=fsdp)
    assert ("FSDP2" if fsdp else "DDP") in proc.stderr
    a, b = records(ref), records(out)
    assert_close_losses(a, b, [1, 2, 3, 4])
    assert b[1]["gram"] == 0.0 and b[2]["gram"] > 0 and b[1]["backbone_lr_mult"] == 0.0
    assert_close_weights(ckpt(ref, 4), ckpt(out, 4))
