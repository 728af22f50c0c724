"""Evidence for the trainer recipes (docs/training.md, "Recipes"): probe accuracy curves, printed as tables.

1. Base: the `small` preset (4 x 192 ViT, 112 px crops) on the bundled slide's tiles, shortened to ``--base-steps``
   at ``--batch`` images per step (the preset: 100 steps of 32) -> a backbone pathdino pretrained itself.
2. Continued pretraining: that backbone (its EMA teacher's, written as a timm-layout file) with fresh heads, for
   ``--warm-steps`` steps with the head warm-up (backbone frozen for ``--freeze`` steps, then ramped over
   ``--ramp``) and without it; the in-training probe (kNN and linear, eval.probe) every ``--probe-every`` steps.
3. Distillation: a 2 x 96 student distilled from the base checkpoint (its DINO/iBOT heads give the targets), one
   distilled from the base's exported encoder folder (``pathdino export``: cosine on the CLS and patch tokens) and
   the same student from scratch, ``--distill-steps`` steps each, same probe.

    python benchmarks/tiling.py ...   # not needed: the store and probe set are made here when missing
    nice -n 10 python benchmarks/recipes.py --work /tmp/recipes_bench

Runs go through ``python -m pathdino.train`` (the real entry point); the figures are read from metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "train" / "small.yaml"


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.perf_counter() - t0


def train_cmd(out: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pathdino.train",
        "--config",
        str(SMALL),
        f"train.output_dir={out}",
        "log.trackers=[]",
        *overrides,
    ]


def train(out: Path, *overrides: str) -> float:
    if (out / "done.json").is_file():
        return 0.0
    return run(train_cmd(out, *overrides), out.parent / f"{out.name}.log")


def train_together(runs: dict[Path, list[str]]) -> dict[str, float]:
    """Start the runs at once (they are independent) and wait for all; wall seconds of each."""
    t0, procs = time.perf_counter(), {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread each: four runs on a small machine
    for out, overrides in runs.items():
        if not (out / "done.json").is_file():
            log = open(out.parent / f"{out.name}.log", "w")
            procs[out] = (
                subprocess.Popen(train_cmd(out, *overrides), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env),
                log,
            )
    times = {}
    for out, (proc, log) in procs.items():
        if proc.wait() != 0:
            raise RuntimeError(f"{out.name} failed: see {log.name}")
        times[out.name] = time.perf_counter() - t0
        log.close()
    return times


def probes(out: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        r["step"]: (r["probe_knn_accuracy"], r.get("probe_linear_accuracy", float("nan")))
        for r in rows
        if "probe_knn_accuracy" in r
    }


def table(title: str, runs: dict[str, Path]) -> str:
    curves = {name: probes(out) for name, out in runs.items()}
    steps = sorted(set().union(*curves.values()))
    head = "| step | " + " | ".join(f"{n} kNN | {n} linear" for n in curves) + " |"
    lines = [f"**{title}**", "", head, "|" + "---|" * (1 + 2 * len(curves))]
    for s in steps:
        cells = [f"{curves[n][s][0]:.3f} | {curves[n][s][1]:.3f}" if s in curves[n] else "- | -" for n in curves]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _lasting():
    """benchmarks/lasting.py, loaded by its path (benchmarks/ on sys.path lets its tiling.py shadow the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lasting", Path(__file__).resolve().parent / "lasting.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def backbone_file(checkpoint: Path, out: Path) -> Path:
    """The EMA teacher's backbone of a pathdino checkpoint as a timm-layout safetensors file (init_checkpoint)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(checkpoint / "teacher.safetensors")
    prefix = "backbone.backbone."
    save_file({k[len(prefix) :]: v.contiguous() for k, v in sd.items() if k.startswith(prefix)}, str(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--base-steps", type=int, default=12)
    p.add_argument("--warm-steps", type=int, default=6)
    p.add_argument("--freeze", type=int, default=3)
    p.add_argument("--ramp", type=int, default=2)
    p.add_argument("--distill-steps", type=int, default=6)
    p.add_argument("--probe-every", type=int, default=2)
    p.add_argument("--probe-images", type=int, default=160, help="eval.probe.max_images")
    p.add_argument(
        "--base-checkpoint",
        type=Path,
        help="a finished pathdino checkpoint of the small preset (e.g. benchmarks/lasting.py's) to use as the base "
        "instead of training one for --base-steps",
    )
    a = p.parse_args()
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    store, probe_set = _lasting().prepare(work)  # the same store and probe set as benchmarks/lasting.py
    # Warm-ups here are step counts (a few steps of short runs), not small.yaml's share of the run.
    common = [f"data.stores=[{store}]", f"train.batch_size={a.batch}", "optim.warmup_fraction=null"]
    probe = (
        f"eval.probe={{data: {probe_set / 'labels.csv'}, every_steps: {a.probe_every}, max_images: {a.probe_images}}}"
    )
    timings = {}

    if a.base_checkpoint is None:
        base = work / "base"
        timings["base"] = train(
            base,
            *common,
            f"train.total_steps={a.base_steps}",
            f"train.checkpoint_every_steps={a.base_steps}",
            f"optim.warmup_steps={min(20, a.base_steps // 3)}",
        )
        base_ckpt = base / "checkpoints" / f"step_{a.base_steps:09d}"
        base_name = f"{a.base_steps}-step small backbone"
    else:
        base_ckpt = a.base_checkpoint
        base_name = f"small backbone {base_ckpt}"
    init = backbone_file(base_ckpt, work / "base_backbone.safetensors")

    # Fresh heads on the pretrained backbone; a short lr warm-up (2 steps) so that the run without the freeze
    # meets random heads at full lr, as users who continue without a warm-up do.
    cont = [
        *common,
        f"model.init_checkpoint={init}",
        f"train.total_steps={a.warm_steps}",
        f"train.checkpoint_every_steps={a.warm_steps}",
        "optim.warmup_steps=2",
        "train.seed=1",
        probe,
    ]
    warm, cold = work / "continue_warmup", work / "continue_no_warmup"

    student = [
        *common,
        "model.backbone.embed_dim=96",
        "model.backbone.depth=2",
        "model.backbone.num_heads=3",
        f"train.total_steps={a.distill_steps}",
        f"train.checkpoint_every_steps={a.distill_steps}",
        "optim.warmup_steps=2",
        probe,
    ]
    distilled, scratch = work / "student_distilled", work / "student_scratch"
    features, encoder = work / "student_feature_distilled", work / "base_encoder"
    if not (encoder / "model.safetensors").is_file():
        run(["pathdino", "export", str(base_ckpt), "--out", str(encoder)], work / "export.log")
    # The runs are independent: run together (on a shared 2-core machine they finish sooner that way).
    timings.update(
        train_together(
            {
                warm: [*cont, f"train.freeze_backbone_steps={a.freeze}", f"train.backbone_lr_ramp_steps={a.ramp}"],
                cold: cont,
                distilled: [*student, f"train.distill.teacher={base_ckpt}"],
                features: [*student, f"train.distill.teacher={encoder}"],
                scratch: student,
            }
        )
    )

    print(
        table(
            f"Continued pretraining from the {base_name} (fresh heads; warm-up: "
            f"frozen {a.freeze} steps, ramp {a.ramp})",
            {"warm-up": warm, "no warm-up": cold},
        )
    )
    print()
    print(
        table(
            f"2 x 96 student, {a.distill_steps} steps: distilled from the 4 x 192 base (its heads' targets; its "
            "exported features) vs from scratch",
            {"distilled (heads)": distilled, "distilled (features)": features, "scratch": scratch},
        )
    )
    print()
    print("wall time (s, the last four run at once):", {k: round(v) for k, v in timings.items()})


if __name__ == "__main__":
    main()
