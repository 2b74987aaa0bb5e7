#!/usr/bin/env bash
# On one GPU host: the design ablation, then the shipped model's training with the winning single-network variant.
#   training/run_gpu.sh SPECTRA_PACK OUT_DIR
# SPECTRA_PACK comes from `spectranet pack --config training/configs/gpu.yaml --out FILE` on a machine with
# ../shared/data. Each stage writes its log to OUT_DIR; a failed ablation falls back to gpu.yaml as written.
# EXTRA_SET="key=value ..." is added to both stages' --set (e.g. a few steps for a smoke run).
set -uo pipefail
pack=$1
out=$2
mkdir -p "$out"
cd "$(dirname "$0")/.."

python3 -m spectranet.training.ablation --config training/configs/ablation.yaml --set "spectra_pack=$pack" ${EXTRA_SET:-} \
    --write-overrides "$out/winner.txt" 2>&1 | tee "$out/ablation.log"
cp runs/ablation/ablation.json "$out/" 2>/dev/null
overrides=$(cat "$out/winner.txt" 2>/dev/null)
echo "training with: ${overrides:-gpu.yaml as written}"
# shellcheck disable=SC2086  # one key=value per word
python3 -m spectranet.training.train --config training/configs/gpu.yaml --set "spectra_pack=$pack" $overrides ${EXTRA_SET:-} 2>&1 \
    | tee "$out/train.log"
cp runs/gpu/spectranet-sedm-0.3.0.safetensors runs/gpu/spectranet-sedm-0.3.0.json "$out/"
