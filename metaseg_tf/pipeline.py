"""The main job: the numbered notebooks executed in order with papermill, into one new results folder.

:func:`run_pipeline` makes ``<out_root>/<timestamp>-<profile>/``, passes every notebook the same parameters
(a profile's preset, overridden by the caller's), executes ``notebooks/01_*.ipynb`` .. ``05_*.ipynb`` headless
and writes ``report.md``, which links the executed notebooks, the figures, the metrics and the trained models'
run folders. A failing notebook stops the pipeline with :class:`PipelineError` naming the notebook and the
cell; the partially executed notebook is kept for inspection.

A pipeline that was killed or failed is continued by the same command (same profile and parameters): the
notebooks it finished are kept, not run again, and a training that was cut short resumes from its last epoch
(a notebook cut short after its training finished runs again whole) (:func:`~metaseg_tf.training.train.train` finds its unfinished run). A finished pipeline
is never touched: the same command then makes a new folder, as ``resume=False`` always does. While it runs,
a pipeline holds ``pipeline.lock`` in its folder, so two processes never work in one.

Profiles (presets of the notebooks' parameters):

* ``smoke`` - a tiny phantom, 32 px, two epochs: seconds per notebook, for CI;
* ``cpu`` (default) - the default (BraTS-layout) phantom at 64 px: the whole run takes 5-10 minutes on two cores
  and the masks are meaningful; TensorFlow compiles with XLA on a CPU where that trains twice as fast;
* ``gpu`` - 256 px, wide filters, up to 100 epochs, mixed precision and XLA where they help, the CLAHE
  ablation included. On a host with JAX but no TensorFlow run it with ``KERAS_BACKEND=jax``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaseg_tf import paths
from metaseg_tf.config import ConfigError, ExperimentConfig
from metaseg_tf.data.synthetic import DEFAULT_PHANTOMS, default_phantom
from metaseg_tf.environment import cpu_prefers_xla
from metaseg_tf.paths import NOTEBOOKS_DIR, PROJECT_ROOT, resolve
from metaseg_tf.runs.folders import RunLockedError, create_run_dir, hold_run_lock, read_json, write_json


class PipelineError(RuntimeError):
    """A notebook of the pipeline failed; the message names the notebook, the cell and the error."""


@dataclass(frozen=True)
class PipelineProfile:
    """A preset of the notebooks' parameters; ``smoke`` profiles use the tiny phantoms when no data folder is
    given (:data:`~metaseg_tf.data.synthetic.SMOKE_PHANTOMS`), the others the default ones. ``real_data``
    replaces parameters (``config_overrides`` key by key) when a data folder is given."""

    description: str
    parameters: dict[str, Any]
    smoke: bool = False
    real_data: dict[str, Any] = field(default_factory=dict)
    xla_where_faster: bool = False  # jit_compile "on" where cpu_prefers_xla(), before the user's overrides


# The parameters every numbered notebook declares in its `parameters` cell, with their interactive defaults.
NOTEBOOK_PARAMETERS: dict[str, Any] = {
    "data_dir": "", "phantom": "brats_mets", "out_dir": paths.INTERACTIVE_DIR, "backend": "", "target": "tc",
    "image_size": 64, "epochs": 30, "batch_size": 16, "filters": [8, 16, 32, 64, 128], "seed": 0, "clahe": True,
    "max_train_minutes": 0.0, "clahe_ablation": False, "config_overrides": {}, "progress": True,
}

# From the recipe ablations on the real LGG MRI (results/lgg_recipe/): flip TTA at inference helped there and
# costs one more prediction. Their cosine learning-rate decay is the cpu profile's for a real data folder only
# (REAL_DATA_RECIPE): on the phantom of the main job it cost U-Net++ 0.895 -> 0.779 per-patient Dice (same seed;
# results/lgg_recipe/README.md).
RECIPE: dict[str, Any] = {"flip_tta": True}
# The cross-validated LGG recipe (results/lgg_recipe/recipe.yml; a test keeps the two equal): the cpu profile's
# settings for a real data folder, where 64 px and a plateau schedule waste what a 2-core CPU can learn.
REAL_DATA_RECIPE: dict[str, Any] = {"image_size": 128, "epochs": 15,
                                    "config_overrides": {"lr_schedule": "cosine", "warmup_epochs": 1}}

PROFILES: dict[str, PipelineProfile] = {
    "smoke": PipelineProfile(
        "seconds per notebook: proves the pipeline runs (CI)",
        {"image_size": 32, "epochs": 2, "batch_size": 8, "filters": [4, 8, 16, 32, 64], "clahe_ablation": True,
         "config_overrides": {"jit_compile": "off", "test_fraction": 0.25}}, smoke=True),
    "cpu": PipelineProfile(
        "the default: 5-10 minutes on a 2-core laptop, meaningful masks on the phantom; with --data, the "
        "LGG recipe (128 px, 15 epochs, cosine decay)",
        {"image_size": 64, "epochs": 30, "batch_size": 16, "filters": [8, 16, 32, 64, 128],
         "config_overrides": dict(RECIPE)}, real_data=REAL_DATA_RECIPE, xla_where_faster=True),
    "gpu": PipelineProfile(
        "full size on a GPU host: 256 px, filters 32-512, up to 100 epochs, CLAHE ablation",
        {"image_size": 256, "epochs": 100, "batch_size": 16, "filters": [32, 64, 128, 256, 512],
         "clahe_ablation": True, "config_overrides": {**RECIPE, "early_stopping_patience": 15}}),
}


@dataclass
class PipelineRun:
    """Where a pipeline run was written and its report."""

    out_dir: Path
    report: Path
    seconds: dict[str, float]


def notebooks(notebooks_dir: Path | str = NOTEBOOKS_DIR) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) of ``notebooks_dir`` in order."""
    found = sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise PipelineError(f"no numbered notebooks (NN_name.ipynb) in {notebooks_dir}")
    return found


def pipeline_parameters(profile: str = "cpu", data_dir: str | Path | None = None,
                        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parameters the notebooks receive: the profile's preset, then ``overrides``; checked by building
    the :class:`ExperimentConfig` they describe, so a bad value fails before any notebook runs.
    ``overrides["config_overrides"]`` is merged key by key into the profile's own (a field set there
    replaces the profile's value of that field only), so ``-p config_overrides '{"loss": "dice"}'`` keeps
    the profile's flip TTA. A profile with ``xla_where_faster`` (``cpu``) trains with XLA (``jit_compile``
    ``on``) on a CPU where it measured twice as fast (:func:`~metaseg_tf.environment.cpu_prefers_xla`: AVX2
    without AVX512); the run's config records it."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(NOTEBOOK_PARAMETERS))
    if unknown:
        raise ConfigError(f"unknown pipeline parameter(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(NOTEBOOK_PARAMETERS))}")
    preset, real = PROFILES[profile].parameters, PROFILES[profile].real_data
    if real and (data_dir is not None or overrides.get("data_dir")):
        preset = {**preset, **real, "config_overrides": {**preset.get("config_overrides", {}),
                                                         **real.get("config_overrides", {})}}
    config_overrides = {**preset.get("config_overrides", {}), **overrides.get("config_overrides", {})}
    backend = overrides.get("backend") or preset.get("backend") or os.environ.get("KERAS_BACKEND") or "tensorflow"
    if PROFILES[profile].xla_where_faster and backend == "tensorflow" and config_overrides.get("devices", 1) == 1 \
            and cpu_prefers_xla():
        # measured with TensorFlow on one device only (under JAX Keras compiles anyway; torch would mean
        # torch.compile; several devices mean MirroredStrategy, where Keras keeps XLA off); the user's own wins
        config_overrides.setdefault("jit_compile", "on")
    parameters = {**NOTEBOOK_PARAMETERS, **preset, **overrides, "progress": False, "config_overrides": config_overrides}
    if data_dir is not None:
        parameters["data_dir"] = str(resolve(data_dir))
    fields = {name: parameters[name] for name in ("image_size", "epochs", "batch_size", "filters", "seed",
                                                  "clahe", "max_train_minutes", "target")}
    if parameters["phantom"] not in DEFAULT_PHANTOMS:
        raise ConfigError(f"unknown phantom {parameters['phantom']!r}; choose one of {', '.join(DEFAULT_PHANTOMS)}")
    ExperimentConfig.from_dict({**fields, **parameters["config_overrides"]})
    return parameters


def _kernel_output_only(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return bool(message.strip()) and not message.startswith(("Executing Cell", "Ending Cell", "Executing notebook",
                                                             "Input Notebook", "Output Notebook", "Black is not"))


def _papermill_logging(enabled: bool) -> None:
    """Stream the kernels' output (one line per training epoch) to the terminal while notebooks run."""
    logger = logging.getLogger("papermill")
    if enabled and not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("    %(message)s"))
        handler.addFilter(_kernel_output_only)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


LOCK_FILE = "pipeline.lock"


def _unfinished_pipelines(out_root: Path, profile: str, parameters: dict[str, Any]) -> list[Path]:
    """Folders under ``out_root``, newest first, of pipelines with ``profile`` and ``parameters`` (all but
    ``out_dir``) that were killed or failed."""
    wanted = {key: value for key, value in parameters.items() if key != "out_dir"}
    found = []
    for folder in sorted(out_root.glob(f"*-{profile}*"), reverse=True):  # new_dir may add "-2"
        try:
            record = read_json(folder / "pipeline.json")
        except (OSError, ValueError):
            continue
        recorded = {key: value for key, value in record.get("parameters", {}).items() if key != "out_dir"}
        if record.get("status") in ("running", "failed") and record.get("profile") == profile and recorded == wanted:
            found.append(folder)
    return found


def run_pipeline(
    profile: str = "cpu",
    data_dir: str | Path | None = None,
    out_root: str | Path = paths.PIPELINE_ROOT,
    overrides: dict[str, Any] | None = None,
    notebooks_dir: str | Path = NOTEBOOKS_DIR,
    progress: bool = True,
    resume: bool = True,
) -> PipelineRun:
    """Execute the numbered notebooks with papermill into a new folder under ``out_root``, or continue a killed
    or failed pipeline of the same profile and parameters there (``resume``); see the module docstring.
    ``data_dir`` ``None`` uses the synthetic phantom of the ``phantom`` parameter (``brats_mets``, the default,
    or ``kaggle_3m``; generated on first use)."""
    from metaseg_tf.environment import environment_info

    parameters = pipeline_parameters(profile, data_dir, overrides)
    preset = PROFILES[profile]
    if data_dir is None:
        summary = default_phantom(parameters["phantom"], smoke=preset.smoke, progress=progress)
        parameters["data_dir"] = str(summary.root)
        print(f"data: synthetic {parameters['phantom']} phantom in {summary.root} "
              f"({'reused' if summary.reused else 'generated'})")
    if "backend" not in (overrides or {}):
        parameters["backend"] = os.environ.get("KERAS_BACKEND", "")
    out_root = resolve(out_root)
    with contextlib.ExitStack() as held:
        for candidate in _unfinished_pipelines(out_root, profile, parameters) if resume else []:
            try:
                held.enter_context(hold_run_lock(candidate, LOCK_FILE, "run by a pipeline"))
            except RunLockedError:
                continue  # a live process works there
            record = read_json(candidate / "pipeline.json")
            if record.get("status") not in ("running", "failed"):  # it finished while this process looked
                held.close()
                continue
            return _execute(candidate, record, notebooks_dir, progress, continued=True)
        out_dir = create_run_dir(out_root, profile)
        held.enter_context(hold_run_lock(out_dir, LOCK_FILE, "run by a pipeline"))
        parameters["out_dir"] = str(out_dir)
        record = {"profile": profile, "description": preset.description, "parameters": parameters,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "status": "running", "seconds": {},
                  "environment": environment_info()}
        write_json(out_dir / "pipeline.json", record)
        return _execute(out_dir, record, notebooks_dir, progress, continued=False)


def _execute(out_dir: Path, record: dict[str, Any], notebooks_dir: str | Path, progress: bool,
             continued: bool) -> PipelineRun:
    """Run the notebooks ``record`` has not finished into ``out_dir`` (held by this process); the report."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    parameters = record["parameters"]
    if continued:
        record["resumed"] = record.get("resumed", 0) + 1
        record["status"] = "running"
        for key in ("failed_notebook", "failed_cell", "error"):
            record.pop(key, None)
        write_json(out_dir / "pipeline.json", record)
        print(f"pipeline ({record['profile']}) continues in {out_dir}: "
              f"{len(record['seconds'])} notebook(s) already done")
    else:
        print(f"pipeline ({record['profile']}: {record['description']}) -> {out_dir}")
    _papermill_logging(progress)
    ordered = notebooks(notebooks_dir)
    for number, notebook in enumerate(ordered, start=1):
        executed = out_dir / "notebooks" / notebook.name
        executed.parent.mkdir(parents=True, exist_ok=True)
        if notebook.stem in record["seconds"] and executed.is_file():
            print(f"[{number}/{len(ordered)}] {notebook.stem}: done in an earlier call, kept")
            continue
        print(f"[{number}/{len(ordered)}] {notebook.stem}")
        started = time.perf_counter()
        try:
            papermill.execute_notebook(str(notebook), str(executed), parameters=parameters, kernel_name="python3",
                                       cwd=str(PROJECT_ROOT), progress_bar=False, log_output=progress)
        except PapermillExecutionError as error:
            record.update(status="failed", failed_notebook=notebook.name, failed_cell=error.exec_count,
                          error=f"{error.ename}: {error.evalue}")
            write_json(out_dir / "pipeline.json", record)
            first_line = next((line for line in error.source.splitlines() if line.strip()), "")
            raise PipelineError(
                f"{notebook.name} failed in cell {error.exec_count} ({first_line.strip()[:60]}): {error.ename}: "
                f"{error.evalue}; the partly executed notebook is kept in {executed}") from None
        record["seconds"][notebook.stem] = round(time.perf_counter() - started, 1)
        write_json(out_dir / "pipeline.json", record)
    record.update(status="finished", finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json(out_dir / "pipeline.json", record)
    report = write_report(out_dir)
    print(f"report: {report}")
    return PipelineRun(out_dir, report, record["seconds"])


def _relative_links(markdown: str, prefix: str) -> str:
    """Rewrite ``](file)`` image links of a markdown file so they resolve from the report's folder."""
    return markdown.replace("](", f"]({prefix}/").replace(f"]({prefix}/http", "](http")


def _machine_line(environment: dict, parameters: dict) -> str:
    """Which machine, libraries and compilation made the numbers: float results differ in their last digits
    between CPUs, library builds and XLA, and a few hundredths of Dice after training (README,
    "Reproducibility")."""
    packages = environment.get("packages", {})
    versions = ", ".join(f"{name} {packages[name]}" for name in ("keras", "tensorflow", "jax", "numpy") if name in packages)
    xla = parameters.get("config_overrides", {}).get("jit_compile", "auto")
    return (f"Made on {environment.get('cpu_count', '?')} CPUs, {environment.get('cpu_model', 'CPU not recorded')}; "
            f"{versions}; oneDNN optimisations {environment.get('tf_enable_onednn_opts', 'not recorded')}; XLA "
            f"(jit_compile) {xla}. Two runs on one machine give the same numbers; another machine may differ (README, "
            "Reproducibility).")


def _lesion_lines(folder: Path, prefix: str) -> list[str]:
    """The lesion counts per test patient and region, truth beside each model (notebook 05's
    ``lesions_per_case.csv``), as report lines; none when the notebook wrote no lesion table."""
    import pandas as pd

    if not (folder / "lesions_per_case.csv").is_file():
        return []
    per_case = pd.read_csv(folder / "lesions_per_case.csv")
    counts = per_case.pivot_table(index=["case_id", "region"], columns="source", values="lesions", fill_value=0,
                                  sort=False).astype(int)
    return ["## Lesions on the test patients", "",
            "Lesions (26-connected) per patient and region, in the truth and in each model's masks; every lesion with "
            f"its volume and largest axial diameter: [`lesions.csv`]({prefix}/lesions.csv).", "",
            counts.reset_index().to_markdown(index=False), ""]


def write_report(out_dir: Path | str) -> Path:
    """``report.md`` of a pipeline folder: conclusion, comparison, figures, notebooks and files, linked."""
    out_dir = Path(out_dir)
    record = read_json(out_dir / "pipeline.json")
    parameters = record["parameters"]
    lines = [f"# metaseg-tf pipeline run `{out_dir.name}`", "",
             f"Profile **{record['profile']}** ({record['description']}); data `{parameters['data_dir']}`; "
             f"Keras backend {record['environment'].get('keras_backend', '?')}; started {record['started']}, "
             f"status {record['status']}.", "",
             _machine_line(record["environment"], parameters), "",
             "| notebook | seconds |", "|---|---|",
             *(f"| [{name}](notebooks/{name}.ipynb) | {seconds} |" for name, seconds in record["seconds"].items()),
             ""]
    comparisons = sorted((out_dir / "comparison").glob("comparison-test*/comparison.md"))
    if comparisons:
        folder = comparisons[-1].parent
        prefix = folder.relative_to(out_dir).as_posix()
        if (folder / "conclusion.md").is_file():
            lines += ["## Conclusion", "", (folder / "conclusion.md").read_text(), ""]
        body = comparisons[-1].read_text().replace("# Comparison", "## Comparison", 1)
        lines += [_relative_links(body, prefix), ""]
        lines += _lesion_lines(folder, prefix)
    ablations = sorted((out_dir / "clahe_ablation").glob("comparison-test*/comparison.md"))
    if ablations:
        prefix = ablations[-1].parent.relative_to(out_dir).as_posix()
        body = ablations[-1].read_text().replace("# Comparison", "## CLAHE ablation: comparison", 1)
        lines += [_relative_links(body, prefix), ""]
    figures = sorted((out_dir / "figures").glob("*.png"))
    if figures:
        lines += ["## Figures", ""]
        lines += [f"### {figure.stem}\n\n![{figure.stem}](figures/{figure.name})\n" for figure in figures]
    runs = sorted(p.parent for p in (out_dir / "runs").glob("*/state.json"))
    if runs:
        lines += ["## Trained models", "", *(f"* [`{run.name}`](runs/{run.name}/) (`best.keras`, `last.keras`, "
                                            f"`history.csv`, `config.json`)" for run in runs), ""]
    lines += ["## Parameters", "", "```json", json.dumps(parameters, indent=2), "```", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
