"""The ``metaseg`` command line: one entry point to the same functions the notebooks call.

Flags mean one thing in every command: ``-p KEY VALUE`` sets an :class:`~metaseg_tf.config.ExperimentConfig`
field (``pipeline`` also takes its notebook parameters there), ``--min-lesion-voxels`` the smallest predicted
lesion kept, ``--engine`` / ``--level`` how the network is run. ``--out`` is the folder a new result folder is made
in, except for ``crossval``, whose ``--out`` is the cross-validation's own folder: running the same command again
continues there. Spellings of an earlier release still work for one release, with a warning.

Errors in the input (a missing folder, no pairs, a bad config value) end the command with a one-line
message on stderr and exit status 2, without a traceback. Paths typed here are relative to the working
directory; the defaults (``results/runs``, ``results/pipeline``, ``results/crossval``, ...) live under the
project root (:mod:`metaseg_tf.paths`), wherever the command is started.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from metaseg_tf import paths
from metaseg_tf.cli_flags import (
    LEVEL_HELP,
    add_config_flags,
    add_engine_flags,
    add_process_flags,
    add_runs_root_flag,
    config_defaults,
    config_from_args,
    number,
    parse_value,
    series_choice,
    typed_path,
)
from metaseg_tf.config import KEEP_LESIONS, LABEL_CONVENTION_NAMES, ConfigError
from metaseg_tf.cli_data import add_data_commands
from metaseg_tf.data.discover import DataError
from metaseg_tf.data.synthetic import DEFAULT_PHANTOMS
from metaseg_tf.inference.export import EXPORT_FORMATS
from metaseg_tf.inference.quantise import INT8_MAX_DROP
from metaseg_tf.pipeline import PROFILES, PipelineError

KEEP_LESIONS_HELP = ("after --min-lesion-voxels keep all predicted lesions, the largest alone (Buda et al.'s 3D "
                     "largest connected component) or those over >= 2 neighbouring slices (default: the run's "
                     "keep_lesions)")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter, before it loads

def _evaluate(args: argparse.Namespace) -> int:
    from metaseg_tf.evaluation.report import evaluate_run

    inference = {name: value for name, value in (("flip_tta", args.tta), ("min_lesion_voxels", args.min_lesion_voxels),
                                                 ("keep_lesions", args.keep_lesions),
                                                 ("threshold_from_validation", args.threshold_from_validation))
                 if value is not None}
    result = evaluate_run(args.run, split=args.split, which=args.which, threshold=args.threshold,
                          data_dir=args.data, progress=not args.quiet,
                          allow_missing_patients=args.allow_missing_patients, inference=inference or None,
                          engine=args.engine, level=args.level)
    if result.summary["missing_patients"]:
        print(f"not in the data any more, left out: {', '.join(result.summary['missing_patients'])}")
    dice = result.summary["per_patient"]["dice"]
    made_by = result.summary["engine"] + ("" if result.summary["level"] is None else f", level {result.summary['level']}")
    print(f"{result.summary['model']} ({made_by}) on {result.summary['patients']} {result.summary['split']} patients "
          f"({result.summary['resolution']}): per-patient Dice {dice['mean']:.3f} ± {dice['sd']:.3f}, "
          f"95 % CI [{dice['ci95'][0]:.3f}, {dice['ci95'][1]:.3f}]; global Dice "
          f"{result.summary['global']['dice']:.3f}")
    print(result.out_dir)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from metaseg_tf.evaluation.compare import compare_runs

    comparison = compare_runs(args.runs, args.out, split=args.split, labels=args.labels, progress=not args.quiet,
                              allow_different_patients=args.allow_different_patients)
    print(comparison.markdown)
    print(comparison.out_dir)
    return 0


def _predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from metaseg_tf.inference.files import predict_path
    from metaseg_tf.inference.lesions import lesion_table_text
    from metaseg_tf.inference.parts import Part
    from metaseg_tf.inference.predictor import Predictor

    if args.model is not None:
        print("metaseg: warning: `predict --model RUN` is deprecated and goes in the next release; "
              "write `metaseg predict RUN --input ...`", file=sys.stderr)
    if (args.run is None) == (args.model is None):
        raise ConfigError("give the run folder once: `metaseg predict RUN --input ...`")
    if args.min_component is not None:
        print("metaseg: warning: `--min-component` is deprecated and goes in the next release; write "
              "`--min-lesion-voxels`", file=sys.stderr)
        if args.min_lesion_voxels is None:
            args.min_lesion_voxels = args.min_component
    predictor = Predictor.from_run(args.run or args.model, which=args.which, threshold=args.threshold, flip_tta=args.tta,
                                   min_lesion_voxels=args.min_lesion_voxels, keep_lesions=args.keep_lesions,
                                   engine=args.engine, level=args.level,
                                   models=args.models)
    part, request = None, None
    if (args.num_parts is None) != (args.part_id is None):
        raise ConfigError("--num-parts and --part-id go together")
    if args.num_parts is not None:
        if args.out is None:
            raise ConfigError("with --num-parts, name the predictions folder the parts share with --out")
        part = Part(args.num_parts, args.part_id)
        request = {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()
                   if name in ("run", "model", "models", "which", "threshold", "tta", "min_lesion_voxels", "keep_lesions",
                               "engine", "level")}
    series = dict(args.series or [])
    out_dir, summary = predict_path(predictor, args.input, paths.resolve(paths.RESULTS_DIR) if args.out is None else args.out,
                                    progress=not args.quiet, convention=args.labels_convention, part=part, request=request,
                                    series=series, dicom_seg=args.dicom_seg)
    print(", ".join(f"{key} {value}" for key, value in summary.items()))
    if (out_dir / "lesions.csv").is_file():
        print(lesion_table_text(pd.read_csv(out_dir / "lesions.csv")))
    print(out_dir)
    return 0



def _export(args: argparse.Namespace) -> int:
    from metaseg_tf.inference.export import export_run, read_export

    out_dir = export_run(args.run, args.format, args.which, args.level, args.precision,
                         None if args.max_drop < 0 else args.max_drop)
    record = read_export(out_dir)
    difference = record.get("max_abs_difference_to_keras")
    print(f"{args.format} export of the {args.which} model" + (f" pruned to level {args.level}" if args.level else "")
          + (f"; largest probability difference to Keras on a check batch {difference:.2e}" if difference is not None
             else ""))
    if "validation_drop" in record:
        print(f"int8 per-patient Dice on {record['validation_patients']} validation patients: "
              f"{record['validation_dice_int8']:.4f} against float32's {record['validation_dice_fp32']:.4f}")
    print(out_dir)
    return 0


def _follower(args: argparse.Namespace) -> bool:
    """Join the process group the flags or the environment describe (if any); whether this process follows."""
    from metaseg_tf.training.processes import initialize, resolve_group

    group = resolve_group(args.coordinator, args.num_processes, args.process_id, args.coordinator_timeout)
    if group is None:
        return False
    initialize(group)
    return not group.leader


def _train(args: argparse.Namespace) -> int:
    from metaseg_tf.training.train import follow, train

    config = config_from_args(args)
    if _follower(args):
        return follow(progress=not args.quiet)
    run = train(config, runs_root=args.runs_root, name=args.name, progress=not args.quiet,
                resume=not args.no_resume)
    print(run.run_dir)
    return 0


def _crossval(args: argparse.Namespace) -> int:
    from metaseg_tf.evaluation.crossval import DEFAULT_MODELS, crossval

    from metaseg_tf.training.train import follow

    if args.model is not None:
        raise ConfigError("crossval trains every model of --models; --model is not used here")
    if _follower(args):
        return follow(progress=not args.quiet)
    result = crossval(config_from_args(args), models=args.models or DEFAULT_MODELS, n_folds=args.folds,
                      out_dir=args.out, runs_root=args.runs_root, name=args.name, ensemble=not args.no_ensemble,
                      progress=not args.quiet, max_folds=args.max_folds, fold=args.fold, collect=args.collect)
    print(result.markdown)
    print(result.out_dir)
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from metaseg_tf.pipeline import NOTEBOOK_PARAMETERS, run_pipeline
    from metaseg_tf.training.processes import resolve_group

    if resolve_group(args.coordinator, args.num_processes, args.process_id, args.coordinator_timeout) is not None:
        raise ConfigError("the pipeline's notebooks run in kernels of their own, which cannot join a process group; "
                          "train across processes with `metaseg train` or `metaseg crossval`, or on one host with "
                          "-p devices N")
    overrides: dict[str, Any] = {}
    for key, value in args.param or []:  # a notebook parameter, or any ExperimentConfig field
        if key in NOTEBOOK_PARAMETERS:
            overrides[key] = parse_value(key, value, NOTEBOOK_PARAMETERS)
        elif key in config_defaults():
            overrides.setdefault("config_overrides", {})[key] = parse_value(key, value, config_defaults())
        else:
            raise ConfigError(f"unknown setting {key!r}: neither a notebook parameter ({', '.join(NOTEBOOK_PARAMETERS)}) "
                              "nor an ExperimentConfig field")
    overrides.setdefault("phantom", args.phantom)
    run = run_pipeline(args.profile, args.data, args.out, overrides, progress=not args.quiet, resume=not args.no_resume)
    total = sum(run.seconds.values())
    print(f"finished in {total / 60:.1f} min; open {run.report}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from metaseg_tf.serve.served import ServeError
    from metaseg_tf.serve.launch import LIMIT_VARIABLES, serve

    try:
        return serve(args.runs, args.host, args.api_port, args.ui_port, api=not args.ui_only, ui=not args.api_only,
                     api_url=args.api_url, engine=args.engine, level=args.level, workers=args.workers,
                     token=args.token, token_file=args.token_file, no_auth=args.no_auth,
                     limits={name: getattr(args, name) for name in LIMIT_VARIABLES})
    except ServeError as error:
        raise ConfigError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metaseg", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    add_data_commands(commands)

    pipeline = commands.add_parser(
        "pipeline", help="the main job: the five notebooks run by papermill into a new results folder"
    )
    pipeline.add_argument("--profile", default="cpu", choices=tuple(PROFILES),
                          help="; ".join(f"{name}: {profile.description}" for name, profile in PROFILES.items())
                          + " (default: cpu)")
    pipeline.add_argument("--data", type=typed_path, help="your own data folder instead of the synthetic phantom")
    pipeline.add_argument("--phantom", default="brats_mets", choices=tuple(DEFAULT_PHANTOMS),
                          help="the synthetic phantom used without --data: brats_mets (default, NIfTI volumes "
                               "with BraTS labels) or kaggle_3m (2D slices)")
    pipeline.add_argument("--out", type=typed_path, default=paths.resolve(paths.PIPELINE_ROOT),
                          help=f"a new run folder goes here (default: {paths.PIPELINE_ROOT} in the project)")
    pipeline.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                          help="a notebook parameter or any ExperimentConfig field, e.g. -p epochs 5 "
                               "-p filters '[8,16,32,64,128]' -p lr_schedule cosine")
    pipeline.add_argument("--no-resume", action="store_true",
                          help="always a new results folder (default: continue a killed or failed pipeline of the "
                               "same profile and parameters under --out)")
    add_process_flags(pipeline)
    pipeline.set_defaults(handler=_pipeline)

    train = commands.add_parser("train", help="train a model into a new run folder (resumes an unfinished one)")
    add_config_flags(train)
    add_runs_root_flag(train)
    train.add_argument("--name", help="run folder suffix (default: the model name)")
    train.add_argument("--no-resume", action="store_true", help="always start a new run folder")
    add_process_flags(train)
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("evaluate", help="score a run on its test split: CSVs, summary.json, plots")
    evaluate.add_argument("run", type=typed_path, help="run folder made by `metaseg train`")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--which", default="best", choices=("best", "last"))
    evaluate.add_argument("--threshold", type=float,
                          help="default: the run's threshold (the one chosen on the validation patients, for a "
                               "run trained with threshold_from_validation)")
    evaluate.add_argument("--data", type=typed_path, help="score every slice of this other folder (external test set)")
    evaluate.add_argument("--allow-missing-patients", action="store_true",
                          help="score the run's recorded patients that the data still holds and list the others "
                               "(default: stop with an error)")
    evaluate.add_argument("--tta", action=argparse.BooleanOptionalAction, help="flip TTA (default: the run's flip_tta)")
    evaluate.add_argument("--min-lesion-voxels", type=int,
                          help="drop predicted 3D lesions smaller than this (default: the run's min_lesion_voxels)")
    evaluate.add_argument("--keep-lesions", choices=KEEP_LESIONS, help=KEEP_LESIONS_HELP)
    evaluate.add_argument("--threshold-from-validation", action=argparse.BooleanOptionalAction,
                          help="the threshold that scores best on the run's validation patients (default: the run's "
                               "threshold_from_validation)")
    add_engine_flags(evaluate, "make the masks with Keras (default), ONNX Runtime or OpenVINO (the run's newest "
                                "export of that format, exported first if there is none)")
    evaluate.set_defaults(handler=_evaluate)

    compare = commands.add_parser("compare", help="one table and paired Wilcoxon tests over several runs")
    compare.add_argument("runs", type=typed_path, nargs="+", help="run folders")
    compare.add_argument("--labels", nargs="+", help="one name per run (default: folder names)")
    compare.add_argument("--out", type=typed_path, default=paths.resolve(paths.RESULTS_DIR),
                         help=f"a new comparison folder goes here (default: {paths.RESULTS_DIR} in the project)")
    compare.add_argument("--split", default="test", choices=("train", "val", "test"))
    compare.add_argument("--allow-different-patients", action="store_true",
                         help="compare runs evaluated on different patients (paired tests use the shared ones)")
    compare.set_defaults(handler=_compare)

    cross_validation = commands.add_parser(
        "crossval", help="patient-level k-fold cross-validation of models and their ensemble (resumable)")
    add_config_flags(cross_validation)
    add_runs_root_flag(cross_validation)
    cross_validation.add_argument("--models", nargs="+",
                                  help="models to cross-validate (default: nested_unet attention_unet)")
    cross_validation.add_argument("--folds", type=int, default=5, help="number of folds over patients (default 5)")
    cross_validation.add_argument("--out", type=typed_path,
                                  help=f"the cross-validation's folder (default: {paths.CROSSVAL_ROOT}/NAME in the "
                                       "project); the same command again continues it")
    cross_validation.add_argument("--name", default="crossval",
                                  help="names the default --out folder and the runs, NAME-MODEL-fold<k>")
    cross_validation.add_argument("--no-ensemble", action="store_true",
                                  help="do not score the mean of the models' probabilities per fold")
    one_fold = cross_validation.add_mutually_exclusive_group()
    one_fold.add_argument("--fold", type=number(int, 0), help="train and score this fold only (0-based): one job of "
                                                              "an array over a shared --out folder")
    one_fold.add_argument("--collect", action="store_true", help="train nothing: summarise the folds that are "
                                                                 "there and say which are missing")
    cross_validation.add_argument("--max-folds", type=int,
                                  help="stop after working on this many folds (run again to continue)")
    add_process_flags(cross_validation)
    cross_validation.set_defaults(handler=_crossval)

    predict = commands.add_parser("predict", help="masks for an image, a folder or NIfTI volume(s)")
    predict.add_argument("run", type=typed_path, nargs="?",
                         help="run folder made by `metaseg train`, or a `metaseg crossval` folder (its fold models "
                              "as one ensemble)")
    predict.add_argument("--models", nargs="+", help="a crossval folder: the architectures to ensemble (default: all)")
    predict.add_argument("--model", type=typed_path, help="deprecated spelling of RUN")
    predict.add_argument("--input", type=typed_path, nargs="+", required=True,
                         help="image file(s), folder(s), NIfTI volume(s) (several: one channel each), or a folder or "
                              ".zip of DICOM series")
    predict.add_argument("--out", type=typed_path,
                         help=f"a new predictions folder goes here (default: {paths.RESULTS_DIR} in the project); "
                              "with --num-parts: the predictions folder the parts share")
    predict.add_argument("--num-parts", type=number(int, 1), help="spread the cases over this many processes (as "
                                                                   "nnU-Net's -num_parts); each runs one --part-id")
    predict.add_argument("--part-id", type=number(int, 0), help="this process's part, 0 to --num-parts - 1")
    predict.add_argument("--which", default="best", choices=("best", "last"))
    predict.add_argument("--threshold", type=float, help="default: the run's config threshold")
    predict.add_argument("--tta", action=argparse.BooleanOptionalAction,
                         help="average with the horizontally flipped image (default: the run's flip_tta)")
    predict.add_argument("--min-lesion-voxels", type=int,
                         help="drop predicted lesions smaller than this (default: the run's min_lesion_voxels): 3D "
                              "per case for volumes and for slices named <case>_<n>, else pixels of a slice")
    predict.add_argument("--keep-lesions", choices=KEEP_LESIONS, help=KEEP_LESIONS_HELP)
    predict.add_argument("--min-component", type=int, help=argparse.SUPPRESS)  # deprecated: --min-lesion-voxels
    predict.add_argument("--labels-convention", choices=LABEL_CONVENTION_NAMES,
                         help="the label convention of the volumes predicted, which their segs are read and the "
                              "-seg files written in (default: their dataset's, from its files; NIfTI files alone: "
                              "the run's)")
    predict.add_argument("--series", nargs="+", metavar="SEQUENCE=UID_OR_TEXT", type=series_choice,
                         help="DICOM input: which series is which sequence, by SeriesInstanceUID or by text of its "
                              "description (default: recognised from the descriptions; every series found is listed)")
    predict.add_argument("--dicom-seg", action="store_true",
                         help="DICOM input: also write <case>-seg.dcm, a DICOM SEG referencing the source series")
    add_engine_flags(predict, "run the network with Keras (default), ONNX Runtime or OpenVINO (the run's newest "
                               "export of that format, exported first if there is none)")
    predict.set_defaults(handler=_predict)

    export = commands.add_parser("export", help="export a run's model as ONNX, OpenVINO IR or a TF SavedModel")
    export.add_argument("run", type=typed_path, help="run folder made by `metaseg train`")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    export.add_argument("--which", default="best", choices=("best", "last"))
    export.add_argument("--level", type=int, help=LEVEL_HELP)
    export.add_argument("--precision", default="fp32", choices=("fp32", "int8", "bf16"),
                        help="openvino: int8 (NNCF, calibrated on training patients) or bf16; served as --engine "
                             "openvino-int8 / openvino-bf16")
    export.add_argument("--max-drop", type=float, default=INT8_MAX_DROP,
                        help="int8: largest per-patient Dice drop on the run's validation patients that NNCF's "
                             "accuracy control allows (default %(default)s; negative: plain post-training "
                             "quantisation)")
    export.set_defaults(handler=_export)

    serve = commands.add_parser("serve", help="start the web app: prediction API (FastAPI) and UI (Streamlit)")
    serve.add_argument("--runs", type=typed_path, nargs="+",
                       help="run folders to serve (default: the newest pipeline run's two models)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--api-port", type=int, default=8000)
    serve.add_argument("--ui-port", type=int, default=8501)
    parts = serve.add_mutually_exclusive_group()
    parts.add_argument("--api-only", action="store_true", help="start only the API")
    parts.add_argument("--ui-only", action="store_true", help="start only the UI (see --api-url)")
    serve.add_argument("--api-url", help="where the UI finds the API (default: this host's --api-port)")
    add_engine_flags(serve, "how the API runs the networks: Keras (default), ONNX Runtime or OpenVINO",
                      "; other architectures are served whole")
    serve.add_argument("--workers", type=int, default=1,
                       help="API server processes, each with its own copy of the models (default 1; the job "
                            "limits hold per process)")
    access = serve.add_mutually_exclusive_group()
    access.add_argument("--token-file", help="a file whose first line is the access token every route but "
                                             "/health needs (or METASEG_API_TOKEN / METASEG_API_TOKEN_FILE)")
    access.add_argument("--token", help="the access token itself (visible to every user of this machine in "
                                        "its process list: prefer --token-file or METASEG_API_TOKEN)")
    access.add_argument("--no-auth", action="store_true",
                        help="no access token even when bound beyond loopback (a trusted network only)")
    serve.add_argument("--volume-jobs", type=number(int, 1),
                       help="volume predictions at once (default: as many as half the memory holds at "
                            "the voxel limit, at most the cores)")
    serve.add_argument("--slice-jobs", type=number(int, 1), help="slice predictions at once (default: the cores)")
    serve.add_argument("--queue", type=number(int, 0), help="requests of each kind that may wait for a place (default 64); "
                                                 "more get 503 with Retry-After")
    serve.add_argument("--volume-timeout", type=number(float, 0, strict=True), help="seconds a volume request may take, waiting included "
                                                            "(default 900)")
    serve.add_argument("--slice-timeout", type=number(float, 0, strict=True), help="seconds a slice request may take (default 120)")
    serve.set_defaults(handler=_serve)
    return parser


def _announce(message: dict | None) -> None:
    """Tell a process group's followers (if this process leads one) how the command ended; commands that train
    nothing never import Keras for it."""
    processes = sys.modules.get("metaseg_tf.training.processes")
    if processes is not None:
        processes.announce(message)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        status = args.handler(args)
        _announce(None)  # process 0 of a group: the followers have nothing more to join
        return status
    except (DataError, ConfigError, ValueError, PipelineError) as error:
        _announce({"failed": str(error)})
        print(f"metaseg: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
