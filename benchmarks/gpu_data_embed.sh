#!/usr/bin/env bash
# Prepared GPU check for the data loader (issue 3) and slide embedding (issue 5), companion of gpu_check.sh:
#   - benchmarks/loader.py: the GPU path's samples/s (2 x 224 + 8 x 98 crops; target >= 3,000/s on one H100);
#   - benchmarks/embed.py: end-to-end vs forward-only tiles/s with a ViT-L/14-sized encoder in bf16 (target >= 0.9x).
# Budget: ~4 minutes on one H100. How to run it:
#   1. here (with network):   bash ../shared/tools/device-wheels.sh
#   2. device tool:           run(command="bash benchmarks/gpu_data_embed.sh", carry=[".whl"], timeout_s=300)
# Logs land in $OUT (the device tool brings them back) or /tmp/gpu_data_embed; record the figures, with the card
# named, in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir=${OUT:-/tmp/gpu_data_embed}
mkdir -p "$out_dir"
export PYTHONUNBUFFERED=1
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
workers=$(( $(nproc) > 12 ? 12 : $(nproc) ))

echo "== loader (CPU path vs reference, then the GPU path)"
timeout -k 5 150 python3 benchmarks/loader.py --samples 128 --workers "$workers" --json "$out_dir/loader.json" \
  2>&1 | tee "$out_dir/loader.log" | tail -n 12
echo "== embed (ViT-L/14 sizes, bf16)"
timeout -k 5 120 python3 benchmarks/embed.py --arch vit_large --tiles 8192 --batch-size 256 --workers "$workers" \
  --precision bf16 2>&1 | tee "$out_dir/embed.log" | tail -n 8
