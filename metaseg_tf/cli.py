"""The ``metaseg`` command line: one entry point to the same functions the notebooks call.

Errors in the input (a missing folder, no pairs, a bad config value) end the command with a one-line
message on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from metaseg_tf.config import ConfigError, ExperimentConfig
from metaseg_tf.data.discover import DataError, discover_pairs
from metaseg_tf.data.split import split_for_config
from metaseg_tf.data.summary import summarise_dataset
from metaseg_tf.data.synthetic import PhantomSettings, generate_phantom
from metaseg_tf.preprocess import preprocess_dataset

DEFAULT_PHANTOM = PhantomSettings()


def _data_summary(args: argparse.Namespace) -> int:
    report = discover_pairs(args.directory)
    summary = summarise_dataset(report, check=not args.quick, progress=not args.quiet)
    print("\n".join(summary.lines(show=args.show)))
    if summary.usable_pairs == 0:
        raise DataError(f"none of the {len(report.pairs)} pairs in {report.root} could be read")
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    summary = generate_phantom(args.out, args.patients, args.slices, args.size, args.seed,
                               progress=not args.quiet)
    verb = "reused" if summary.reused else "wrote"
    print(
        f"{verb} phantom in {summary.root}: {len(summary.case_ids)} patients x {args.slices} slices at "
        f"{args.size} px, {len(summary.lesion_radii)} lesions, "
        f"{100 * summary.fraction_without_lesion:.0f} % of slices without lesion"
    )
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    config = ExperimentConfig.load(args.config) if args.config else ExperimentConfig()
    if args.data:
        config = config.replace(data_dir=str(args.data))
    else:
        phantom = generate_phantom(config.data_dir, DEFAULT_PHANTOM.n_patients, DEFAULT_PHANTOM.n_slices,
                                   DEFAULT_PHANTOM.size, DEFAULT_PHANTOM.seed, progress=not args.quiet)
        print(f"default data: synthetic phantom in {phantom.root} ({'reused' if phantom.reused else 'new'})")
    report = discover_pairs(config.data_dir)
    print("\n".join(summarise_dataset(report, check=False).lines()))
    dataset = preprocess_dataset(report, config, progress=not args.quiet)
    source = f"cache {dataset.cache_path}" if dataset.from_cache else f"preprocessed, cached in {dataset.cache_path}"
    print(f"slices      : {len(dataset)} usable at {config.image_size} px ({source}); skipped {len(dataset.skipped)}")
    split = split_for_config(dataset.case_ids, config)
    for part, cases in split.to_dict().items():
        n_slices = len(split.indices(dataset.case_ids, part))
        print(f"{part:<12}: {len(cases)} patients, {n_slices} slices")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metaseg", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="inspect or generate datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    summary = data_commands.add_parser("summary", help="patients, pairs and skipped files of a folder")
    summary.add_argument("directory", type=Path)
    summary.add_argument("--quick", action="store_true", help="only find pairs; do not read every file")
    summary.add_argument("--show", type=int, default=5, help="file names listed per skip reason")
    summary.set_defaults(handler=_data_summary)
    synth = data_commands.add_parser("synth", help="write the synthetic metastasis phantom")
    synth.add_argument("out", type=Path)
    synth.add_argument("--patients", type=int, default=DEFAULT_PHANTOM.n_patients)
    synth.add_argument("--slices", type=int, default=DEFAULT_PHANTOM.n_slices)
    synth.add_argument("--size", type=int, default=DEFAULT_PHANTOM.size)
    synth.add_argument("--seed", type=int, default=DEFAULT_PHANTOM.seed)
    synth.set_defaults(handler=_data_synth)

    pipeline = commands.add_parser(
        "pipeline", help="the main job: default data (phantom) -> summary -> preprocessing -> patient split"
    )
    pipeline.add_argument("--data", type=Path, help="your own data folder instead of the phantom")
    pipeline.add_argument("--config", type=Path, help="ExperimentConfig as JSON or YAML")
    pipeline.set_defaults(handler=_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (DataError, ConfigError) as error:
        print(f"metaseg: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
