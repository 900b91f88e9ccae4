"""The command line's shared flags: the experiment settings people change most (``--epochs``, ``--data``, ...)
and ``-p KEY VALUE`` for any other, translated into the one :class:`~metaseg_tf.config.ExperimentConfig`;
the engine and pruning-level flags; argparse types for paths and bounded numbers."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from metaseg_tf import paths
from metaseg_tf.config import ConfigError, ExperimentConfig
from metaseg_tf.inference.engines import ENGINES

# command-line flag -> ExperimentConfig field, for the settings people change most
CONFIG_FLAGS = {
    "model": "model", "data": "data_dir", "epochs": "epochs", "batch_size": "batch_size",
    "image_size": "image_size", "loss": "loss", "lr": "learning_rate", "seed": "seed",
    "devices": "devices", "max_minutes": "max_train_minutes", "filters": "filters", "sequences": "sequences",
    "target": "target", "context_slices": "context_slices",
}


def typed_path(text: str) -> Path:
    """A path typed on the command line, made absolute against the working directory."""
    return Path(text).expanduser().absolute()


def series_choice(text: str) -> tuple[str, str]:
    """An argparse type: ``t1c=UID_or_text`` (a DICOM series chosen for a sequence) -> ``("t1c", "UID_or_text")``."""
    name, _, wanted = text.partition("=")
    if not wanted or name not in ("t1c", "t1n", "t2f", "t2w"):
        raise argparse.ArgumentTypeError(f"{text!r}: write SEQUENCE=UID_or_text, SEQUENCE one of t1c, t1n, t2f, t2w")
    return name, wanted


def number(kind: type, minimum: float, strict: bool = False) -> Any:
    """An argparse type: a ``kind`` number >= ``minimum`` (> with ``strict``), else a one-line usage error."""
    def parse(text: str):
        value = kind(text)  # argparse turns the ValueError into "invalid ... value"
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {minimum:g}")
        return value
    parse.__name__ = kind.__name__
    return parse


BOOLEAN_TEXT = {"true": True, "on": True, "yes": True, "1": True, "false": False, "off": False, "no": False, "0": False}


def parse_value(key: str, text: str, defaults: dict[str, Any]):
    """A ``-p KEY VALUE`` value for the setting ``key`` whose default is ``defaults[key]``. A boolean setting
    takes true/false, on/off, yes/no or 1/0 (anything else is a :class:`ConfigError`); others take YAML scalars,
    lists and mappings (``0.5``, ``[16, 32]``, ``{a: 1}``), else the text, and YAML 1.1's ``on``/``off``/``yes``/
    ``no`` stay text there, so that ``-p jit_compile off`` means the setting ``"off"``."""
    if isinstance(defaults.get(key), bool):
        if text.strip().lower() not in BOOLEAN_TEXT:
            raise ConfigError(f"{key} is true or false, got {text!r}")
        return BOOLEAN_TEXT[text.strip().lower()]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, bool) else value


def config_defaults() -> dict[str, Any]:
    return {setting.name: setting.default for setting in dataclasses.fields(ExperimentConfig)}


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The config file (``--config``) or the defaults, then the flags, then every ``-p KEY VALUE``."""
    config = ExperimentConfig.load(args.config) if getattr(args, "config", None) else ExperimentConfig()
    changes = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items()
               if getattr(args, flag, None) is not None}
    if getattr(args, "data", None) is not None:
        changes["data_dir"] = str(args.data)
    if getattr(args, "init_from", None) is not None:
        changes["init_from"] = str(args.init_from)
    if getattr(args, "no_clahe", False):
        changes["clahe"] = False
    for key, value in getattr(args, "param", None) or []:
        changes[key] = parse_value(key, value, config_defaults())
    return config.replace(**changes) if changes else config


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=typed_path, help="ExperimentConfig as JSON or YAML (flags override it)")
    parser.add_argument("--model", help="unet, nested_unet or attention_unet")
    parser.add_argument("--data", type=typed_path, help="data folder (any supported layout)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--image-size", type=int, help="side in pixels, a multiple of 16")
    parser.add_argument("--filters", type=int, nargs="+", help="filters per level, e.g. 16 32 64 128 256")
    parser.add_argument("--loss", help="bce, dice, dice_batch, bce_dice, focal, tversky or focal_tversky")
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--devices", type=int, help="data-parallel devices (MirroredStrategy / DataParallel)")
    parser.add_argument("--max-minutes", type=float, help="stop training after this many minutes")
    parser.add_argument("--no-clahe", action="store_true", help="switch CLAHE off")
    parser.add_argument("--sequences", nargs="+", help="volume layouts: sequences in channel order, e.g. t1c t2f t1n")
    parser.add_argument("--target", help="any, wt, tc, et, labels:1,3 or multilabel (volume layouts' regions)")
    parser.add_argument("--context-slices", type=int, help="2.5D: neighbouring slices on each side as channels")
    parser.add_argument("--init-from", type=typed_path, metavar="RUN",
                        help="start from this run's trained weights (fine-tuning; input channels adapted, "
                             "metaseg_tf.training.transfer)")
    parser.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                        help="any other ExperimentConfig field, e.g. -p lr_schedule cosine")


def add_process_flags(parser: argparse.ArgumentParser) -> None:
    """Several processes (hosts) training together under JAX (:mod:`metaseg_tf.training.processes`)."""
    group = parser.add_argument_group("several processes (JAX backend; or KERAS_DISTRIBUTION_* / a SLURM step)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="where process 0 listens for the others")
    group.add_argument("--num-processes", type=number(int, 1), help="processes training together")
    group.add_argument("--process-id", type=number(int, 0), help="this process, 0 to N-1 (0 writes the run folder)")
    group.add_argument("--coordinator-timeout", type=number(float, 1), metavar="SECONDS",
                       help="end with an error if the processes are not all there after this long (default 300)")


def add_runs_root_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-root", type=typed_path, default=paths.resolve(paths.RUNS_ROOT),
                        help=f"where run folders go (default: {paths.RUNS_ROOT} in the project)")


def add_engine_flags(parser: argparse.ArgumentParser, engine_help: str, level_note: str = "") -> None:
    parser.add_argument("--engine", default="keras", choices=ENGINES, help=engine_help)
    parser.add_argument("--level", type=int, help=LEVEL_HELP + level_note)


LEVEL_HELP = ("U-Net++ pruned to this level (1 = shallowest head; faster, usually less accurate; default: the whole "
              "network, Zhou et al. 2019, section III-C)")
