"""Recipe ablations on the real LGG MRI: one fixed patient split, the same epochs per variant, paired tests.

    python scripts/lgg_ablation.py run DATA_DIR [--model attention_unet] [--variants ...] [--epochs 15]
    python scripts/lgg_ablation.py report [--model attention_unet] [--out results/lgg_recipe] [--recipe]

``run`` trains every variant that has no finished run yet (an interrupted one resumes where it stopped: run the
same command again) into ``--work`` (default ``results/lgg_recipe_work``, git-ignored), each on the same
patient split (seed 42: 56 train / 14 validation / 18 test patients of the 88) for the same number of epochs
(the best checkpoint by validation Dice is scored; a budget in epochs, not minutes, keeps variants comparable
when the machine is shared; their training minutes are reported), then scores it on the test patients. Inference variants (flip TTA, 3D removal of small
components, a threshold chosen on the validation patients) re-score a trained variant without retraining.
``report`` writes ``ablation.md`` / ``ablation.csv`` (numbers only) under ``--out``: per variant the per-patient
Dice mean [95 % bootstrap CI] and median, global Dice, HD95, false-positive lesions per patient, epochs and
minutes, and a paired Wilcoxon test of its per-patient Dice against the baseline on the same patients.
``report --recipe`` writes issue 26's table instead, ``ablation-<model>-recipe.md`` / ``.csv``: each change of
the recipe with training seeds 0 and 1 against the recipe of the same seed, Wilcoxon over the (seed, patient)
pairs with Holm's adjustment over the table's changes, and every scored patient in
``ablation-<model>-recipe-per_patient.csv``.

Choosing a recipe on the test part of one split and then cross-validating it on all 88 patients (``metaseg
crossval``) reuses those 18 patients; the ablation table says so.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.evaluation.report import evaluate_run
from metaseg_tf.evaluation.scores import bootstrap_ci
from metaseg_tf.evaluation.stats import holm_adjusted, paired_wilcoxon
from metaseg_tf.runs.folders import load_run_config, newest_run, read_json
from metaseg_tf.runs.records import newest_evaluation
from metaseg_tf.training.train import train

ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = ROOT / "results/lgg_recipe_work"
OUT_DIR = ROOT / "results/lgg_recipe"

# The recipe of results/lgg_cpu: 128 px, filters 8-128, BCE + Dice, Adam 1e-3 with reduce-on-plateau, CLAHE.
BASELINE = {"image_size": 128, "filters": (8, 16, 32, 64, 128), "batch_size": 16, "loss": "bce_dice",
            "learning_rate": 1e-3, "lr_schedule": "plateau", "seed": 0, "split_seed": 42,
            "early_stopping_patience": 10}

# U-Net++'s variants train with XLA, as the cross-validation of recipe-lgg.yml did (twice as fast in fit on an
# AVX2 CPU: benchmarks/bench_fit.py); Attention U-Net's without, as its table began before XLA was measured.
MODEL_SETTINGS = {"nested_unet": {"jit_compile": "on"}}

# The cross-validated recipe (results/lgg_recipe/recipe.yml) on top of BASELINE, and what issue 26 changes in it.
RECIPE = {"lr_schedule": "cosine", "warmup_epochs": 1, "flip_tta": True}
RECIPE_CHANGES = [
    ("flair_fill", "a training slice's three sequences all its FLAIR with probability 0.2 (the dataset's fill of a "
     "missing sequence: scripts/lgg_missed.py)", {"sequence_fill_probability": 0.2, "sequence_fill_channel": 1}),
    ("dice_loss", "soft Dice loss only, per image", {"loss": "dice"}),
    ("dice_batch_loss", "soft Dice loss only, over the batch (Buda et al.'s Keras loss)", {"loss": "dice_batch"}),
    ("lesion_x2", "every slice with a lesion twice per epoch (Buda et al.)", {"lesion_slice_repeats": 2}),
    ("lesion_area", "twice as many lesion-slice draws per epoch, in proportion to the lesion's area (Buda et al.'s "
     "PyTorch sampler)", {"lesion_slice_repeats": 2, "lesion_slice_sampling": "area"}),
    ("lesion_slices", "lesion-free slices undersampled to 30 % per epoch (about half the steps: U-Net++'s candidate "
     "for the 25-minute budget)", {"empty_slice_fraction": 0.3}),
    ("size256", "256 px input, the masks' native size (4x the pixels of 128 px, the same network)",
     {"image_size": 256}),
    # U-Net++ only (--model nested_unet; one output elsewhere): how its four heads share the loss
    ("ds_deeper", "U-Net++ heads' loss weighted 1:2:3:4, shallowest to deepest",
     {"deep_supervision_weights": (1.0, 2.0, 3.0, 4.0)}),
    ("ds_off", "U-Net++ without deep supervision (the deepest head alone)", {"deep_supervision": False}),
]
# inference variants that re-score the recipe's models: which predicted lesions are kept (keep_lesions)
KEPT_LESIONS = [("largest", "the largest predicted 3D lesion kept alone (Buda et al.)"),
                ("persistent", "predicted lesions on one slice only removed")]


@dataclass(frozen=True)
class Variant:
    """A training change (``config``) or, for an inference variant, the trained variant it re-scores
    (``scores``) and how (``evaluation``: options of :func:`evaluate_run`)."""

    name: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)
    scores: str = ""
    evaluation: dict[str, Any] = field(default_factory=dict)


VARIANTS = [
    Variant("baseline", "the results/lgg_cpu recipe"),
    Variant("context1", "2.5D: one neighbouring slice on each side as extra channels", {"context_slices": 1}),
    Variant("cosine", "cosine learning-rate decay after one warm-up epoch", {"lr_schedule": "cosine",
                                                                             "warmup_epochs": 1}),
    Variant("lesion_slices", "lesion-free slices undersampled to 30 % per epoch", {"empty_slice_fraction": 0.3}),
    Variant("lesion_slices_30", "lesion-free slices undersampled to 30 %, 30 epochs (about the steps of 15 full ones)",
            {"empty_slice_fraction": 0.3, "epochs": 30}),
    Variant("cosine+lesion_slices_30", "cosine schedule, lesion-free slices undersampled to 30 %, 30 epochs",
            {"lr_schedule": "cosine", "warmup_epochs": 1, "empty_slice_fraction": 0.3, "epochs": 30}),
    Variant("cosine_30", "cosine schedule, 30 epochs (within Attention U-Net's 25-minute CPU budget)",
            {"lr_schedule": "cosine", "warmup_epochs": 1, "epochs": 30}),
    Variant("focal_tversky", "focal Tversky loss instead of BCE + Dice", {"loss": "focal_tversky"}),
    Variant("bf16", "bf16 mixed precision (faster epochs on CPUs with AVX512-BF16)", {"mixed_precision": "on"}),
    # bf16 against float32 on the cross-validated recipe (cosine, flip TTA), two seeds, paired by seed
    Variant("recipe", "the cross-validated recipe (results/lgg_recipe/recipe.yml): cosine, flip TTA",
            {"lr_schedule": "cosine", "warmup_epochs": 1, "flip_tta": True}),
    Variant("recipe+bf16", "the recipe in bf16 mixed precision", {"lr_schedule": "cosine", "warmup_epochs": 1,
                                                                  "flip_tta": True, "mixed_precision": "on"}),
    Variant("recipe_seed1", "the recipe, training seed 1", {"lr_schedule": "cosine", "warmup_epochs": 1,
                                                            "flip_tta": True, "seed": 1}),
    Variant("recipe+bf16_seed1", "the recipe in bf16 mixed precision, training seed 1",
            {"lr_schedule": "cosine", "warmup_epochs": 1, "flip_tta": True, "mixed_precision": "on", "seed": 1}),
    # Issue 26: changes to the recipe, each with training seeds 0 and 1 (paired with recipe / recipe_seed1)
    *[Variant(f"recipe+{change}{suffix}", f"the recipe, {text}{seed_text}", {**RECIPE, **config, "seed": seed})
      for change, text, config in RECIPE_CHANGES
      for seed, suffix, seed_text in ((0, "", ""), (1, "_seed1", ", training seed 1"))],
    *[Variant(f"{trained}+{keep}", f"{trained.replace('_seed1', ', training seed 1')}, {text}", scores=trained,
              evaluation={"keep_lesions": keep})
      for trained in ("recipe", "recipe_seed1") for keep, text in KEPT_LESIONS],
    Variant("baseline+tta", "baseline, flip TTA at inference", scores="baseline", evaluation={"flip_tta": True}),
    Variant("baseline+min_lesion", "baseline, predicted 3D lesions under 100 voxels removed", scores="baseline",
            evaluation={"min_lesion_voxels": 100}),
    Variant("baseline+val_threshold", "baseline, threshold chosen on the validation patients", scores="baseline",
            evaluation={"threshold_from_validation": True}),
    Variant("cosine+tta", "cosine, flip TTA at inference", scores="cosine", evaluation={"flip_tta": True}),
    Variant("cosine+tta+val_threshold", "cosine, flip TTA, threshold chosen on the validation patients",
            scores="cosine", evaluation={"flip_tta": True, "threshold_from_validation": True}),
    Variant("cosine_30+tta", "cosine, 30 epochs, flip TTA at inference", scores="cosine_30",
            evaluation={"flip_tta": True}),
    Variant("baseline+all_inference", "baseline, flip TTA, lesions under 100 voxels removed, validation threshold",
            scores="baseline", evaluation={"flip_tta": True, "min_lesion_voxels": 100,
                                           "threshold_from_validation": True}),
]
BY_NAME = {variant.name: variant for variant in VARIANTS}


def _config(data_dir: str, model: str, variant: Variant, epochs: int, work: Path) -> ExperimentConfig:
    return ExperimentConfig(data_dir=data_dir, cache_dir=str(work / "cache"), model=model,
                            **{**BASELINE, **MODEL_SETTINGS.get(model, {}), "epochs": epochs, **variant.config})


def _run_name(model: str, variant: str) -> str:
    return f"ablation-{model}-{variant}"


def _finished_run(work: Path, model: str, variant: str) -> Path | None:
    return newest_run(work / "runs", _run_name(model, variant), "finished")


def _evaluation(run: Path, variant: Variant) -> Path | None:
    return newest_evaluation(run, "test", inference=variant.evaluation)


def applies(variant: Variant, model: str) -> bool:
    """Whether ``variant`` changes anything for ``model``: U-Net++'s deep-supervision settings do nothing to a
    model of one output (its training would be the recipe's again)."""
    trained = BY_NAME[variant.scores or variant.name]
    return model == "nested_unet" or not any(key.startswith("deep_supervision") for key in trained.config)


def run_variants(data_dir: str, model: str, names: list[str], epochs: int, work: Path) -> None:
    """Train and score each named variant that is not done yet; print one line per step."""
    started = time.monotonic()
    wasted = [name for name in names if not applies(BY_NAME[name], model)]
    if wasted:
        raise SystemExit(f"{', '.join(wasted)}: U-Net++ only (--model nested_unet)")
    for name in names:
        variant = BY_NAME[name]
        trained = variant.scores or variant.name
        config = _config(data_dir, model, BY_NAME[trained], epochs, work)
        run = _finished_run(work, model, trained)
        if run is not None and load_run_config(run).replace(cache_dir=config.cache_dir).to_dict() != config.to_dict():
            run = None  # trained with other settings (e.g. --epochs): train this variant anew
        if run is None:
            print(f"[{(time.monotonic() - started) / 60:5.1f} min] {name}: training ({config.epochs} epochs)", flush=True)
            run = train(config, runs_root=work / "runs", name=_run_name(model, trained), progress=False).run_dir
        if _evaluation(run, variant) is None:
            print(f"[{(time.monotonic() - started) / 60:5.1f} min] {name}: scoring {run.name}", flush=True)
            evaluate_run(run, "test", progress=False, inference=variant.evaluation)
        summary = read_json(_evaluation(run, variant) / "summary.json")
        print(f"[{(time.monotonic() - started) / 60:5.1f} min] {name}: per-patient Dice "
              f"{summary['per_patient']['dice']['mean']:.3f} over {summary['patients']} patients, "
              f"{summary['training']['epochs']} epochs", flush=True)


def report(model: str, work: Path, out: Path) -> pd.DataFrame:
    """The ablation table of every variant scored so far (numbers only), written under ``out``."""
    per_patient, rows = {}, []
    for variant in VARIANTS:
        run = _finished_run(work, model, variant.scores or variant.name)
        evaluation = _evaluation(run, variant) if run is not None else None
        if evaluation is None:
            continue
        summary = read_json(evaluation / "summary.json")
        patients = pd.read_csv(evaluation / "per_patient.csv")
        per_patient[variant.name] = patients
        dice = patients["dice"].to_numpy()
        median_low, median_high = bootstrap_ci(dice, statistic="median")
        config = load_run_config(run)
        rows.append({"variant": variant.name, "change": variant.description, "patients": len(patients),
                     "dice_mean": dice.mean(), "dice_ci95": summary["per_patient"]["dice"]["ci95"],
                     "dice_median": float(pd.Series(dice).median()), "dice_median_ci95": [median_low, median_high],
                     "global_dice": summary["global"]["dice"], "hd95": summary["per_patient"]["hd95"]["mean"],
                     "fp_lesions_per_patient": summary["lesions"]["false_positives_per_patient"],
                     "threshold": summary["threshold"], "epochs": summary["training"]["epochs"],
                     "train_minutes": (summary["training"]["train_seconds"] or 0) / 60,
                     "epoch_budget": config.epochs})
    if not rows:
        raise SystemExit(f"no scored variant under {work}: run `python scripts/lgg_ablation.py run DATA_DIR` first")
    table = pd.DataFrame(rows)
    if "baseline" in per_patient:
        tests = {name: paired_wilcoxon({name: patients, "baseline": per_patient["baseline"]}).iloc[0]
                 for name, patients in per_patient.items() if name != "baseline"}
        table["difference_vs_baseline"] = [tests[n]["mean_difference"] if n in tests else 0.0
                                           for n in table["variant"]]
        table["p_vs_baseline"] = [tests[n]["p_value"] if n in tests else float("nan") for n in table["variant"]]
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"ablation-{model}.csv", index=False)
    (out / f"ablation-{model}.md").write_text(_markdown(table, model))
    return table


def _scores(work: Path, model: str, name: str) -> pd.DataFrame | None:
    """Per-patient scores of variant ``name``, or None where it is not trained and scored yet."""
    variant = BY_NAME[name]
    run = _finished_run(work, model, variant.scores or variant.name)
    evaluation = _evaluation(run, variant) if run is not None else None
    return None if evaluation is None else pd.read_csv(evaluation / "per_patient.csv")


def recipe_report(model: str, work: Path, out: Path) -> pd.DataFrame:
    """Issue 26's table: each change of the recipe against the recipe of the same training seed (0 and 1), the
    Wilcoxon test over the (seed, patient) pairs of the seeds both have; written as ``ablation-<model>-recipe``,
    with every scored (variant, seed, patient) in ``ablation-<model>-recipe-per_patient.csv`` (numbers only), so
    that later comparisons can be paired without the trained runs."""
    recipe = {0: _scores(work, model, "recipe"), 1: _scores(work, model, "recipe_seed1")}
    scored = [frame.assign(variant="recipe", seed=seed) for seed, frame in recipe.items() if frame is not None]
    changes = ([(f"recipe+{change}", f"recipe+{change}_seed1", text) for change, text, _ in RECIPE_CHANGES]
               + [(f"recipe+{keep}", f"recipe_seed1+{keep}", text) for keep, text in KEPT_LESIONS])
    rows = [{"variant": "recipe", "change": "cosine decay after a warm-up epoch, flip TTA (recipe.yml)",
             **{f"seed {seed}": scores["dice"].mean() for seed, scores in recipe.items() if scores is not None}}]
    for name, name_seed1, text in changes:
        if not applies(BY_NAME[name], model):
            continue
        seeds = {0: _scores(work, model, name), 1: _scores(work, model, name_seed1)}
        scored += [frame.assign(variant=name, seed=seed) for seed, frame in seeds.items() if frame is not None]
        paired = [seed for seed, scores in seeds.items() if scores is not None and recipe[seed] is not None]
        if not paired:
            continue
        pooled = {label: pd.concat([frame.assign(case_id=f"{seed}:" + frame["case_id"])
                                    for seed in paired for frame in [source[seed]]])
                  for label, source in (("change", seeds), ("recipe", recipe))}
        test = paired_wilcoxon(pooled).iloc[0]
        rows.append({"variant": name, "change": text,
                     **{f"seed {seed}": seeds[seed]["dice"].mean() for seed in paired},
                     "pairs": int(test["patients"]), "Δ vs recipe, same seeds": test["mean_difference"],
                     "Wilcoxon p": test["p_value"]})
    table = pd.DataFrame(rows)
    if "pairs" in table:
        table["pairs"] = table["pairs"].astype("Int64")
    if "Wilcoxon p" in table:
        tested = table["Wilcoxon p"].notna()
        table.loc[tested, "Holm p"] = holm_adjusted(table.loc[tested, "Wilcoxon p"])
    write_recipe_table(table, model, out)
    if scored:
        patients = pd.concat(scored, ignore_index=True)
        patients[["variant", "seed", *[c for c in patients if c not in ("variant", "seed")]]].to_csv(
            out / f"ablation-{model}-recipe-per_patient.csv", index=False)
    return table


def write_recipe_table(table: pd.DataFrame, model: str, out: Path) -> None:
    """Write :func:`recipe_report`'s table as ``ablation-<model>-recipe.csv`` and ``.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"ablation-{model}-recipe.csv", index=False)
    shown = table.copy()
    for column in ("seed 0", "seed 1", "Δ vs recipe, same seeds"):
        if column in shown:
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else
                                              (f"{v:+.3f}" if column.startswith("Δ") else f"{v:.3f}"))
    for column in ("Wilcoxon p", "Holm p"):
        if column in shown:
            shown[column] = shown[column].map(lambda p: "" if pd.isna(p) else f"{p:.3g}")
    if "pairs" in shown:
        shown["pairs"] = shown["pairs"].map(lambda n: "" if pd.isna(n) else f"{int(n)}")
    (out / f"ablation-{model}-recipe.md").write_text("\n".join([
        f"# Changes of the recipe, {model}, real LGG MRI (the fixed split of ablation-attention_unet.md: "
        "56 / 14 / 18 patients), two seeds", "",
        "Mean per-patient Dice on the 18 test patients for training seeds 0 and 1. Each change is compared with the "
        "recipe trained with the same seed; the Wilcoxon signed-rank test runs over the (seed, patient) pairs; "
        "the two seeds share their patients, so those pairs are not independent and p is optimistic. Holm p: "
        "the Wilcoxon p adjusted by Holm's method for the table's several changes (Holm 1979). Inference variants "
        "re-score the recipe's models." + (" Every variant trains with XLA (`jit_compile: on`)."
                                           if MODEL_SETTINGS.get(model, {}).get("jit_compile") == "on" else ""), "",
        f"Command: `python scripts/lgg_ablation.py run DATA/lgg_kaggle_3m --model {model} --variants recipe "
        f"recipe_seed1 ...`, then `python scripts/lgg_ablation.py report --recipe --model {model}`.", "",
        shown.to_markdown(index=False, disable_numparse=True), ""]))


def _markdown(table: pd.DataFrame, model: str) -> str:
    """The ablation table as markdown, with what it is and what it is not."""
    def interval(values: list[float]) -> str:
        return f"[{values[0]:.3f}, {values[1]:.3f}]"

    shown = pd.DataFrame({
        "variant": table["variant"], "change": table["change"],
        "per-patient Dice mean [95 % CI]": [f"{m:.3f} {interval(ci)}" for m, ci in zip(table["dice_mean"],
                                                                                       table["dice_ci95"])],
        "median [95 % CI]": [f"{m:.3f} {interval(ci)}" for m, ci in zip(table["dice_median"],
                                                                        table["dice_median_ci95"])],
        "global Dice": table["global_dice"].map("{:.3f}".format),
        "HD95 px": table["hd95"].map("{:.1f}".format),
        "FP lesions / patient": table["fp_lesions_per_patient"].map("{:.2f}".format),
        "threshold": table["threshold"].map("{:g}".format),
        "epochs": table["epochs"], "train min": table["train_minutes"].map("{:.1f}".format),
    })
    if "p_vs_baseline" in table:
        shown["Δ mean vs baseline"] = table["difference_vs_baseline"].map("{:+.3f}".format)
        shown["Wilcoxon p"] = table["p_vs_baseline"].map(lambda p: "" if pd.isna(p) else f"{p:.3g}")
    return "\n".join([
        f"# Recipe ablations, {model}, real LGG MRI (one fixed split)", "",
        "Every variant: the same 56 training / 14 validation / 18 test patients (split seed 42), 15 epochs unless "
        "the variant changes them, the checkpoint with the best validation Dice, scored on the 18 test patients at "
        "native 256 px (per-patient Dice: 3D over a case's slices; CI: 95 % bootstrap over patients). Inference "
        "variants (`+tta`, `+min_lesion`, `+val_threshold`) re-score the named variant's model without retraining. "
        "Wilcoxon: paired signed-rank test of per-patient Dice against the baseline on the same patients; with 18 "
        "patients only large effects separate, one seed per variant, and no correction for the several comparisons "
        "is made. Training minutes are wall-clock on a 2-core CPU shared with other work, so they are not speed "
        "measurements. The recipe chosen here is then cross-validated on all 88 patients, these 18 included.", "",
        f"Command: `python scripts/lgg_ablation.py run DATA/lgg_kaggle_3m --model {model}`, then "
        f"`python scripts/lgg_ablation.py report --model {model}`.", "",
        shown.to_markdown(index=False, disable_numparse=True), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run")
    run.add_argument("data_dir", help="the lgg_kaggle_3m folder")
    run.add_argument("--variants", nargs="+", choices=list(BY_NAME),
                     help="default: every variant that applies to --model")
    run.add_argument("--epochs", type=int, default=15, help="training epochs per variant")
    summary = commands.add_parser("report")
    summary.add_argument("--out", type=Path, default=OUT_DIR)
    summary.add_argument("--recipe", action="store_true", help="issue 26's table: changes of the recipe, two seeds")
    for command in (run, summary):
        command.add_argument("--model", default="attention_unet", choices=("nested_unet", "attention_unet"))
        command.add_argument("--work", type=Path, default=WORK_DIR)
    args = parser.parse_args()
    if args.command == "run":
        names = args.variants or [variant.name for variant in VARIANTS if applies(variant, args.model)]
        run_variants(args.data_dir, args.model, names, args.epochs, args.work)
    elif args.recipe:
        print(recipe_report(args.model, args.work, args.out).to_markdown(index=False, floatfmt=".3f"))
    else:
        print(report(args.model, args.work, args.out).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
