"""Copy the numbers-only results of scripts/lgg_cpu_experiment.sh into results/lgg_cpu/ and print them.

    python scripts/lgg_cpu_report.py [WORK_DIR] [OUT_DIR]

Only tables (CSV, JSON, markdown) are copied: no figure made from the real MRI leaves the work folder,
whose data licence (CC BY-NC-SA 4.0, TCIA) applies to anything derived from it.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from metaseg_tf.runs.records import newest_evaluation

RUN_LABELS = {"lgg-nested_unet": "nested_unet", "lgg-attention_unet": "attention_unet",
              "lgg-attention_unet-no_clahe": "attention_unet-no_clahe"}


def _newest(pattern: str, root: Path) -> Path:
    found = sorted(root.glob(pattern))
    if not found:
        raise SystemExit(f"nothing matches {root}/{pattern}: run scripts/lgg_cpu_experiment.sh first")
    return found[-1]


def _copy_comparison(folder: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("comparison.csv", "wilcoxon.csv", "conclusion.md"):
        shutil.copy2(folder / name, out_dir / name)
    markdown = re.sub(r"!\[[^\]]*\]\([^)]*\)\n?", "", (folder / "comparison.md").read_text())
    (out_dir / "comparison.md").write_text(markdown)


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "results/lgg_cpu_work")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "results/lgg_cpu")
    _copy_comparison(_newest("models/comparison-test*", work), out)
    _copy_comparison(_newest("clahe_ablation/comparison-test*", work), out / "clahe_ablation")
    for suffix, label in RUN_LABELS.items():
        run = _newest(f"runs/*-{suffix}", work)
        target = out / label
        target.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "history.csv", "data.json", "timings.json", "state.json", "environment.json"):
            shutil.copy2(run / name, target / name)
        for split, prefix in (("test", "test"), ("external-mets_t2w_sample", "mets_t2w")):
            evaluation = newest_evaluation(run, split)
            if evaluation is None:
                raise SystemExit(f"{run} has no {split} evaluation: run scripts/lgg_cpu_experiment.sh first")
            for name in ("per_patient.csv", "summary.json"):
                shutil.copy2(evaluation / name, target / f"{prefix}_{name}")
        for prefix in ("test", "mets_t2w"):
            summary = json.loads((target / f"{prefix}_summary.json").read_text())
            dice = summary["per_patient"]["dice"]
            print(f"{label:<26}{prefix:<10} patients {summary['patients']:>3}  per-patient Dice {dice['mean']:.3f} "
                  f"± {dice['sd']:.3f} [{dice['ci95'][0]:.3f}, {dice['ci95'][1]:.3f}]  global Dice "
                  f"{summary['global']['dice']:.3f}  epochs {summary['training']['epochs']}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
