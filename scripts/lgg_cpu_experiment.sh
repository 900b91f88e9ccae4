#!/usr/bin/env bash
# The CPU-sized experiment on the real LGG MRI (kaggle_3m layout) whose numbers are in results/lgg_cpu/:
# U-Net++ and Attention U-Net trained on the same patient-level split, Attention U-Net once more without
# CLAHE (the ablation), every run evaluated on the test split and on the metastasis T2W sample, then compared.
#
#   bash scripts/lgg_cpu_experiment.sh /path/to/shared/data [WORK_DIR]
#
# WORK_DIR (default: results/lgg_cpu_work, git-ignored) receives the run folders, the preprocessed cache and
# the comparison folders; scripts/lgg_cpu_report.py then copies the numbers-only files into results/lgg_cpu/.
set -euo pipefail
DATA="${1:?usage: lgg_cpu_experiment.sh SHARED_DATA_DIR [WORK_DIR]}"
source "$(dirname "${BASH_SOURCE[0]}")/ensure_venv.sh" ""
cd "$ROOT"
WORK="${2:-results/lgg_cpu_work}"
EPOCHS="${LGG_EPOCHS:-15}"
mkdir -p "$WORK"

common=(--data "$DATA/lgg_kaggle_3m" --epochs "$EPOCHS" --image-size 128 --filters 8 16 32 64 128
        --batch-size 16 --loss bce_dice --lr 1e-3 --seed 0 -p cache_dir "$WORK/cache"
        --runs-root "$WORK/runs")

metaseg train --model nested_unet --name lgg-nested_unet "${common[@]}"
metaseg train --model attention_unet --name lgg-attention_unet "${common[@]}"
metaseg train --model attention_unet --name lgg-attention_unet-no_clahe --no-clahe "${common[@]}"

runs=()
for name in lgg-nested_unet lgg-attention_unet lgg-attention_unet-no_clahe; do
  run="$(ls -d "$WORK"/runs/*-"$name" | sort | tail -n 1)"
  runs+=("$run")
  metaseg evaluate "$run" --split test
  metaseg evaluate "$run" --data "$DATA/mets_t2w_sample"
done

metaseg compare "${runs[0]}" "${runs[1]}" --labels nested_unet attention_unet --out "$WORK/models"
metaseg compare "${runs[1]}" "${runs[2]}" --labels clahe no_clahe --out "$WORK/clahe_ablation"
