"""The web front end (Streamlit): upload a slice, see both models' masks beside the image and the truth.

Run it with ``metaseg serve`` (together with the API) or ``streamlit run metaseg_tf/serve/ui.py``; it talks
to the prediction API over HTTP at ``METASEG_API_URL`` (default ``http://127.0.0.1:8000``, changeable in the
sidebar) and says so in a banner when the API cannot be reached. Without own data, "Try a phantom example"
loads slices of the synthetic phantom.
"""

from __future__ import annotations

import base64
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
from metaseg_tf.evaluation.scores import overlap_scores

DEFAULT_API_URL = "http://127.0.0.1:8000"
UPLOAD_TYPES = ["tif", "tiff", "png", "jpg", "jpeg", "bmp", "webp"]
TRUTH_COLOUR, PREDICTION_COLOUR = (0, 200, 0), (230, 30, 30)


def fetch_models(api_url: str) -> list[dict]:
    """The API's ``/models``; raises ``requests.RequestException`` when it cannot be reached."""
    response = requests.get(f"{api_url}/models", timeout=10)
    response.raise_for_status()
    return response.json()


def request_prediction(api_url: str, image: bytes, filename: str, model: str, threshold: float,
                       attention: bool) -> tuple[dict | None, str | None]:
    """``(response JSON, None)`` or ``(None, the API's error message)``."""
    response = requests.post(f"{api_url}/predict", files={"file": (filename, image)},
                             data={"model": model, "threshold": str(threshold), "attention": str(attention).lower()},
                             timeout=120)
    if response.ok:
        return response.json(), None
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    return None, f"{response.status_code}: {detail}"


def decode_png(encoded: str) -> np.ndarray:
    """A base64 PNG from the API as an array (as stored: grey ``(H, W)`` or BGR colour)."""
    return cv2.imdecode(np.frombuffer(base64.b64decode(encoded), np.uint8), cv2.IMREAD_UNCHANGED)


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


def main() -> None:
    st.set_page_config(page_title="metaseg-tf", layout="wide")
    st.title("metaseg-tf · lesion segmentation of brain MRI slices")
    api_url = st.sidebar.text_input("Backend URL", os.environ.get("METASEG_API_URL", DEFAULT_API_URL)).rstrip("/")
    try:
        models = fetch_models(api_url)
    except requests.RequestException as error:
        st.error(f"The prediction backend is not reachable at {api_url} ({type(error).__name__}). Start it with "
                 "`metaseg serve` (both parts) or `metaseg serve --api-only`, or correct the URL in the sidebar.")
        st.stop()
    names = [model["name"] for model in models]
    shown_models = st.sidebar.multiselect("Models shown", names, default=names)
    threshold = st.sidebar.slider("Threshold", 0.05, 0.95, 0.5, 0.05)
    mask_only = st.sidebar.radio("View", ["overlay", "mask only"], horizontal=True) == "mask only"
    attention = st.sidebar.checkbox("Attention U-Net gate maps")
    with st.sidebar.expander("Served models"):
        st.dataframe(pd.DataFrame([{"model": m["name"], "input px": m["input_size"], "CLAHE": m["clahe"],
                                    "test Dice": m["test_metrics"].get("per_patient_dice")} for m in models]))

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
    response, error = request_prediction(api_url, image_bytes, filename, model, threshold, attention)
    if error:
        st.error(f"The backend refused the slice: {error}")
        st.stop()
    predictions = [p for p in response["predictions"] if p["model"] in shown_models]
    masks = {p["model"]: decode_png(p["mask_png"]) for p in predictions}

    panels = [("original", display_image(image))]
    if truth is not None:
        panels.append(("ground truth", overlay(image, truth, TRUTH_COLOUR, mask_only)))
    panels += [(name, overlay(image, mask, PREDICTION_COLOUR, mask_only)) for name, mask in masks.items()]
    st.caption(f"{filename}: {image.shape[1]}x{image.shape[0]} px, threshold {threshold:.2f}")
    for column, (caption, picture) in zip(st.columns(len(panels)), panels):
        column.image(picture, caption=caption, width="stretch", alt=caption)
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
