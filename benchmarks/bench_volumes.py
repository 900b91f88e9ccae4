"""Benchmark: volume preprocessing throughput, NIfTI volumes against the same data as PNG slices.

Prints one table, measured in one run on one machine. A BraTS-layout phantom (``<case>/<case>-{t1c,t1n,t2f,
t2w,seg}.nii.gz``, int16 volumes, gzip) is generated, and the same voxels are written as PNG slices in the
kaggle_3m layout: for each case, each canonical axial slice of ``read_case(case, ("t1c", "t2f", "t1n"))``
(``float32`` in ``[0, 1]``, windowed per volume) becomes ``<case>/<case>_<z>.png`` (uint8 RGB, PNG level
``--png-level``) and its labels ``> 0`` become ``<case>/<case>_<z>_mask.png`` (0/255). Both paths so read
identical pixels; what differs is the container (gzip'd NIfTI volumes against one PNG per slice) and the
intensity window: the volume path windows each volume per sequence (0.5th-99.5th percentile of the brain),
the PNG path stretches each slice per channel to its own min-max.

Rows, slices/s as median (min-max) over ``--repeats`` rounds, the two paths alternated within each round
(the first of them swapped every round) so machine drift cancels; every file is in the OS page cache, so no
disk I/O is measured:

* ``preprocess (cold)``: ``preprocess_volumes`` on the NIfTI folder against ``preprocess_dataset`` on the PNG
  folder, no cache, one ``ExperimentConfig(image_size=..., clahe=True)`` (3 sequences / 3 channels): read +
  window + CLAHE + resize.
* ``decode only``: ``read_case`` (gunzip, decode, reorient, window per volume, labels) against
  ``read_image`` + ``read_mask`` for every PNG pair.
* ``codec only``: nibabel's ``get_fdata`` of the three sequence files plus the label map's ``dataobj``
  against ``cv2.imread`` of every PNG pair, no conversion.

The ratio column is volume / PNG of the medians (> 1: the volumes are faster).

Usage: ``python benchmarks/bench_volumes.py [--patients 6 --slices 24 --size 240 --image-size 128
--repeats 3 --png-level 1]``.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.data.discover import discover_pairs
from metaseg_tf.data.io import read_image, read_mask
from metaseg_tf.data.layouts import discover_volumes
from metaseg_tf.data.preprocess import preprocess_dataset, preprocess_volumes
from metaseg_tf.data.synthetic import generate_phantom
from metaseg_tf.data.volumes import read_case
from metaseg_tf.environment import machine_description

SEQUENCES = ("t1c", "t2f", "t1n")


def _bytes(files: list[Path]) -> int:
    return sum(path.stat().st_size for path in files)


def _write_png_slices(volume_report, out: Path, level: int) -> int:
    """The canonical axial slices of every case as kaggle_3m PNG pairs; returns the number of slices."""
    count = 0
    for case in volume_report.cases:
        volume = read_case(case, SEQUENCES)
        case_dir = out / case.case_id
        case_dir.mkdir(parents=True)
        images = np.round(np.clip(volume.images, 0.0, 1.0) * 255.0).astype(np.uint8)
        for z, (image, labels) in enumerate(zip(images, volume.labels)):
            stem = case_dir / f"{case.case_id}_{z}"
            cv2.imwrite(f"{stem}.png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, level])
            cv2.imwrite(f"{stem}_mask.png", (labels > 0).astype(np.uint8) * 255, [cv2.IMWRITE_PNG_COMPRESSION, level])
            count += 1
    return count


def _timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def _decode_volumes(report) -> int:
    return sum(len(read_case(case, SEQUENCES).images) for case in report.cases)


def _decode_pngs(report) -> int:
    for pair in report.pairs:
        read_image(pair.image_path, 3)
        read_mask(pair.mask_path)
    return len(report.pairs)


def _codec_volumes(report) -> int:
    import nibabel as nib

    slices = 0
    for case in report.cases:
        for name in SEQUENCES:
            data = nib.load(str(case.sequences[name].path)).get_fdata(dtype=np.float32)
        np.asarray(nib.load(str(case.labels.path)).dataobj)
        slices += data.shape[2]  # BraTS stores slices last; the phantom's axial axis is the third
    return slices


def _codec_pngs(report) -> int:
    for pair in report.pairs:
        cv2.imread(str(pair.image_path), cv2.IMREAD_UNCHANGED)
        cv2.imread(str(pair.mask_path), cv2.IMREAD_UNCHANGED)
    return len(report.pairs)


def _cell(rates: list[float]) -> str:
    return f"{np.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--slices", type=int, default=24, help="axial slices per volume")
    parser.add_argument("--size", type=int, default=240, help="phantom in-plane size, voxels")
    parser.add_argument("--image-size", type=int, default=128, help="network input size")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, the two paths alternated")
    parser.add_argument("--png-level", type=int, default=1, help="PNG zlib level (the phantom's kaggle_3m: 1)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        generate_phantom(root / "nifti", args.patients, args.slices, args.size, seed=0, progress=False,
                         layout="brats_mets")
        volumes = discover_volumes(root / "nifti")
        n_slices = _write_png_slices(volumes, root / "png", args.png_level)
        pairs = discover_pairs(root / "png")
        assert len(pairs.pairs) == n_slices, (len(pairs.pairs), n_slices)

        nifti_all = sorted(p for p in (root / "nifti").rglob("*.nii.gz"))
        nifti_read = [p for p in nifti_all if p.name.endswith(tuple(f"-{s}.nii.gz" for s in (*SEQUENCES, "seg")))]
        png_all = sorted((root / "png").rglob("*.png"))
        disk = {"nifti": _bytes(nifti_all), "nifti_read": _bytes(nifti_read), "png": _bytes(png_all)}

        config = ExperimentConfig(image_size=args.image_size, clahe=True, cache_dir=str(root / "cache"))
        steps = {
            "preprocess, cold (read + window + CLAHE + resize)": (
                lambda: len(preprocess_volumes(volumes, config, use_cache=False, progress=False)),
                lambda: len(preprocess_dataset(pairs, config, use_cache=False, progress=False)),
            ),
            "decode only (`read_case` / `read_image` + `read_mask`)": (
                lambda: _decode_volumes(volumes), lambda: _decode_pngs(pairs)),
            "codec only (nibabel `get_fdata` / `cv2.imread`)": (
                lambda: _codec_volumes(volumes), lambda: _codec_pngs(pairs)),
        }
        rates = {name: ([], []) for name in steps}
        for round_ in range(args.repeats):
            order = (0, 1) if round_ % 2 == 0 else (1, 0)
            for name, functions in steps.items():
                for side in order:
                    seconds, count = _timed(functions[side])
                    assert count == n_slices, (name, side, count, n_slices)
                    rates[name][side].append(count / seconds)

        volume_set = preprocess_volumes(volumes, config, use_cache=False, progress=False)
        png_set = preprocess_dataset(pairs, config, use_cache=False, progress=False)
        difference = np.abs(volume_set.images.astype(np.int16) - png_set.images.astype(np.int16))
        masks_equal = bool(np.array_equal(volume_set.masks > 0, png_set.masks > 0))

    table = pd.DataFrame(
        [(name, _cell(vol), _cell(png), f"{np.median(vol) / np.median(png):.2f}")
         for name, (vol, png) in rates.items()],
        columns=["slices/s, median (min-max)", "NIfTI volumes", "PNG slices", "volume / PNG"],
    )
    print(f"machine: {machine_description()}; Python {platform.python_version()}, NumPy {np.__version__}, "
          f"OpenCV {cv2.__version__}")
    print(f"data: {args.patients} cases x {args.slices} slices at {args.size} px = {n_slices} slices, "
          f"3 sequences ({', '.join(SEQUENCES)}), network input {args.image_size} px, CLAHE on, "
          f"{args.repeats} rounds")
    print(f"on disk: NIfTI {disk['nifti'] / 1e6:.2f} MB ({len(nifti_all)} .nii.gz files, t2w included; "
          f"{disk['nifti_read'] / 1e6:.2f} MB read: 3 sequences + seg), PNG {disk['png'] / 1e6:.2f} MB "
          f"({len(png_all)} files, zlib level {args.png_level})")
    print(f"outputs: mean |volume - PNG| {difference.mean():.2f} grey levels (max {difference.max()}) from the "
          f"per-volume against per-slice window; masks identical: {masks_equal}")
    print()
    print(table.to_markdown(index=False, colalign=("left", "right", "right", "right")))


if __name__ == "__main__":
    main()
