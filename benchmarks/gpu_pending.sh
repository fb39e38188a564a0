#!/usr/bin/env bash
# The GPU measurements that main still owes (docs/BENCHMARKS.md marks them), in one run, so
# that a session lent a GPU spends its device time measuring rather than assembling commands.
#   bash benchmarks/gpu_pending.sh            (on the GPU machine, from the repository root)
# Results land in $OUT (default: benchmarks/results/gpu-pending); copy the figures into the docs.
set -euo pipefail
R=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$R/benchmarks/results/gpu-pending}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation "$R" >/dev/null
cd /tmp  # run by absolute path: the repository's mmtok/ would shadow the installed package
B="$R/benchmarks"
GPU90=(--device cuda --preset 90m --seq-len 4096 --batch 4 --vocab 65536)

# 1. Mixture-of-Depths after the packed-row rewrite (session 1 measured 6.00x dense with the old design)
python3 "$B/bench_mod_step.py" "${GPU90[@]}" --out "$OUT/mod-step-90m" | tail -6
python3 "$B/profile_step.py" "${GPU90[@]}" --model "mod-moma 4t4i" --rows 25 > "$OUT/profile-mod-moma-90m.txt"
# 2. tokenize-images fed uint8 and with reduced-scale JPEG decoding (session 1: 36 % of the bare encoder at 256 px)
python3 "$B/bench_tokenize_images.py" --device cuda --resolutions 256 512 --images 512 --batch-size 64 --workers 8 \
    --out "$OUT/tokenize-images.json" | tail -4
python3 "$B/bench_tokenize_images.py" --device cuda --resolutions 256 512 --images 512 --batch-size 64 --workers 8 \
    --source-px 1024 --out "$OUT/tokenize-images-src1024.json" | tail -4
# 3. Uni-MoE on the shared loop: step time against dense at the same width, on the GPU
python3 "$B/bench_unimoe_step.py" --device cuda --d-model 1024 --layers 8 --seq-len 1024 --batch 8 \
    --out "$OUT/unimoe-step" | tail -4
echo "results in $OUT"
