"""Two cross-validations of the LGG recipe against each other, patient by patient (numbers only).

    python scripts/lgg_crossval_compare.py results/lgg_recipe/crossval results/lgg_recipe/crossval-recipe-lgg \\
        [--rescore-keep-lesions all --work-crossval results/lgg_recipe_work/crossval-recipe-lgg] [--out FILE.md]

Both folders hold a ``metaseg crossval``'s ``per_patient.csv`` (out of fold: one row per patient and model). With
the same folds (same ``split_seed`` and number of folds, checked: every patient in the same fold), each model
and the ensemble are compared over the patients both scored: the mean and median per-patient Dice of each, the
mean difference (NEW - BASE), how many patients are better and worse, and the paired Wilcoxon signed-rank test
(:func:`~metaseg_tf.evaluation.stats.paired_wilcoxon`), Holm-adjusted over the table's rows.

``--rescore-keep-lesions KEEP`` isolates an inference setting: NEW's fold models (read from the state file
``crossval.json`` of the cross-validation's working folder, ``--work-crossval``) are scored again on their own
test patients with ``keep_lesions`` set to KEEP (an evaluation folder beside the others in each run, made only
where there is none; :func:`~metaseg_tf.evaluation.report.evaluate_run`), and NEW is compared with that. The
ensembles are not scored again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from metaseg_tf.evaluation.report import evaluate_run
from metaseg_tf.evaluation.stats import holm_adjusted, paired_wilcoxon
from metaseg_tf.runs.folders import read_json
from metaseg_tf.runs.records import newest_evaluation


def rescored(work_crossval: Path, keep_lesions: str) -> pd.DataFrame:
    """The out-of-fold per-patient scores of the cross-validation in ``work_crossval`` with its models'
    ``keep_lesions`` set to ``keep_lesions``: one row per patient and model, as ``per_patient.csv``."""
    state = read_json(work_crossval / "crossval.json")
    frames = []
    for fold, fold_state in sorted(state["folds"].items(), key=lambda item: int(item[0])):
        for model in state["models"]:
            run = fold_state.get(model, {}).get("run")
            if run is None:
                continue
            inference = {"keep_lesions": keep_lesions}
            evaluation = newest_evaluation(run, "test", inference=inference)
            if evaluation is None:
                print(f"fold {fold} {model}: scoring with keep_lesions {keep_lesions}", flush=True)
                evaluation = evaluate_run(run, "test", inference=inference, progress=False).out_dir
            frames.append(pd.read_csv(evaluation / "per_patient.csv", dtype={"case_id": str})
                          .assign(model=model, fold=int(fold)))
    if not frames:
        raise SystemExit(f"{work_crossval / 'crossval.json'} records no trained fold model yet")
    return pd.concat(frames, ignore_index=True)


def compare(base: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """One row per model label in both tables (``per_patient.csv`` rows): their per-patient Dice over the
    shared patients, paired; ``Δ mean`` is new - base."""
    folds = base[["case_id", "fold"]].drop_duplicates().merge(new[["case_id", "fold"]].drop_duplicates(),
                                                                on="case_id")
    if folds.empty:
        raise SystemExit("the two cross-validations share no scored patient (is one of them not started?)")
    if (folds["fold_x"] != folds["fold_y"]).any():
        raise SystemExit("the two cross-validations put patients in different folds: not paired")
    rows = []
    for model in [label for label in base["model"].unique() if label in set(new["model"])]:
        a, b = (frame[frame["model"] == model] for frame in (base, new))
        test = paired_wilcoxon({"new": b, "base": a}).iloc[0]
        merged = a[["case_id", "dice"]].merge(b[["case_id", "dice"]], on="case_id", suffixes=("_a", "_b"))
        rows.append({"model": model, "patients": int(test["patients"]),
                     "base mean": merged["dice_a"].mean(), "new mean": merged["dice_b"].mean(),
                     "base median": merged["dice_a"].median(), "new median": merged["dice_b"].median(),
                     "Δ mean": test["mean_difference"], "better": int((merged["dice_b"] > merged["dice_a"]).sum()),
                     "worse": int((merged["dice_b"] < merged["dice_a"]).sum()), "Wilcoxon p": test["p_value"]})
    if not rows:
        raise SystemExit("the two cross-validations share no model")
    table = pd.DataFrame(rows)
    return table.assign(**{"p Holm": holm_adjusted(table["Wilcoxon p"])})


def _markdown(table: pd.DataFrame) -> str:
    shown = table.copy()
    for column in shown.columns:
        if column.endswith(("mean", "median")):
            shown[column] = shown[column].map("{:.3f}".format)
    shown["Δ mean"] = table["Δ mean"].map("{:+.3f}".format)
    for column in ("Wilcoxon p", "p Holm"):
        shown[column] = table[column].map("{:.2g}".format)
    return shown.to_markdown(index=False, disable_numparse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="a crossval folder (per_patient.csv)")
    parser.add_argument("new", type=Path, help="another crossval folder over the same folds")
    parser.add_argument("--rescore-keep-lesions", choices=("all", "largest", "persistent"),
                        help="compare NEW with NEW's models scored again with this keep_lesions")
    parser.add_argument("--work-crossval", type=Path, help="NEW's working folder (crossval.json and the runs)")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args()
    base, new = (pd.read_csv(folder / "per_patient.csv", dtype={"case_id": str}) for folder in (args.base, args.new))
    sections = [f"New: `{args.new}`; base: `{args.base}`; out-of-fold per-patient Dice:", "",
                _markdown(compare(base, new))]
    if args.rescore_keep_lesions:
        if args.work_crossval is None:
            parser.error("--rescore-keep-lesions needs --work-crossval")
        label = f"keep_lesions {args.rescore_keep_lesions}"
        sections += ["", f"New: `{args.new}`; base: its own models scored with {label} (no ensembles):", "",
                     _markdown(compare(rescored(args.work_crossval, args.rescore_keep_lesions), new))]
    text = "\n".join(sections) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
