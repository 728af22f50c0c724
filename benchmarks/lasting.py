"""Does the `small` preset keep what it learns? Probe curves at 100, 200 and 500 steps, several seeds (issue 25).

Each run is ``python -m pathdino.train --config configs/train/small.yaml`` on a tile store of the bundled slide with
the schedules stretched to the run (``train.total_steps`` = N; every schedule already ends at N; the lr warm-up is
``--warmup-fraction`` of N, 20 steps at N = 100 as the preset), logging every step (losses, lr, weight decay,
teacher momentum and temperature, grad norms per module, teacher entropy, centre norms, CLS std and rank) and
probing the teacher every N / 10 steps on the labelled proxy set of ``benchmarks/small_probe_set.py`` (the probe
embeds exactly as ``pathdino eval`` does on the exported teacher). Runs go one after the other, under ``nice`` on
one thread, so that a shared machine is not swamped; a finished run (its ``done.json``) is not run again.

    python benchmarks/lasting.py --out /tmp/lasting                                  # 100/200/500 x seeds 0 1 2
    python benchmarks/lasting.py --out /tmp/lasting --steps 200 --seeds 0 --tag lr01 --set optim.base_lr=0.01
    python benchmarks/lasting.py --out /tmp/lasting --report                         # the tables of what ran

``--report`` prints, per setting and run length, the probe (kNN / linear) at every probe step, mean over seeds, and
how far the last probe is below the best earlier one; and the dynamics (teacher entropy, rank, CLS std, centre norm,
grad norms, KoLeo term, lr/wd/momentum) at a few fractions of the run. Name the CPU with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "train" / "small.yaml"
SLIDE = ROOT / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"
DYNAMICS = ("teacher_entropy", "embedding_rank", "embedding_std", "center_norm_dino", "dino_global", "uniformity",
            "grad_norm_backbone", "grad_norm_dino_head", "lr", "weight_decay", "momentum", "teacher_temp")


def prepare(out: Path) -> tuple[Path, Path]:
    """The training store (221 tiles of 224 px, overlap 112) and the labelled probe set, made once."""
    store, probe = out / "tiles.zarr", out / "probe_cmu1"
    if not (probe / "labels.csv").is_file():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "small_probe_set.py"), "--out", str(probe)],
                       check=True)
    if not store.exists():
        subprocess.run([sys.executable, "-m", "pathdino.cli", "tile", str(SLIDE), "--out", str(store),
                        "--target-mpp", "0.5", "--tile-px", "224", "--overlap-px", "112"], check=True)
    return store, probe


def run_one(out: Path, *, steps: int, seed: int, tag: str, overrides: list[str], warmup_fraction: float,
            store: Path, probe: Path) -> Path:
    run_dir = out / "runs" / f"{tag}_n{steps}_s{seed}"
    if (run_dir / "done.json").is_file():
        return run_dir
    if run_dir.exists():  # an interrupted run: start it again from scratch (metrics of a half run are not kept)
        import shutil

        shutil.rmtree(run_dir)
    every = max(1, steps // 10)
    cmd = ["nice", "-n", "10", sys.executable, "-m", "pathdino.train", "--config", str(PRESET),
           f"data.stores=[{store}]", f"train.output_dir={run_dir}", f"train.total_steps={steps}",
           f"optim.warmup_steps={round(warmup_fraction * steps)}", f"train.seed={seed}", "log.every_steps=1",
           "log.trackers=[]", f"train.checkpoint_every_steps={steps}", "train.keep_checkpoints=1",
           f"eval.probe={{data: {probe / 'labels.csv'}, every_steps: {every}}}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    print(" ".join(cmd), flush=True)
    with open(out / "runs" / f"{tag}_n{steps}_s{seed}.log", "w") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return run_dir


def records(run_dir: Path) -> list[dict]:
    file = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []


def _fmt(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def report(out: Path) -> None:
    runs: dict[tuple[str, int], dict[int, list[dict]]] = {}
    for run_dir in sorted((out / "runs").glob("*_n*_s*")):
        if not run_dir.is_dir() or not (run_dir / "done.json").is_file():
            continue
        tag, n, s = run_dir.name.rsplit("_", 2)
        runs.setdefault((tag, int(n[1:])), {})[int(s[1:])] = records(run_dir)
    for (tag, steps), by_seed in sorted(runs.items()):
        seeds = sorted(by_seed)
        print(f"\n### {tag}, {steps} steps, seeds {' / '.join(map(str, seeds))}\n")
        print("| step | kNN per seed | kNN mean | linear per seed | linear mean |\n|---|---|---|---|---|")
        probes = {s: {r["step"]: r for r in by_seed[s] if "probe_knn_accuracy" in r} for s in seeds}
        for step in sorted(set().union(*(p.keys() for p in probes.values()))):
            knn = [probes[s][step]["probe_knn_accuracy"] for s in seeds if step in probes[s]]
            lin = [probes[s][step].get("probe_linear_accuracy", float("nan")) for s in seeds if step in probes[s]]
            print(f"| {step} | {_fmt(knn)} | {statistics.mean(knn):.3f} | {_fmt(lin)} | {statistics.mean(lin):.3f} |")
        drops = []
        for s in seeds:
            knn = [probes[s][k]["probe_knn_accuracy"] for k in sorted(probes[s])]
            if knn:
                drops.append(max(knn) - knn[-1])
        if drops:
            print(f"\nlast probe below the run's best (kNN), per seed: {_fmt(drops)}")
        print("\n| fraction of run | " + " | ".join(DYNAMICS) + " |\n|---|" + "---|" * len(DYNAMICS))
        for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
            step = max(1, round(frac * steps))
            row = []
            for key in DYNAMICS:
                vals = [r[key] for s in seeds for r in by_seed[s] if r.get("step") == step and key in r]
                row.append(f"{statistics.mean(vals):.3g}" if vals else "")
            print(f"| {frac:g} (step {step}) | " + " | ".join(row) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (store, probe set, runs)")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 200, 500])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tag", default="preset", help="name of this setting in the run folders and tables")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override on top of small.yaml (repeatable)")
    parser.add_argument("--warmup-fraction", type=float, default=0.2)
    parser.add_argument("--report", action="store_true", help="only print the tables of the finished runs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        store, probe = prepare(args.out)
        (args.out / "runs").mkdir(exist_ok=True)
        for seed in args.seeds:  # seeds outermost: a cut-short sweep still has every length for the first seeds
            for steps in args.steps:
                run_one(args.out, steps=steps, seed=seed, tag=args.tag, overrides=args.overrides,
                        warmup_fraction=args.warmup_fraction, store=store, probe=probe)
    report(args.out)


if __name__ == "__main__":
    main()
