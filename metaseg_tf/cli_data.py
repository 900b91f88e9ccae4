"""The ``metaseg data`` commands: ``summary`` (patients, pairs and skipped files of a folder, slice pairs or
volumes) and ``synth`` (the synthetic phantom the main job runs on)."""

from __future__ import annotations

import argparse

from metaseg_tf.cli_flags import typed_path
from metaseg_tf.config import LABEL_CONVENTION_NAMES
from metaseg_tf.data.discover import DataError, discover_pairs
from metaseg_tf.data.layouts import discover_volumes
from metaseg_tf.data.summary import summarise_dataset, summarise_volumes
from metaseg_tf.data.synthetic import PHANTOM_LAYOUTS, PhantomSettings, generate_phantom

DEFAULT_PHANTOM = PhantomSettings()


def _data_summary(args: argparse.Namespace) -> int:
    volumes = discover_volumes(args.directory, args.labels_convention)
    if volumes is not None:
        print("\n".join(summarise_volumes(volumes, show=args.show, patient_pattern=args.patient_pattern,
                                           sequences=tuple(args.sequences), lesions=not args.quick)))
        if not volumes.cases:
            raise DataError(f"no usable case in {volumes.root}")
        return 0
    report = discover_pairs(args.directory)
    summary = summarise_dataset(report, check=not args.quick, progress=not args.quiet)
    print("\n".join(summary.lines(show=args.show)))
    if summary.usable_pairs == 0:
        raise DataError(f"none of the {len(report.pairs)} pairs in {report.root} could be read")
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    summary = generate_phantom(args.out, args.patients, args.slices, args.size, args.seed,
                               progress=not args.quiet, layout=args.layout)
    verb = "reused" if summary.reused else "wrote"
    print(
        f"{verb} phantom in {summary.root}: {len(summary.case_ids)} patients x {args.slices} slices at "
        f"{args.size} px, {len(summary.lesion_radii)} lesions, "
        f"{100 * summary.fraction_without_lesion:.0f} % of slices without lesion"
    )
    return 0


def add_data_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``data summary`` and ``data synth`` to the ``metaseg`` sub-commands."""
    data = commands.add_parser("data", help="inspect or generate datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    summary = data_commands.add_parser("summary", help="patients, pairs and skipped files of a folder")
    summary.add_argument("directory", type=typed_path)
    summary.add_argument("--quick", action="store_true", help="only find pairs; do not read every file")
    summary.add_argument("--show", type=int, default=5, help="file names listed per skip reason")
    summary.add_argument("--labels-convention", choices=LABEL_CONVENTION_NAMES,
                         help="the label convention of a volume dataset (default: decided from its files)")
    summary.add_argument("--patient-pattern", default="",
                         help="regular expression whose first group is a case's patient (default: BraTS ids by "
                              "patient, else one patient per case)")
    summary.add_argument("--sequences", nargs="+", default=(),
                         help="sequences a run would use: which cases it would skip (default: the config's)")
    summary.set_defaults(handler=_data_summary)
    synth = data_commands.add_parser("synth", help="write the synthetic metastasis phantom")
    synth.add_argument("out", type=typed_path)
    synth.add_argument("--patients", type=int, default=DEFAULT_PHANTOM.n_patients)
    synth.add_argument("--slices", type=int, default=DEFAULT_PHANTOM.n_slices)
    synth.add_argument("--size", type=int, default=DEFAULT_PHANTOM.size)
    synth.add_argument("--seed", type=int, default=DEFAULT_PHANTOM.seed)
    synth.add_argument("--layout", default="brats_mets", choices=PHANTOM_LAYOUTS,
                       help="brats_mets: NIfTI volumes with BraTS labels (default); kaggle_3m: 2D PNG slices")
    synth.set_defaults(handler=_data_synth)
