#!/usr/bin/env bash
# Patient-level 5-fold cross-validation of the LGG recipe (results/lgg_recipe/): U-Net++, Attention U-Net and
# their ensemble on all 88 patients of lgg_kaggle_3m, every patient scored once per model, out of fold.
#
#   bash scripts/lgg_crossval.sh /path/to/shared/data [MAX_FOLDS] [RECIPE]
#
# Resumable: run the same command again and it continues where it stopped (a fold's training resumes from its
# last epoch). MAX_FOLDS (optional) stops after that many folds, e.g. one per session. The work goes into
# results/lgg_recipe_work (git-ignored); the numbers-only summary is copied to results/lgg_recipe/crossval/.
# RECIPE (optional, default recipe) names a file results/lgg_recipe/RECIPE.yml; another recipe than the default
# is cross-validated into its own folders, crossval-RECIPE (e.g. recipe-lgg, results/lgg_recipe/recipe-lgg.yml).
set -euo pipefail
DATA="$(cd "${1:?usage: lgg_crossval.sh SHARED_DATA_DIR [MAX_FOLDS] [RECIPE]}" && pwd)"
RECIPE_NAME="${3:-recipe}"
source "$(dirname "${BASH_SOURCE[0]}")/ensure_venv.sh" ""
cd "$ROOT"
WORK=results/lgg_recipe_work
RECIPE=results/lgg_recipe/$RECIPE_NAME.yml   # recipe.yml: the recipe chosen by the ablations (scripts/lgg_ablation.py)
[[ -f "$RECIPE" ]] || { echo "no recipe $RECIPE" >&2; exit 2; }
if [[ "$RECIPE_NAME" == recipe ]]; then CV=crossval; NAME=lgg-recipe; else CV="crossval-$RECIPE_NAME"; NAME="lgg-$RECIPE_NAME"; fi
OUT="results/lgg_recipe/$CV"

metaseg crossval --config "$RECIPE" --data "$DATA/lgg_kaggle_3m" -p cache_dir "$WORK/cache" \
  --runs-root "$WORK/runs" --out "$WORK/$CV" --name "$NAME" --folds 5 \
  ${2:+--max-folds "$2"}

mkdir -p "$OUT"
for name in summary.md summary.csv per_fold.csv per_patient.csv wilcoxon.csv; do
  cp "$WORK/$CV/$name" "$OUT/$name"
done
echo "numbers-only summary in $OUT"
