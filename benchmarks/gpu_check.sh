#!/usr/bin/env bash
# Prepared GPU check for pathdino.train (issue 4): DINOv2 training steps of ViT-S/14 and ViT-L/14 in bf16, eager and
# with torch.compile, on one GPU, through the real training loop with synthetic batches made on the GPU (2 x 224 +
# 8 x 98 crops, iBOT masks as DINOv2's). Prints a table: images/s, achieved TFLOP/s, MFU against the card's nominal
# bf16 dense peak (pathdino.train.health.PEAK_TFLOPS: H100 SXM / H200 989 TFLOP/s), peak memory. Issue targets on
# H100: ViT-L/14 >= 45% MFU, ViT-S/14 >= 30%.
#
# Budget: at most ~6 minutes on one H100 (a global deadline skips what would not fit). How to run it:
#   1. here (with network):   bash ../shared/tools/device-wheels.sh      # zarr & co. -> .whl/ (py3.12 wheels)
#   2. device tool:           run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=420)
# Results (the table, per-run JSON and logs) also land in $OUT (the device tool brings them back) or /tmp/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir=${OUT:-/tmp/gpu_check}
mkdir -p "$out_dir"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

source benchmarks/device_env.sh

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'PY' || { echo "gpu_check: environment check failed"; exit 1; }
import torch, timm, accelerate, safetensors, zarr
import pathdino.train.loop  # noqa: F401  (imports the whole training stack)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), timm {timm.__version__}, accelerate "
      f"{accelerate.__version__}, zarr {zarr.__version__}; device {torch.cuda.get_device_name()}")
assert torch.cuda.is_available(), "no CUDA device"
PY

deadline=$((SECONDS + 340))
bench() {  # name, timeout (s), benchmark arguments...
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 40 ]; then
    echo "gpu_check: skipped $name (time budget spent)"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  timeout -k 5 "$limit" python3 benchmarks/train_step.py --json "$out_dir/$name.json" "$@" \
    > "$out_dir/$name.log" 2>&1
  local rc=$?
  grep -E '^\{' "$out_dir/$name.log" | tail -n 2
  [ $rc -ne 0 ] && { echo "gpu_check: $name exited $rc; last lines:"; tail -n 15 "$out_dir/$name.log"; }
  return 0
}

# Eager first (cheap), then compiled; per-GPU batches as DINOv2 (ViT-S 64, ViT-L 32), 10 warm-up + 10 measured steps.
bench vits14_eager 80 --preset vits14 --batch-size 64 --precision bf16 --compile no --steps 10 --warmup 10
bench vitl14_eager 100 --preset vitl14 --batch-size 32 --precision bf16 --compile no --steps 10 --warmup 10
bench vits14_compile 110 --preset vits14 --batch-size 64 --precision bf16 --compile yes --steps 10 --warmup 10
bench vitl14_compile 140 --preset vitl14 --batch-size 32 --precision bf16 --compile yes --steps 10 --warmup 10

python3 - "$out_dir" <<'PY' | tee "$out_dir/table.txt"
import json, sys
from pathlib import Path

rows = []
for name in ("vits14_eager", "vitl14_eager", "vits14_compile", "vitl14_compile"):
    f = Path(sys.argv[1]) / f"{name}.json"
    rows += json.loads(f.read_text()) if f.exists() else [{"preset": name, "ok": False, "error": "not run / no result"}]
device = next((r["device"] for r in rows if r.get("device")), "?")
print(f"\npathdino.train on {device}: DINOv2 step (2x224 + 8x98 crops, synthetic batches), bf16")
print(f"{'model':<8} {'compile':<8} {'batch':>5} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>7} {'peak MiB':>9}  reference")
for r in rows:
    if not r.get("ok"):
        print(f"{r.get('preset', '?'):<8} {str(r.get('compile', '?')):<8} FAILED: {r.get('error', '')[:200]}")
        continue
    mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
    print(f"{r['preset']:<8} {str(r['compile']):<8} {r['batch_size']:>5} {r['images_per_s']:>9.1f} "
          f"{r['tflops_per_s']:>8.1f} {mfu:>7} {r['memory_mb']:>9.0f}  {r['peak_tflops'] or 0:.0f} TFLOP/s "
          f"({r['peak_note']})")
PY
