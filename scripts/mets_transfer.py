"""From glioma to metastases: does fine-tuning an LGG-trained model beat training from scratch, and the LGG
model as it is, on real metastasis slices? Leave-one-patient-out over ``mets_t2w_sample`` (3 patients, 19 T2W
slices with whole-tumour masks), numbers only (no image of the data is written here).

For each held-out patient, the other patients' slices train (no validation patient is left: the best epoch is
chosen on the training Dice, said in the table), and the held-out patient is scored with ``metaseg evaluate
--data`` (per-patient Dice over its slices at their native 512 px):

* ``unadapted``: the LGG run as it is;
* ``scratch``: the LGG run's recipe (architecture, 128 px, CLAHE, loss, cosine schedule), random weights;
* ``fine-tune``: the same recipe started from the LGG run's weights (``--init-from``), learning rate / 10.

    .venv/bin/python scripts/mets_transfer.py run LGG_RUN ../shared/data/mets_t2w_sample [--seeds 0 1]
    .venv/bin/python scripts/mets_transfer.py report          # -> results/mets_transfer/README tables

Resumable: a (variant, seed, patient) already scored is not trained again (``scores.csv``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "mets_transfer"
VARIANTS = ("unadapted", "scratch", "fine-tune")


def _fold_folders(data_dir: Path, work: Path) -> dict[str, tuple[Path, Path]]:
    """Per held-out patient: a training folder of the other patients' pairs and a test folder of its own
    (``images/`` + ``masks/`` with links to the files)."""
    from metaseg_tf.data import discover_pairs

    pairs = discover_pairs(data_dir).pairs
    patients = sorted({pair.case_id for pair in pairs})
    folds = {}
    for patient in patients:
        train, test = work / "folds" / patient / "train", work / "folds" / patient / "test"
        for pair in pairs:
            folder = test if pair.case_id == patient else train
            for kind, path in (("images", pair.image_path), ("masks", pair.mask_path)):
                link = folder / kind / path.name
                if not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(path.resolve())
        folds[patient] = (train, test)
    return folds


def _score(run_dir: Path, test: Path) -> float:
    from metaseg_tf.evaluation.report import evaluate_run

    result = evaluate_run(run_dir, data_dir=test, progress=False)
    return float(result.summary["per_patient"]["dice"]["mean"])


def run(lgg_run: Path, data_dir: Path, seeds: list[int], epochs: int, work: Path) -> None:
    from metaseg_tf.runs.folders import load_run_config
    from metaseg_tf.training.train import train

    scores_path = OUT / "scores.csv"
    done = pd.read_csv(scores_path) if scores_path.is_file() else pd.DataFrame(
        columns=["variant", "seed", "patient", "dice", "train_seconds", "epochs", "best_epoch"])
    recipe = load_run_config(lgg_run)
    for patient, (train_dir, test_dir) in _fold_folders(data_dir, work).items():
        for variant in VARIANTS:
            for seed in seeds if variant != "unadapted" else [0]:
                if ((done["variant"] == variant) & (done["seed"] == seed) & (done["patient"] == patient)).any():
                    continue
                started = time.time()
                if variant == "unadapted":
                    run_dir, state = lgg_run, {}
                else:
                    config = recipe.replace(
                        data_dir=str(train_dir), cache_dir=str(work / "cache"), test_fraction=0.0, val_fraction=0.0,
                        epochs=epochs, batch_size=4, seed=seed, early_stopping_patience=epochs,
                        init_from=str(lgg_run) if variant == "fine-tune" else "",
                        learning_rate=recipe.learning_rate / 10 if variant == "fine-tune" else recipe.learning_rate)
                    trained = train(config, runs_root=work / "runs", name=f"{variant}-s{seed}-{patient}",
                                    progress=False)
                    run_dir, state = trained.run_dir, trained.state
                dice = _score(run_dir, test_dir)
                row = {"variant": variant, "seed": seed, "patient": patient, "dice": dice,
                       "train_seconds": round(time.time() - started, 1) if variant != "unadapted" else 0.0,
                       "epochs": state.get("epochs_done", 0), "best_epoch": state.get("best_epoch", 0)}
                print(f"{variant:10s} seed {seed} held-out {patient}: per-patient Dice {dice:.3f}", flush=True)
                done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
                OUT.mkdir(parents=True, exist_ok=True)
                done.to_csv(scores_path, index=False)


def report() -> str:
    """The table of ``scores.csv``: per variant, each held-out patient's Dice (mean over seeds) and the mean."""
    scores = pd.read_csv(OUT / "scores.csv")
    per_patient = scores.groupby(["variant", "patient"])["dice"].mean().unstack("patient")
    per_patient["mean over patients"] = per_patient.mean(axis=1)
    per_patient["seeds"] = scores.groupby("variant")["seed"].nunique()
    table = per_patient.reindex([v for v in VARIANTS if v in per_patient.index]).round(3)
    return table.to_markdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("run")
    start.add_argument("lgg_run", type=Path)
    start.add_argument("data_dir", type=Path)
    start.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    start.add_argument("--epochs", type=int, default=40)
    start.add_argument("--work", type=Path, default=ROOT / "results" / "mets_transfer_work")
    commands.add_parser("report")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.lgg_run.resolve(), args.data_dir.resolve(), args.seeds, args.epochs, args.work.resolve())
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
