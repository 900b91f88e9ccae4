#!/usr/bin/env bash
# Wheels for a GPU host with Python 3.12 and JAX but no TensorFlow (an image like this project's lent H200
# hosts, which hold numpy, scipy, pandas, scikit-image, OpenCV, matplotlib, h5py and JAX): what
# `KERAS_BACKEND=jax metaseg pipeline --profile gpu` needs and such a host lacks, for a host that cannot
# download (README, "On a GPU host").
#
#   bash scripts/gpu_wheels.sh [DEST]        # DEST defaults to .whl/ (git-ignored); prints its size
#
# The versions of Keras, nibabel and papermill are the ones installed in .venv/ here (tested together);
# everything they pull in is resolved by pip for CPython 3.12 on manylinux x86-64, and the wheels of projects
# the host already holds are removed again (two versions of one package break the install there).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PIP="${PIP:-$ROOT/.venv/bin/python -m pip}"
# Projects the host image already has (its package list, .library/device/KINDS.md), normalised names.
HOST_HAS="absl-py attrs certifi charset-normalizer click cloudpickle contourpy cycler filelock fonttools fsspec
h5py idna imageio jax jaxlib jinja2 joblib kiwisolver lazy-loader markdown markdown-it-py markupsafe matplotlib
mdurl ml-dtypes numpy opencv-python-headless packaging pandas pillow platformdirs protobuf psutil pygments
pyparsing python-dateutil pytz pyyaml requests rich scikit-image scikit-learn scipy setuptools six tabulate
threadpoolctl tifffile tqdm typing-extensions tzdata urllib3 wheel"

installed() { $PIP show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
pins=()
for project in keras nibabel papermill ipykernel nbclient; do
    version="$(installed "$project")"
    pins+=("$project${version:+==$version}")
done

mkdir -p "$DEST"
echo "downloading ${pins[*]} and what they need, for CPython 3.12 manylinux x86-64, into $DEST"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
$PIP download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    "${platforms[@]}" -d "$DEST" "${pins[@]}"

removed=0
for wheel in "$DEST"/*.whl; do
    project="$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]_.' '[:lower:]--')"
    if [[ " $(echo $HOST_HAS) " == *" $project "* ]]; then
        rm -f "$wheel"
        removed=$((removed + 1))
    fi
done
echo "$(ls "$DEST"/*.whl | wc -l) wheels kept ($removed the host already has removed), $(du -sh "$DEST" | cut -f1) in all"
