"""Does the `small` preset keep what it learns? Probe curves at 100, 200 and 500 steps, several seeds (issue 25).

Each run is ``python -m pathdino.train --config configs/train/small.yaml`` on a tile store of the bundled slide with
the schedules stretched to the run (``train.total_steps`` = N; every schedule already ends at N; the lr warm-up is
``--warmup-fraction`` of N, 0.2 as the preset's ``optim.warmup_fraction``), logging every step (losses, lr, weight
decay, teacher momentum and temperature, grad norms per module, teacher entropy, centre norms, CLS std and rank) and
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
DYNAMICS = (
    "teacher_entropy",
    "embedding_rank",
    "embedding_std",
    "center_norm_dino",
    "dino_global",
    "uniformity",
    "grad_norm_backbone",
    "grad_norm_dino_head",
    "lr",
    "weight_decay",
    "momentum",
    "teacher_temp",
)


def prepare(out: Path) -> tuple[Path, Path]:
    """The training store (221 tiles of 224 px, overlap 112) and the labelled probe set, made once."""
    store, probe = out / "tiles.zarr", out / "probe_cmu1"
    if not (probe / "labels.csv").is_file():
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "small_probe_set.py"), "--out", str(probe)], check=True
        )
    if not store.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pathdino.cli",
                "tile",
                str(SLIDE),
                "--out",
                str(store),
                "--target-mpp",
                "0.5",
                "--tile-px",
                "224",
                "--overlap-px",
                "112",
            ],
            check=True,
        )
    return store, probe


def run_one(
    out: Path,
    *,
    steps: int,
    seed: int,
    tag: str,
    overrides: list[str],
    warmup_fraction: float,
    store: Path,
    probe: Path,
) -> Path:
    run_dir = out / "runs" / f"{tag}_n{steps}_s{seed}"
    if (run_dir / "done.json").is_file():
        return run_dir
    if run_dir.exists():  # an interrupted run: start it again from scratch (metrics of a half run are not kept)
        import shutil

        shutil.rmtree(run_dir)
    every = max(1, steps // 10)
    cmd = [
        "nice",
        "-n",
        "10",
        sys.executable,
        "-m",
        "pathdino.train",
        "--config",
        str(PRESET),
        f"data.stores=[{store}]",
        f"train.output_dir={run_dir}",
        f"train.total_steps={steps}",
        f"optim.warmup_fraction={warmup_fraction}",
        f"train.seed={seed}",
        "log.every_steps=1",
        "log.trackers=[]",
        f"train.checkpoint_every_steps={steps}",
        "train.keep_checkpoints=1",
        f"eval.probe={{data: {probe / 'labels.csv'}, every_steps: {every}}}",
        *overrides,
    ]
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
    print_tables(collect_runs(out), DYNAMICS)


def collect_runs(out: Path) -> dict[tuple[str, int], dict[int, list[dict]]]:
    """The finished runs under ``out/runs`` (``<tag>_n<steps>_s<seed>`` folders with a done.json): their metrics
    records by (tag, steps) and seed."""
    runs: dict[tuple[str, int], dict[int, list[dict]]] = {}
    for run_dir in sorted((out / "runs").glob("*_n*_s*")):
        if not run_dir.is_dir() or not (run_dir / "done.json").is_file():
            continue
        tag, n, s = run_dir.name.rsplit("_", 2)
        runs.setdefault((tag, int(n[1:])), {})[int(s[1:])] = records(run_dir)
    return runs


def print_tables(
    runs: dict[tuple[str, int], dict[int, list[dict]]],
    dynamics: tuple[str, ...],
    extra_line: dict[tuple[str, int], str] | None = None,
) -> None:
    """Per setting and run length: the probes per seed and their mean, how far the last probe is below the run's
    best, an optional extra line, and the ``dynamics`` keys (mean over seeds) at fractions of the run. Shared with
    ``benchmarks/lasting_lightly.py`` so that both trainers' tables have one layout."""
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
        if extra_line and (tag, steps) in extra_line:
            print(extra_line[(tag, steps)])
        print("\n| fraction of run | " + " | ".join(dynamics) + " |\n|---|" + "---|" * len(dynamics))
        for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
            step = max(1, round(frac * steps))
            row = []
            for key in dynamics:
                vals = [r[key] for s in seeds for r in by_seed[s] if r.get("step") == step and r.get(key) is not None]
                row.append(f"{statistics.mean(vals):.3g}" if vals else "")
            print(f"| {frac:g} (step {step}) | " + " | ".join(row) + " |")


def grad_shares(run_dir: Path, *, checkpoint: str | None, n_batches: int = 3) -> dict[str, float]:
    """Norms of the backbone gradient of each weighted loss term (DINO global + local, iBOT, KoLeo/KDE) and the
    cosine between the KoLeo and DINO gradients, on ``n_batches`` of the run's own data, for the run's checkpoint
    ``checkpoint`` (a step_* folder; None: the initial weights of its seed). What the summed gradient is made of
    where the probe falls: a term that dominates late is what moves the features then."""
    import contextlib
    import math
    import tempfile

    import torch

    from pathdino.train.config import load_config
    from pathdino.train.context import open_context
    from pathdino.train.run import start_phase

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as cleanup:
        cfg = load_config(run_dir / "config.yaml", [f"train.output_dir={tmp}", "log.trackers=[]", "eval.probe=null"])
        ctx = open_context(cfg.train, [], cleanup)
        phase, progress = start_phase(ctx, cfg, resume=checkpoint, loader=None)
        parts, obj = phase.parts, phase.parts.objective
        values = phase.schedules.at(min(progress.step, cfg.train.total_steps - 1))
        params = [q for q in parts.student.backbone.parameters() if q.requires_grad]
        data, sums = iter(phase.loader), {}
        parts.model.train()
        for _ in range(n_batches):
            batch = next(data).to(ctx.device)
            mask_idx = batch.masks.flatten().nonzero().squeeze(1)
            weights = (1.0 / batch.masks.sum(dim=1).clamp_min(1).float()).index_select(
                0, torch.div(mask_idx, batch.masks.shape[1], rounding_mode="floor")
            )
            with torch.no_grad():
                t_out = parts.teacher(batch.global_crops, None, batch.masks, teacher=True, mask_indices=mask_idx)
                dino_t = parts.losses["dino"].teacher_targets(
                    t_out["global_cls_logits"], values.teacher_temp, update_center=False
                )
                ibot_t = parts.losses["ibot"].teacher_targets(
                    t_out["masked_patch_logits"], values.teacher_temp, update_center=False
                )
            s_out = parts.model(batch.global_crops, batch.local_crops, batch.masks, mask_indices=mask_idx)
            g, loc = parts.losses["dino"].forward_terms(
                s_out["global_cls_logits"], s_out["local_cls_logits"], dino_t, batch.n_global
            )
            ibot = parts.losses["ibot"](
                s_out["masked_patch_logits"], ibot_t, batch.masks, batch.n_global, token_weights=weights
            )
            terms = {"dino": obj.dino_weight * (g + loc), "ibot": obj.ibot_weight * ibot}
            if parts.uniformity is not None:
                terms["koleo"] = obj.uniformity_weight * parts.uniformity(s_out["global_cls"], n_chunks=batch.n_global)
            flat = {}
            for name, term in terms.items():
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                flat[name] = torch.cat(
                    [(gr if gr is not None else torch.zeros_like(q)).flatten() for gr, q in zip(grads, params)]
                )
                sums[f"grad_{name}"] = sums.get(f"grad_{name}", 0.0) + float(flat[name].norm()) / n_batches
            total = sum(flat.values())
            sums["grad_total"] = sums.get("grad_total", 0.0) + float(total.norm()) / n_batches
            if "koleo" in flat:
                cos = float(torch.nn.functional.cosine_similarity(flat["koleo"], flat["dino"], dim=0))
                sums["cos_koleo_dino"] = sums.get("cos_koleo_dino", 0.0) + cos / n_batches
        sums["koleo_share"] = sums.get("grad_koleo", math.nan) / sum(
            sums[k] for k in sums if k.startswith("grad_") and k != "grad_total"
        )
        sums["step"] = progress.step
        return sums


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (store, probe set, runs)")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 200, 500])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tag", default="preset", help="name of this setting in the run folders and tables")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override on top of small.yaml (repeatable)",
    )
    parser.add_argument("--warmup-fraction", type=float, default=0.2)
    parser.add_argument("--report", action="store_true", help="only print the tables of the finished runs")
    parser.add_argument(
        "--grad-shares",
        type=Path,
        metavar="RUN_DIR",
        help="only print each loss term's backbone gradient norm at the run's initial weights and "
        "its last checkpoint (needs the run's config.yaml and checkpoints)",
    )
    args = parser.parse_args(argv)
    if args.grad_shares is not None:
        sys.path.insert(0, str(ROOT))  # ahead of benchmarks/, whose tiling.py would shadow the tiling package
        from pathdino.train.checkpoint import latest_checkpoint

        last = latest_checkpoint(args.grad_shares)
        for label, ckpt in (("init", None), ("last", str(last) if last else None)):
            if label == "last" and ckpt is None:
                break
            shares = grad_shares(args.grad_shares, checkpoint=ckpt)
            print(label, json.dumps({k: round(v, 4) for k, v in shares.items()}), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        store, probe = prepare(args.out)
        (args.out / "runs").mkdir(exist_ok=True)
        for seed in args.seeds:  # seeds outermost: a cut-short sweep still has every length for the first seeds
            for steps in args.steps:
                run_one(
                    args.out,
                    steps=steps,
                    seed=seed,
                    tag=args.tag,
                    overrides=args.overrides,
                    warmup_fraction=args.warmup_fraction,
                    store=store,
                    probe=probe,
                )
    report(args.out)


if __name__ == "__main__":
    main()
