"""The web front end's client of the prediction API (:mod:`metaseg_tf.serve.api`) over HTTP: its models and
the three prediction requests (a slice, a NIfTI volume, a DICOM series), with the access token as a bearer
header (:mod:`metaseg_tf.serve.guard`). Each prediction request answers ``(response JSON, None)`` or ``(None,
the API's error message)``, the network's errors included, so the UI shows every failure as text;
:func:`fetch_models` raises instead, so the UI can tell a missing token from an unreachable API."""

from __future__ import annotations

import requests

DEFAULT_API_URL = "http://127.0.0.1:8000"
# longer than the API's own limits (120 s, 900 s), so that its 503/504 arrive rather than a client timeout
SLICE_TIMEOUT_S, VOLUME_TIMEOUT_S = 180, 1200


class TokenNeeded(Exception):
    """The API answered 401: it needs an access token (none or a wrong one was given)."""


def auth_headers(token: str | None) -> dict[str, str]:
    """The header that carries the access token, or none."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def fetch_models(api_url: str, token: str | None = None) -> list[dict]:
    """The API's ``/models``; raises :class:`TokenNeeded` on 401 and ``requests.RequestException`` when it
    cannot be reached."""
    response = requests.get(f"{api_url}/models", headers=auth_headers(token), timeout=10)
    if response.status_code == 401:
        raise TokenNeeded()
    response.raise_for_status()
    return response.json()


def _form(model: str, threshold: float | None, **fields: str) -> dict[str, str]:
    """A prediction request's form fields; without ``threshold`` each model predicts at its own."""
    return {"model": model, **({} if threshold is None else {"threshold": str(threshold)}), **fields}


def request_prediction(api_url: str, image: bytes, filename: str, model: str, threshold: float | None,
                       attention: bool, token: str | None = None) -> tuple[dict | None, str | None]:
    """``(response JSON, None)`` or ``(None, the API's error message)``; ``threshold`` None: each model's own."""
    return _answer(lambda: requests.post(f"{api_url}/predict", files={"file": (filename, image)},
                                         headers=auth_headers(token),
                                         data=_form(model, threshold, attention=str(attention).lower()),
                                         timeout=SLICE_TIMEOUT_S))


def request_volume_prediction(api_url: str, volumes: list[tuple[str, bytes]], seg: tuple[str, bytes] | None,
                              model: str, threshold: float | None,
                              token: str | None = None) -> tuple[dict | None, str | None]:
    """``/predict/volume`` with ``volumes`` (``(file name, bytes)``: one, or one per sequence in the model's
    order) and an optional label map ``seg``: ``(response JSON, None)`` or ``(None, the API's error message)``."""
    files = [("files", volume) for volume in volumes] + ([("seg", seg)] if seg is not None else [])
    return _answer(lambda: requests.post(f"{api_url}/predict/volume", files=files, headers=auth_headers(token),
                                         data=_form(model, threshold), timeout=VOLUME_TIMEOUT_S))


def request_dicom_prediction(api_url: str, files: list[tuple[str, bytes]], series: str, model: str,
                             threshold: float | None, token: str | None = None) -> tuple[dict | None, str | None]:
    """``/predict/dicom`` with a study's DICOM files (or one zip) and an optional series choice
    (``t1c=text;t2f=UID``): ``(response JSON, None)`` or ``(None, the API's error message)``."""
    fields = _form(model, threshold, **({"series": series} if series.strip() else {}))
    return _answer(lambda: requests.post(f"{api_url}/predict/dicom", files=[("files", f) for f in files],
                                         headers=auth_headers(token), data=fields, timeout=VOLUME_TIMEOUT_S))


def _answer(send) -> tuple[dict | None, str | None]:
    """``send()``'s answer as ``(JSON, None)`` or ``(None, the error)``, the network's errors included."""
    try:
        response = send()
    except requests.RequestException as error:
        return None, f"no answer from the backend ({type(error).__name__})"
    if response.ok:
        return response.json(), None
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    return None, f"{response.status_code}: {detail}"
