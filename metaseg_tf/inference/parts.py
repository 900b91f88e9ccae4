"""Prediction spread over processes, as nnU-Net's ``-num_parts/-part_id``: part ``I`` of ``N`` predicts every
``N``-th unit of work from the ``I``-th (0-based), so a job array (SLURM ``--array=0-N``, a Kubernetes Indexed
Job) runs the parts on different nodes into one shared predictions folder, and together they write exactly
the files one process would.

The unit is a case: a volume case, or the slices of one ``<case>_<n>`` case of a folder (a 2.5D model reads a
slice with its neighbours, which must be in the same part). Case names that two inputs share are made
unique over all inputs before the split, as one process does.

The shared folder holds ``parts.json`` (how many parts, which run, which inputs, the label convention: a part
of another request is refused, :class:`~metaseg_tf.config.ConfigError`) and ``parts/part-I-of-N.json`` (that
part's rows of ``predictions.csv``, with their place in it). The part that finds all ``N`` there, under a lock,
writes ``predictions.csv``, row for row what one process writes. A part that is already in the folder is not
predicted again (run again, it only finishes: writes ``predictions.csv`` if it is due; delete its json to
predict it again); a part killed mid-way wrote none and is simply run again.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from metaseg_tf.config import ConfigError
from metaseg_tf.runs.folders import hold_run_lock

@dataclass(frozen=True)
class Part:
    """Part ``index`` (0-based) of ``count``."""

    count: int
    index: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"--part-id must lie in [0, {self.count - 1}] for --num-parts {self.count}, "
                              f"got {self.index}")

    @property
    def name(self) -> str:
        return f"part-{self.index}-of-{self.count}"

    def takes(self, units: Sequence[Hashable]) -> list[bool]:
        """For each item, whether this part predicts it: the items' units (case keys, in input order) are
        numbered by first appearance and dealt round-robin over the parts."""
        numbers: dict[Hashable, int] = {}
        for unit in units:
            numbers.setdefault(unit, len(numbers))
        return [numbers[unit] % self.count == self.index for unit in units]


def open_shared(out_dir: Path, part: Part, request: dict[str, Any]) -> Path:
    """The shared predictions folder ``out_dir`` for ``part`` of ``request`` (created with its
    ``parts.json`` by the first part to come); refuses a folder of another request and a part already done."""
    (out_dir / "parts").mkdir(parents=True, exist_ok=True)
    record = {"num_parts": part.count, **request}
    with hold_run_lock(out_dir, "parts.lock", "joined by another part", wait=True):
        recorded_path = out_dir / "parts.json"
        if recorded_path.is_file():
            recorded = json.loads(recorded_path.read_text())
            # a key one side lacks counts as unset (None): parts.json written before an option existed still joins
            differing = sorted(key for key in {*record, *recorded} if record.get(key) != recorded.get(key))
            if differing:
                raise ConfigError(f"{out_dir} holds the parts of another prediction ({', '.join(differing)} differ): "
                                  "choose another --out")
        elif any(path.name != "parts" and not path.name.endswith(".lock") for path in out_dir.iterdir()):
            raise ConfigError(f"{out_dir} is not empty and holds no parts of a prediction: choose another --out")
        else:
            recorded_path.write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def part_done(out_dir: Path, part: Part) -> bool:
    """Whether ``part``'s rows are already in the shared folder (it is then not predicted again)."""
    return (out_dir / "parts" / f"{part.name}.json").is_file()


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)  # NumPy scalars; anything else as text


def finish_part(out_dir: Path, part: Part, rows: list[tuple[tuple, dict[str, Any]]] | None) -> list[dict] | None:
    """Write this part's ``rows`` (``(place in predictions.csv, row)``; None: they are there already) and, if
    every part is now there and no part wrote it yet, ``predictions.csv`` from all of them in that order,
    built as one process builds it; returns all rows when it wrote it, else None."""
    done = out_dir / "parts" / f"{part.name}.json"
    if rows is not None:
        partial = done.with_suffix(".partial")
        partial.write_text(json.dumps([[list(order), row] for order, row in rows], default=_plain) + "\n")
        partial.rename(done)
    with hold_run_lock(out_dir, "parts.lock", "joined by another part", wait=True):
        paths = [out_dir / "parts" / f"{Part(part.count, k).name}.json" for k in range(part.count)]
        if not all(path.is_file() for path in paths) or (out_dir / "predictions.csv").is_file():
            return None
        every = sorted((entry for path in paths for entry in json.loads(path.read_text())), key=lambda e: e[0])
        merged = [row for _, row in every]
        partial = out_dir / ".predictions.csv.partial"
        pd.DataFrame(merged).to_csv(partial, index=False)
        partial.rename(out_dir / "predictions.csv")  # whole or not at all
    return merged
