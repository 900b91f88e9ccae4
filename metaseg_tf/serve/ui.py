"""The web front end (Streamlit): upload a slice, see both models' masks beside the image and the truth.

Three input modes: a **2D slice** (TIFF, PNG, JPEG, BMP, WebP, a DICOM file; optionally its mask) sent to
``/predict``, a **NIfTI volume** (``.nii`` / ``.nii.gz``: one volume for every sequence, or one per sequence of
the model in its order; optionally the case's label map) sent to ``/predict/volume``, or a **DICOM series** (a
study's files, or one zip; optionally which series is which sequence) sent to ``/predict/dicom``, whose answer
adds the series found and each model's DICOM SEG to download. A volume is shown one axial slice at
a time: a slider walks the slices from inferior to superior, each shown as a radiologist sees it (anterior
at the top, the patient's right on the left: :func:`metaseg_tf.data.volumes.to_canonical`), with the truth
and each model's mask beside it, the per-case scores when a label map was given, and each model's
``<case>-seg.nii.gz`` to download.

Run it with ``metaseg serve`` (together with the API) or ``streamlit run metaseg_tf/serve/ui.py``; it talks
to the prediction API over HTTP at ``METASEG_API_URL`` (fixed when set, as ``metaseg serve`` sets it, so
nobody can point this server at another address; otherwise ``http://127.0.0.1:8000``, changeable in the
sidebar) and says so in a banner when the API cannot be reached. When the API was started with an access token
(:mod:`metaseg_tf.serve.guard`), the person types it in the sidebar: the UI never holds it in its environment,
so reaching the UI's port gives no access by itself. A model trained on the synthetic phantom is shown with a
banner that its masks on real scans are not meaningful. Without own data, "Try a phantom example" loads
slices of the synthetic phantom.
"""

from __future__ import annotations

import base64
import gzip
import os

import cv2
import numpy as np
import pandas as pd
import requests
import streamlit as st

from metaseg_tf import paths
from metaseg_tf.data.discover import DataError, discover_pairs
from metaseg_tf.data.io import read_image, read_mask
from metaseg_tf.data.synthetic import generate_phantom
from metaseg_tf.data.intensity import window_volume
from metaseg_tf.data.volumes import to_canonical
from metaseg_tf.evaluation.scores import overlap_scores
from metaseg_tf.serve.client import (
    DEFAULT_API_URL,
    TokenNeeded,
    fetch_models,
    request_dicom_prediction,
    request_prediction,
    request_volume_prediction,
)

UPLOAD_TYPES = ["tif", "tiff", "png", "jpg", "jpeg", "bmp", "webp", "dcm"]
VOLUME_TYPES = ["nii", "gz"]  # Streamlit checks the last extension: .nii.gz is "gz" (the API checks the content)
DICOM_TYPES = ["dcm", "zip"]
INPUT_MODES = ("2D slice", "NIfTI volume", "DICOM series")
VOLUME_SCORE_COLUMNS = {"dice": "dice", "hd95": "HD95 (mm)", "lesion_dice": "lesion-wise dice",
                        "lesion_hd95": "lesion-wise HD95 (mm)", "truth_lesions": "truth lesions",
                        "detected_lesions": "detected", "false_positive_lesions": "false positives"}
TRUTH_COLOUR, PREDICTION_COLOUR = (0, 200, 0), (230, 30, 30)


def threshold_text(threshold: float | None, predictions: list[dict]) -> str:
    """``threshold 0.40``, or each model's own threshold as the API used it."""
    if threshold is not None:
        return f"threshold {threshold:.2f}"
    return "each model's own threshold (" + ", ".join(f"{p['model']} {p['threshold']:.2f}" for p in predictions) + ")"


def decode_png(encoded: str) -> np.ndarray:
    """A base64 PNG from the API as an array (as stored: grey ``(H, W)`` or BGR colour)."""
    return cv2.imdecode(np.frombuffer(base64.b64decode(encoded), np.uint8), cv2.IMREAD_UNCHANGED)


def nifti_from_bytes(data: bytes):
    """A NIfTI-1 or NIfTI-2 image (nibabel) from a file's bytes, gzip-compressed or not; raises
    :class:`DataError` for anything else."""
    import nibabel as nib

    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        sizes = {int.from_bytes(raw[:4], order) for order in ("little", "big")} if len(raw) >= 4 else set()
        if not sizes & {348, 540}:
            raise DataError("not a NIfTI file")
        return (nib.Nifti2Image if 540 in sizes else nib.Nifti1Image).from_bytes(raw)
    except DataError:
        raise
    except Exception as error:  # gzip, zlib and nibabel raise several types for damaged files
        raise DataError(f"cannot read the NIfTI file ({error})") from error


def canonical_volume(data: bytes) -> np.ndarray:
    """The voxels of a 3D NIfTI file's bytes in the canonical orientation ``(slice, row, column)``: axial
    slices inferior to superior, rows anterior to posterior, columns the patient's right to left."""
    image = nifti_from_bytes(data)
    voxels = np.asarray(image.dataobj)
    if voxels.ndim == 4 and voxels.shape[3] == 1:
        voxels = voxels[..., 0]
    if voxels.ndim != 3:
        raise DataError(f"the NIfTI file has shape {voxels.shape}; a 3D volume is expected")
    return to_canonical(voxels, image.affine)


def decode_volume_seg(encoded: str) -> np.ndarray:
    """A ``seg_nii_gz`` of ``/predict/volume`` (base64 ``<case>-seg.nii.gz`` in the input's grid) as canonical
    ``uint8 (slice, row, column)`` labels, voxel for voxel beside :func:`canonical_volume` of the input."""
    return canonical_volume(base64.b64decode(encoded)).astype(np.uint8)


def display_volume(data: bytes) -> np.ndarray:
    """A NIfTI file's bytes as a canonical ``float32`` volume in ``[0, 1]``, windowed like the training data
    (the brain's 0.5th-99.5th percentiles), so every slice is shown on one grey scale."""
    return window_volume(canonical_volume(data))[0]


def default_slice(segs: dict[str, np.ndarray], slices: int) -> int:
    """The axial slice with the most predicted lesion (over all models), else the middle one."""
    per_slice = sum((seg.reshape(len(seg), -1) > 0).sum(axis=1) for seg in segs.values()) if segs else np.zeros(1)
    return int(np.argmax(per_slice)) if np.any(per_slice) else slices // 2


def display_image(image: np.ndarray) -> np.ndarray:
    """``uint8 (H, W, 3)`` grey rendering of a float slice (its middle channel, stretched to its range)."""
    grey = image[..., image.shape[-1] // 2] if image.ndim == 3 else image
    grey = cv2.normalize(grey.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return np.dstack([grey] * 3)


def overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], mask_only: bool) -> np.ndarray:
    """The mask over the slice (tinted fill and outline) or, with ``mask_only``, the mask alone."""
    if mask_only:
        return np.dstack([(mask > 0).astype(np.uint8) * 255] * 3)
    shown = display_image(image)
    inside = mask > 0
    shown[inside] = (0.55 * shown[inside] + 0.45 * np.asarray(colour)).astype(np.uint8)
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return cv2.drawContours(shown, contours, -1, colour, 1)


def slice_panels(image: np.ndarray, truth: np.ndarray | None, masks: dict[str, np.ndarray],
                 mask_only: bool) -> list[tuple[str, np.ndarray]]:
    """``(caption, RGB picture)`` of a slice: the original, the truth (when given) and each model's mask."""
    panels = [("original", display_image(image))]
    if truth is not None:
        panels.append(("ground truth", overlay(image, truth, TRUTH_COLOUR, mask_only)))
    return panels + [(name, overlay(image, mask, PREDICTION_COLOUR, mask_only)) for name, mask in masks.items()]


def volume_slice_panels(volume: np.ndarray, index: int, truth: np.ndarray | None, segs: dict[str, np.ndarray],
                        mask_only: bool) -> list[tuple[str, np.ndarray]]:
    """:func:`slice_panels` of canonical axial slice ``index`` of ``volume`` (truth and segs: canonical labels,
    any non-zero label is lesion)."""
    return slice_panels(volume[index], None if truth is None else truth[index] > 0,
                        {name: seg[index] > 0 for name, seg in segs.items()}, mask_only)


def lesion_rows(predictions: list[dict]) -> pd.DataFrame:
    """One row per model and predicted lesion: region, number, volume (mm³), largest axial diameter (mm) and
    the slices it spans."""
    rows = [{"model": prediction["model"], "region": lesion["region"], "lesion": lesion["lesion"],
             "volume (mm³)": None if lesion["volume_mm3"] is None else round(lesion["volume_mm3"], 1),
             "largest axial diameter (mm)": None if lesion["largest_axial_diameter_mm"] is None
             else round(lesion["largest_axial_diameter_mm"], 1),
             "centre slice": lesion["centre_slice"], "slices": f"{lesion['first_slice']}-{lesion['last_slice']}"}
            for prediction in predictions for lesion in prediction.get("lesions", [])]
    return pd.DataFrame(rows)


def volume_rows(predictions: list[dict]) -> pd.DataFrame:
    """One row per model (and region, when the API scored the case against an uploaded label map): lesion
    voxels, inference time and the per-case scores."""
    rows = []
    for prediction in predictions:
        row = {"model": prediction["model"], "lesion voxels": prediction["lesion_voxels"],
               "inference (s)": round(prediction["latency_ms"] / 1000, 2)}
        if not prediction.get("scores"):
            rows.append(row)
        for region, scores in (prediction.get("scores") or {}).items():
            rows.append({**row, "region": region, **{label: None if scores[name] is None else round(scores[name], 4)
                                                     for name, label in VOLUME_SCORE_COLUMNS.items()}})
    return pd.DataFrame(rows)


def prediction_rows(predictions: list[dict], masks: dict[str, np.ndarray], truth: np.ndarray | None) -> pd.DataFrame:
    """One row per model: lesions, area, inference time and, with a truth mask, Dice/IoU/precision/recall."""
    rows = []
    for prediction in predictions:
        row = {"model": prediction["model"], "lesions": prediction["lesions"]["count"],
               "lesion area (px)": prediction["lesions"]["total_px"], "inference (ms)": prediction["latency_ms"]}
        if truth is not None:
            scores = overlap_scores(truth > 0, masks[prediction["model"]] > 0)
            row.update({name: round(scores[name], 4) for name in ("dice", "iou", "precision", "recall")})
        rows.append(row)
    return pd.DataFrame(rows)


def phantom_examples(count: int = 4) -> list[tuple[str, bytes, bytes]]:
    """``count`` phantom slices with lesions as ``(name, image file bytes, mask file bytes)``, largest first;
    the small example phantom is generated in ``data/phantom-examples`` on first use."""
    summary = generate_phantom(paths.resolve(paths.EXAMPLE_PHANTOM_DIR), n_patients=2, n_slices=12, size=256, seed=7, progress=False)
    pairs = discover_pairs(summary.root).pairs
    areas = [int(read_mask(pair.mask_path).sum()) for pair in pairs]
    chosen = [pairs[k] for k in np.argsort(areas)[::-1][:count]]
    return [(pair.image_path.name, pair.image_path.read_bytes(), pair.mask_path.read_bytes()) for pair in chosen]


def _source() -> tuple[str, bytes, bytes | None] | None:
    """The slice to segment: the upload, else the phantom example chosen with the button."""
    upload = st.file_uploader("MRI slice", type=UPLOAD_TYPES, key="image")
    truth_upload = st.file_uploader("Ground-truth mask (optional)", type=UPLOAD_TYPES, key="truth")
    if st.button("Try a phantom example"):
        examples = phantom_examples()
        st.session_state["example"] = examples[st.session_state.get("example_index", 0) % len(examples)]
        st.session_state["example_index"] = st.session_state.get("example_index", 0) + 1
    if upload is not None:
        return upload.name, upload.getvalue(), truth_upload.getvalue() if truth_upload is not None else None
    return st.session_state.get("example")


def _show_panels(panels: list[tuple[str, np.ndarray]]) -> None:
    for column, (caption, picture) in zip(st.columns(len(panels)), panels):
        column.image(picture, caption=caption, width="stretch", alt=caption)


def _volume_mode(api_url: str, token: str | None, models: list[dict], shown_models: list[str],
                 threshold: float | None, mask_only: bool, dicom: bool = False) -> None:
    """Upload a NIfTI case (or, ``dicom``, a DICOM study: files or a zip), segment it once per change of input,
    model or threshold, and browse its slices."""
    order = next((m.get("sequences") for m in models if m["name"] in shown_models and m.get("sequences")), None)
    order_text = f" in the order {', '.join(order)}" if order else ""
    seg_upload, series = None, ""
    if dicom:
        uploads = st.file_uploader("DICOM series: the files of a study's MR series (.dcm), or one .zip of them",
                                   type=DICOM_TYPES, accept_multiple_files=True, key="dicom")
        series = st.text_input("Series for each sequence (optional)", key="series",
                               placeholder="t1c=AX T1 POST;t2f=FLAIR (default: from the series descriptions)")
    else:
        uploads = st.file_uploader(f"NIfTI volume(s): one for every sequence, or one per sequence{order_text}",
                                   type=VOLUME_TYPES, accept_multiple_files=True, key="volumes")
        seg_upload = st.file_uploader("Label map / mask NIfTI (optional, same voxel grid)", type=VOLUME_TYPES,
                                      key="volume_seg")
    if not uploads:
        st.info("Upload a DICOM series (its files, or a zip)." if dicom else
                "Upload a NIfTI volume (.nii or .nii.gz), and optionally its label map for per-case scores.")
        st.stop()
    if not shown_models:
        st.warning("Choose at least one model in the sidebar.")
        st.stop()
    model = shown_models[0] if len(shown_models) == 1 else "all"
    key = (api_url, dicom, tuple(u.file_id for u in uploads), seg_upload.file_id if seg_upload else None, series,
           model, threshold)
    if st.session_state.get("volume_key") != key:  # the slider reruns the script: segment once per input
        with st.spinner("Segmenting the volume ..."):
            if dicom:
                response, error = request_dicom_prediction(api_url, [(u.name, u.getvalue()) for u in uploads], series,
                                                           model, threshold, token)
            else:
                response, error = request_volume_prediction(
                    api_url, [(u.name, u.getvalue()) for u in uploads],
                    (seg_upload.name, seg_upload.getvalue()) if seg_upload else None, model, threshold, token)
        if error:
            st.error(f"The backend refused the {'DICOM series' if dicom else 'volume'}: {error}")
            st.stop()
        try:
            views = ([display_volume(base64.b64decode(image)) for image in response["images_nii_gz"]] if dicom
                     else [display_volume(u.getvalue()) for u in uploads])
            truth = canonical_volume(seg_upload.getvalue()) if seg_upload else None
            segs = {p["model"]: decode_volume_seg(p["seg_nii_gz"]) for p in response["predictions"]}
        except DataError as error:
            st.error(f"Cannot show the volume: {error}")
            st.stop()
        st.session_state["volume_key"] = key
        st.session_state["volume_result"] = (response, views, truth, segs)
    response, views, truth, segs = st.session_state["volume_result"]
    for warning in response.get("warnings", []):  # e.g. nothing finite in the volume
        st.warning(warning)
    if response.get("series"):
        with st.expander(f"DICOM series found: {len(response['series'])}"):
            st.text("\n".join(response["series"]))
    predictions = [p for p in response["predictions"] if p["model"] in shown_models]
    segs = {name: seg for name, seg in segs.items() if name in shown_models}

    slices, shown = response["axial_slices"], 0
    names = ([f"{order[k]}" if order and len(order) == len(views) else f"sequence {k + 1}" for k in range(len(views))]
             if dicom else [f"{order[k]}: {u.name}" if order and len(order) == len(uploads) else u.name
                            for k, u in enumerate(uploads)])
    if len(views) > 1:
        shown = names.index(st.selectbox("Sequence shown", names))
    index = 0
    if slices > 1:  # a slider needs two values
        index = st.slider("Axial slice (inferior to superior)", 0, slices - 1, default_slice(segs, slices))
    spacing = response.get("spacing_mm")
    st.caption(f"{response['case_id']}: {'x'.join(map(str, response['shape']))} voxels, {slices} axial slices"
               + (f", voxels {' x '.join(f'{v:.2g}' for v in spacing)} mm" if spacing else "")
               + f"; slice {index + 1} of {slices}, {threshold_text(threshold, predictions)}; anterior at the top, "
               "the patient's "
               "right on the left")
    _show_panels(volume_slice_panels(views[shown], index, truth, segs, mask_only))
    st.subheader("Per model" + (" (per-case scores against the label map)" if truth is not None else ""))
    st.table(volume_rows(predictions).set_index("model"))
    lesions = lesion_rows(predictions)
    if len(lesions):
        st.subheader("Lesions (the slider's slice numbers; diameter: longest axial, as RECIST measures it)")
        st.dataframe(lesions, hide_index=True)
    for column, prediction in zip(st.columns(max(len(predictions), 1)), predictions):
        column.download_button(f"{prediction['model']}: {prediction['seg_filename']}",
                               base64.b64decode(prediction["seg_nii_gz"]), file_name=prediction["seg_filename"],
                               mime="application/gzip", key=f"download-{prediction['model']}", on_click="ignore")
        if prediction.get("seg_dcm"):
            column.download_button(f"{prediction['model']}: {prediction['seg_dcm_filename']} (DICOM SEG)",
                                   base64.b64decode(prediction["seg_dcm"]), file_name=prediction["seg_dcm_filename"],
                                   mime="application/dicom", key=f"download-dcm-{prediction['model']}",
                                   on_click="ignore")


def main() -> None:
    st.set_page_config(page_title="metaseg-tf", layout="wide")
    st.title("metaseg-tf · lesion segmentation of brain MRI slices and volumes")
    if os.environ.get("METASEG_API_URL"):  # set by `metaseg serve`: not for a visitor to change
        api_url = os.environ["METASEG_API_URL"].rstrip("/")
        st.sidebar.caption(f"Backend: {api_url}")
    else:
        api_url = st.sidebar.text_input("Backend URL", DEFAULT_API_URL).rstrip("/")
    token = st.sidebar.text_input("Access token", type="password", key="token",
                                  help="needed when the service was started with one (metaseg serve --token-file)")
    try:
        models = fetch_models(api_url, token)
    except TokenNeeded:
        st.warning("The prediction backend needs an access token" + (": the one given was not accepted." if token
                   else ": enter it in the sidebar."))
        st.stop()
    except requests.RequestException as error:
        st.error(f"The prediction backend is not reachable at {api_url} ({type(error).__name__}). Start it with "
                 "`metaseg serve` (both parts) or `metaseg serve --api-only`, or correct the URL in the sidebar.")
        st.stop()
    names = [model["name"] for model in models]
    shown_models = st.sidebar.multiselect("Models shown", names, default=names)
    own_threshold = st.sidebar.checkbox("Each model's own threshold", value=True,
                                        help="the threshold each run was evaluated at (chosen on its validation "
                                             "patients where the run says so)")
    threshold = None if own_threshold else st.sidebar.slider("Threshold", 0.05, 0.95, 0.5, 0.05)
    mask_only = st.sidebar.radio("View", ["overlay", "mask only"], horizontal=True) == "mask only"
    attention = st.sidebar.checkbox("Attention U-Net gate maps", key="attention")
    for model in models:
        if model["name"] in shown_models and model.get("note"):
            st.warning(f"{model['name']}: {model['note']}")
    with st.sidebar.expander("Served models"):
        st.dataframe(pd.DataFrame([{"model": m["name"], "trained on": m.get("trained_on", {}).get("dataset"),
                                    "target": m.get("target"), "input px": m["input_size"], "CLAHE": m["clahe"],
                                    "threshold": m.get("threshold"),
                                    "test Dice": m["test_metrics"].get("per_patient_dice")} for m in models]))

    mode = st.radio("Input", INPUT_MODES, horizontal=True, key="mode")
    if mode != INPUT_MODES[0]:
        _volume_mode(api_url, token, models, shown_models, threshold, mask_only, dicom=mode == INPUT_MODES[2])
        return
    source = _source()
    if source is None:
        st.info("Upload a slice (and optionally its mask), or try a phantom example.")
        st.stop()
    filename, image_bytes, truth_bytes = source
    if not shown_models:
        st.warning("Choose at least one model in the sidebar.")
        st.stop()
    try:
        image = read_image(image_bytes, channels=3)
        truth = read_mask(truth_bytes) if truth_bytes is not None else None
    except DataError as error:
        st.error(f"Cannot read the upload: {error}")
        st.stop()
    if truth is not None and truth.shape != image.shape[:2]:
        st.warning(f"The mask is {truth.shape[1]}x{truth.shape[0]} px but the slice {image.shape[1]}x{image.shape[0]}: "
                   "ignoring the mask.")
        truth = None

    model = shown_models[0] if len(shown_models) == 1 else "all"
    response, error = request_prediction(api_url, image_bytes, filename, model, threshold, attention, token)
    if error:
        st.error(f"The backend refused the slice: {error}")
        st.stop()
    predictions = [p for p in response["predictions"] if p["model"] in shown_models]
    masks = {p["model"]: decode_png(p["mask_png"]) for p in predictions}

    panels = slice_panels(image, truth, masks, mask_only)
    st.caption(f"{filename}: {image.shape[1]}x{image.shape[0]} px, {threshold_text(threshold, predictions)}")
    _show_panels(panels)
    st.subheader("Per model")
    st.table(prediction_rows(predictions, masks, truth).set_index("model"))
    for prediction in predictions:
        if prediction.get("attention_png"):
            st.subheader(f"{prediction['model']}: attention coefficients, finest gate first")
            gates = [cv2.cvtColor(decode_png(p), cv2.COLOR_BGR2RGB) for p in prediction["attention_png"]]
            for column, gate in zip(st.columns(len(gates)), gates):
                column.image(gate, width="stretch")


if __name__ == "__main__":
    main()
