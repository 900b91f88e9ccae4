"""A deterministic synthetic brain-metastasis phantom: the project's embedded default dataset.

:func:`generate_phantom` writes N patients x M axial slices in one of two layouts, so the phantom goes
through exactly the loader path that real data takes. Everything follows from ``seed``: the same arguments
give byte-identical files.

* ``brats_mets`` (the main job's default): one folder per case ``BraTS-MET-<seed><nnn>-000/`` with four
  co-registered sequences ``-t1c`` (ring enhancement), ``-t2f`` (bright oedema), ``-t1n`` and ``-t2w`` and a
  ``-seg`` label map (1 necrotic core, 2 oedema, 3 enhancing rim: the BraTS-METS convention) as NIfTI. The
  arrays are stored like BraTS' own files (``LPS`` voxel order, slice axis last) with a voxel size of
  ``240 / size`` mm in-plane and 3.75 mm between slices, so the head is life-sized at any ``size``.
* ``kaggle_3m``: one folder per patient, ``<case>_<n>.png`` (pre-contrast T1, FLAIR, post-contrast T1 as
  RGB) + ``<case>_<n>_mask.png`` (the tumour core).

What it models
--------------
* Sequences: pre-contrast T1, FLAIR, post-contrast T1 (and T2-weighted in the BraTS layout).
* Per patient: head shape and pose, scalp, skull, cortical grey-matter ribbon with sulci, white matter,
  lateral ventricles, intensity scale, lesion enhancement strength, noise level and a smooth multiplicative
  bias field. Brain and ventricles shrink towards the top and bottom slices.
* Metastases as 3D ellipsoids with irregular outlines (a few Fourier harmonics) placed in the brain, so a
  lesion appears on neighbouring slices with a changing cross-section, as in a real volume. Radii follow a
  skewed distribution between 2 and 30 px at 256 px (most lesions are small). Lesions wider than about
  6 px have a necrotic core and an enhancing rim on post-contrast T1; small ones enhance solidly. Each
  lesion is surrounded by vasogenic oedema, bright on FLAIR and slightly dark on T1, that is *not* part of
  the mask. 0-6 lesions per slice; about a third of the slices hold none.
* Confounders the network must learn to ignore: enhancing vessels (bright dots and short arcs on
  post-contrast T1 only), oedema, bright scalp fat, partial-volume blur and Rician noise.

What it does not model
----------------------
Real anatomy (no cerebellum, basal ganglia or sinuses), motion or susceptibility artefacts, haemorrhagic or
cystic metastases, leptomeningeal disease, scanner-specific contrast, slice-to-slice intensity drift and
inter-slice registration error. Numbers measured on the phantom say that the code works, not how a model
does on patients.

The kaggle_3m mask is the lesion (enhancing rim + necrotic core), the "tumour core" of the BraTS
metastasis labels; the BraTS layout keeps the three labels, with oedema where its FLAIR shift exceeds 30 %
of its peak.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from metaseg_tf import paths
from metaseg_tf.data.discover import DataError

PHANTOM_VERSION = 1
PHANTOM_LAYOUTS = ("brats_mets", "kaggle_3m")
BRATS_SEQUENCES = ("t1c", "t1n", "t2f", "t2w")
_SEQUENCE_CHANNEL = {"t1n": 0, "t2f": 1, "t1c": 2, "t2w": 3}  # columns of _TISSUE
_OEDEMA_LABEL_LEVEL = 0.3
_SLICE_SPACING_MM = 3.75
_FIELD_OF_VIEW_MM = 240.0
_REFERENCE_SIZE = 256  # radii and widths below are in pixels at this size and scale with `size`
_MAX_LESIONS_PER_SLICE = 6
_PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 1]

# Tissue intensities per channel (pre-contrast T1, FLAIR, post-contrast T1, T2-weighted), before scale, bias
# and noise. The kaggle_3m layout uses the first three.
_TISSUE = {
    "scalp": (0.78, 0.52, 0.80, 0.60),
    "skull": (0.07, 0.06, 0.08, 0.05),
    "csf": (0.12, 0.08, 0.14, 0.92),
    "grey": (0.42, 0.52, 0.46, 0.55),
    "white": (0.56, 0.42, 0.60, 0.40),
    "necrosis": (0.30, 0.58, 0.24, 0.80),
    "lesion": (0.40, 0.62, 0.66, 0.52),  # rim / solid lesion before enhancement is added to post-contrast T1
    "oedema_shift": (-0.07, 0.30, -0.06, 0.30),
    "vessel": (0.45, 0.40, 0.90, 0.20),
}


@dataclass(frozen=True)
class PhantomSettings:
    """What a phantom dataset was generated with (stored as ``phantom.json`` next to the data)."""

    n_patients: int = 20
    n_slices: int = 24
    size: int = 256
    seed: int = 0
    version: int = PHANTOM_VERSION
    layout: str = "kaggle_3m"


# The embedded default data of the main job and the notebooks, per layout: the settings and the folder (inside
# the project). The smoke profile's tiny ones prove that the pipeline runs.
DEFAULT_PHANTOMS = {
    "brats_mets": (PhantomSettings(20, 24, 128, layout="brats_mets"), paths.PHANTOM_DIR),
    "kaggle_3m": (PhantomSettings(), paths.KAGGLE_PHANTOM_DIR),
}
SMOKE_PHANTOMS = {
    "brats_mets": (PhantomSettings(8, 8, 64, layout="brats_mets"), paths.SMOKE_PHANTOM_DIR),
    "kaggle_3m": (PhantomSettings(8, 8, 64), paths.KAGGLE_SMOKE_PHANTOM_DIR),
}


@dataclass
class PhantomSummary:
    """Where a phantom was written and what it holds."""

    root: Path
    settings: PhantomSettings
    case_ids: list[str] = field(default_factory=list)
    lesions_per_slice: list[int] = field(default_factory=list)
    lesion_radii: list[float] = field(default_factory=list)
    reused: bool = False

    @property
    def fraction_without_lesion(self) -> float:
        counts = np.asarray(self.lesions_per_slice)
        return float(np.mean(counts == 0)) if counts.size else 0.0


@dataclass
class _Lesion:
    centre: np.ndarray  # (x, y, z) in pixels, z along the slice axis
    radius: float
    elongation: np.ndarray  # per-axis radius factors (x, y, z)
    harmonics: np.ndarray  # (k, 2): amplitude and phase of outline harmonics 2..k+1
    oedema_factor: float


@dataclass
class _Patient:
    case_id: str
    rng: np.random.Generator
    centre: np.ndarray
    semi_axes: np.ndarray
    angle: float
    intensity_scale: float
    enhancement: float
    noise_sigma: float
    bias: np.ndarray
    lesions: list[_Lesion]
    slice_z: np.ndarray


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-variance smooth random field ``(size, size)`` with about ``cells`` bumps per side."""
    coarse = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    fine = cv2.resize(coarse, (size + 3 * size // cells, size + 3 * size // cells), interpolation=cv2.INTER_CUBIC)
    offset = size // cells
    fine = fine[offset : offset + size, offset : offset + size]
    return (fine - fine.mean()) / (fine.std() + 1e-6)


def _outline_factor(theta: np.ndarray, harmonics: np.ndarray) -> np.ndarray:
    factor = np.ones_like(theta)
    for order, (amplitude, phase) in enumerate(harmonics, start=2):
        factor += amplitude * np.cos(order * theta + phase)
    return factor


def _case_id(index: int, settings: PhantomSettings) -> str:
    if settings.layout == "brats_mets":
        return f"BraTS-MET-{settings.seed % 100:02d}{index:03d}-000"
    return f"PHANTOM_{settings.seed:03d}_{index:03d}"


def _make_patient(index: int, settings: PhantomSettings) -> _Patient:
    rng = np.random.default_rng([settings.seed, index])
    scale = settings.size / _REFERENCE_SIZE
    size = settings.size
    spacing = 4.0 * scale  # slice spacing in pixels
    slice_z = (np.arange(settings.n_slices) - (settings.n_slices - 1) / 2) * spacing
    half_height = 0.5 * settings.n_slices * spacing / 0.72  # the slices cover the middle 72 % of the head
    centre = np.array([size / 2, size / 2]) + rng.uniform(-0.04, 0.04, 2) * size
    in_plane = np.array([rng.uniform(0.34, 0.40), rng.uniform(0.41, 0.46)]) * size
    patient = _Patient(
        case_id=_case_id(index, settings),
        rng=rng,
        centre=centre,
        semi_axes=np.append(in_plane, half_height),
        angle=float(rng.uniform(-0.17, 0.17)),
        intensity_scale=float(rng.uniform(0.85, 1.1)),
        enhancement=float(rng.uniform(0.55, 1.0)),
        noise_sigma=float(rng.uniform(0.012, 0.035)),
        bias=rng.uniform(-0.18, 0.18, 3),
        lesions=[],
        slice_z=slice_z,
    )
    n_lesions = int(rng.integers(3, 12))
    for _ in range(100 * n_lesions):  # rejection sampling of lesion positions inside the brain
        if len(patient.lesions) == n_lesions:
            break
        radius = (2.0 + 28.0 * rng.beta(1.0, 3.5)) * scale
        z = rng.uniform(slice_z[0] - radius / 2, slice_z[-1] + radius / 2)
        brain_a, brain_b = _brain_axes(patient, z)
        if brain_a < 8 * scale:
            continue
        rho, phi = np.sqrt(rng.uniform(0.0, 0.6)), rng.uniform(0, 2 * np.pi)
        local = np.array([rho * np.cos(phi) * brain_a, rho * np.sin(phi) * brain_b])
        if rho + radius / min(brain_a, brain_b) > 0.85:
            continue
        patient.lesions.append(
            _Lesion(
                centre=np.append(_to_image(patient, local), z),
                radius=radius,
                elongation=rng.uniform(0.8, 1.2, 3),
                harmonics=np.stack([rng.uniform(0, 0.12, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1),
                oedema_factor=float(rng.uniform(1.4, 2.6)),
            )
        )
    return patient


def _brain_axes(patient: _Patient, z: float) -> tuple[float, float]:
    """Semi-axes of the brain's cross-section at height ``z`` (the head is an ellipsoid)."""
    height = 1.0 - (z / patient.semi_axes[2]) ** 2
    factor = np.sqrt(max(height, 0.0))
    brain = patient.semi_axes[:2] * 0.86  # scalp and skull take the outer 14 %
    return float(brain[0] * factor), float(brain[1] * factor)


def _to_image(patient: _Patient, local: np.ndarray) -> np.ndarray:
    cos, sin = np.cos(patient.angle), np.sin(patient.angle)
    return patient.centre + np.array([cos * local[0] - sin * local[1], sin * local[0] + cos * local[1]])


def _render_slice(patient: _Patient, z: float, size: int, channels: int = 3) -> tuple[np.ndarray, np.ndarray, int]:
    """One slice: ``uint8 (size, size, channels)`` image (the first ``channels`` of pre-contrast T1, FLAIR,
    post-contrast T1, T2-weighted), ``uint8 (size, size)`` labels (1 necrotic core, 2 oedema, 3 enhancing
    rim or solidly enhancing lesion), number of lesions."""
    rng, scale = patient.rng, size / _REFERENCE_SIZE
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    cos, sin = np.cos(patient.angle), np.sin(patient.angle)
    u = cos * (xs - patient.centre[0]) + sin * (ys - patient.centre[1])
    v = -sin * (xs - patient.centre[0]) + cos * (ys - patient.centre[1])

    height = np.sqrt(max(1.0 - (z / patient.semi_axes[2]) ** 2, 0.05))
    head_a, head_b = patient.semi_axes[:2] * height
    rho_head = np.sqrt((u / head_a) ** 2 + (v / head_b) ** 2)
    brain_a, brain_b = _brain_axes(patient, z)
    rho_brain = np.sqrt((u / brain_a) ** 2 + (v / brain_b) ** 2)
    depth = (1.0 - rho_brain) * min(brain_a, brain_b)  # approximate distance from the brain surface

    tissue = np.zeros((size, size, channels), np.float32)
    tissues = {name: np.asarray(values[:channels], np.float32) for name, values in _TISSUE.items()}
    brain = rho_brain < 1.0
    skull = (rho_head < 0.93) & ~brain
    scalp = (rho_head < 1.0) & (rho_head >= 0.93)
    tissue[scalp] = tissues["scalp"]
    tissue[skull] = tissues["skull"]

    gyri = _smooth_field(rng, size, 24)
    ribbon = np.clip((7.0 * scale + 3.0 * scale * gyri - depth) / (2.0 * scale), 0.0, 1.0)
    grey, white = tissues["grey"], tissues["white"]
    texture = 0.03 * _smooth_field(rng, size, 12)[..., None]
    brain_tissue = ribbon[..., None] * grey + (1 - ribbon[..., None]) * white + texture
    tissue = np.where(brain[..., None], brain_tissue, tissue)
    sulci = brain & (gyri > 1.1) & (depth < 12 * scale)
    outer_csf = brain & (depth < 1.5 * scale)
    tissue[sulci | outer_csf] = tissues["csf"]

    ventricle_size = max(0.0, 1.0 - ((z / patient.semi_axes[2] - 0.1) / 0.45) ** 2)
    if ventricle_size > 0.05:
        for side in (-1, 1):
            vu = (u - side * 0.13 * brain_a) / (0.09 * brain_a * ventricle_size + 1e-3)
            vv = (v + 0.02 * brain_b) / (0.42 * brain_b * ventricle_size + 1e-3)
            tissue[(vu**2 + vv**2) < 1.0] = tissues["csf"]

    _draw_vessels(tissue, rng, brain, patient, size)
    labels, n_lesions = _draw_lesions(tissue, tissues, patient, z, xs, ys, brain)

    tissue = cv2.GaussianBlur(tissue, (0, 0), 0.6 * scale)
    bias = 1.0 + patient.bias[0] * u / size + patient.bias[1] * v / size + patient.bias[2] * (rho_head**2 - 0.5)
    signal = tissue * (patient.intensity_scale * bias)[..., None]
    magnitude = _rician(signal, patient.noise_sigma, int(rng.integers(2**31)))
    image = np.clip(magnitude * 255.0, 0, 255).astype(np.uint8)
    return image, labels, n_lesions


def _rician(signal: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Magnitude of ``signal`` plus complex Gaussian noise (the noise of magnitude MR images).

    OpenCV's generator, seeded from the patient's generator, is several times faster than NumPy's here.
    """
    cv2.setRNGSeed(seed)
    real, imaginary = np.empty_like(signal), np.empty_like(signal)
    for part in (real, imaginary):  # a 2D view: OpenCV applies a scalar sigma to the first channel only
        cv2.randn(part.reshape(signal.shape[0], -1), 0.0, sigma)
    return np.sqrt((signal + real) ** 2 + imaginary**2)


def _draw_vessels(tissue: np.ndarray, rng: np.random.Generator, brain: np.ndarray, patient: _Patient,
                  size: int) -> None:
    """Enhancing vessels: dots and short arcs, bright on post-contrast T1 only, never in the mask."""
    scale = size / _REFERENCE_SIZE
    layer = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(2, 7))):
        start = rng.uniform(0.2, 0.8, 2) * size
        end = start + rng.normal(0, 10 * scale, 2)
        thickness = max(1, int(round(rng.uniform(1, 2.5) * scale)))
        cv2.line(layer, tuple(int(c) for c in start), tuple(int(c) for c in end), 1, thickness)
    vessels = (layer > 0) & brain
    tissue[vessels, 2] = _TISSUE["vessel"][2] * patient.enhancement + tissue[vessels, 2] * (1 - patient.enhancement)


def _draw_lesions(tissue: np.ndarray, tissues: dict[str, np.ndarray], patient: _Patient, z: float, xs: np.ndarray,
                  ys: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, int]:
    """Draw the lesions crossing height ``z`` with their oedema; return the labels (1 core, 2 oedema,
    3 enhancing) and how many lesions were drawn."""
    size = tissue.shape[0]
    sections = []
    for lesion in patient.lesions:
        dz = (z - lesion.centre[2]) / (lesion.radius * lesion.elongation[2])
        if abs(dz) < 1.0:
            sections.append((lesion.radius * np.sqrt(1.0 - dz**2), lesion))
    sections.sort(key=lambda item: -item[0])
    sections = [s for s in sections[:_MAX_LESIONS_PER_SLICE] if s[0] >= 1.0]
    oedema = np.zeros((size, size), np.float32)
    drawn = []
    for radius, lesion in sections:
        # work in the lesion's bounding box (oedema included): a few hundred pixels, not the whole slice
        reach = radius * lesion.oedema_factor * 1.3 + 4.0
        x0, x1 = (int(np.clip(lesion.centre[0] + d * reach, 0, size)) for d in (-1, 1))
        y0, y1 = (int(np.clip(lesion.centre[1] + d * reach, 0, size)) for d in (-1, 1))
        box = (slice(y0, y1 + 1), slice(x0, x1 + 1))
        dx = (xs[box] - lesion.centre[0]) / lesion.elongation[0]
        dy = (ys[box] - lesion.centre[1]) / lesion.elongation[1]
        distance, theta = np.sqrt(dx**2 + dy**2), np.arctan2(dy, dx)
        rho = np.full((size, size), np.inf, np.float32)
        rho[box] = distance / (radius * _outline_factor(theta, lesion.harmonics))
        inside = (rho <= 1.0) & brain
        if not inside.any():
            continue
        oedema_rho = distance / (radius * lesion.oedema_factor + 3.0)
        oedema[box] = np.maximum(oedema[box], np.clip((1.0 - oedema_rho) / 0.3, 0.0, 1.0))
        drawn.append((radius, rho, inside))
    tissue += (oedema * brain)[..., None] * tissues["oedema_shift"]
    labels = np.where((oedema * brain) > _OEDEMA_LABEL_LEVEL, 2, 0).astype(np.uint8)
    for radius, rho, inside in drawn:
        tissue[inside] = tissues["lesion"]
        tissue[inside, 2] += 0.3 * patient.enhancement
        labels[inside] = 3
        if radius > 6.0 * size / _REFERENCE_SIZE:
            core = inside & (rho < 0.6)
            tissue[core] = tissues["necrosis"]
            labels[core] = 1
    return labels, len(drawn)


def default_phantom(layout: str = "brats_mets", smoke: bool = False, progress: bool = True) -> PhantomSummary:
    """The embedded default phantom of ``layout`` (:data:`DEFAULT_PHANTOMS`, or :data:`SMOKE_PHANTOMS`),
    generated on first use."""
    table = SMOKE_PHANTOMS if smoke else DEFAULT_PHANTOMS
    if layout not in table:
        raise DataError(f"unknown phantom layout {layout!r}; choose one of {', '.join(table)}")
    settings, folder = table[layout]
    return generate_phantom(paths.resolve(folder), settings.n_patients, settings.n_slices, settings.size,
                            settings.seed, progress=progress, layout=layout)


def is_phantom(root: str | Path) -> bool:
    """Whether ``root`` holds a phantom :func:`generate_phantom` wrote (its ``phantom.json``)."""
    return (Path(root) / "phantom.json").is_file()


def _existing_settings(root: Path) -> PhantomSettings | None:
    manifest = root / "phantom.json"
    if not manifest.is_file():
        return None
    return PhantomSettings(**json.loads(manifest.read_text())["settings"])


def _write_brats_case(case_dir: Path, patient: _Patient, settings: PhantomSettings, summary: PhantomSummary) -> None:
    """The case's slices stacked into volumes, written as NIfTI the way BraTS stores them (``LPS``, slices
    last); the rendered slices are already in the canonical ``S P L`` view of :mod:`metaseg_tf.data.volumes`."""
    import nibabel as nib

    from metaseg_tf.data.volumes import from_canonical

    rendered = [_render_slice(patient, float(z), settings.size, channels=4) for z in patient.slice_z]
    summary.lesions_per_slice += [n for _, _, n in rendered]
    pixel = _FIELD_OF_VIEW_MM / settings.size
    affine = np.diag([-pixel, -pixel, _SLICE_SPACING_MM, 1.0])
    affine[:3, 3] = [pixel * settings.size / 2, pixel * settings.size / 2, -_SLICE_SPACING_MM * len(rendered) / 2]
    images = np.stack([image for image, _, _ in rendered])  # (Z, rows, columns, 4) canonical
    volumes = {name: images[..., _SEQUENCE_CHANNEL[name]].astype(np.int16) * 4 for name in BRATS_SEQUENCES}
    volumes["seg"] = np.stack([labels for _, labels, _ in rendered])
    for name, volume in volumes.items():
        image = nib.Nifti1Image(from_canonical(volume, affine), affine)
        image.header.set_xyzt_units("mm")
        nib.save(image, str(case_dir / f"{patient.case_id}-{name}.nii.gz"))


def _write_kaggle_case(case_dir: Path, patient: _Patient, settings: PhantomSettings, summary: PhantomSummary) -> None:
    for number, z in enumerate(patient.slice_z, start=1):
        image, labels, n_lesions = _render_slice(patient, float(z), settings.size)
        stem = case_dir / f"{patient.case_id}_{number}"
        cv2.imwrite(f"{stem}.png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), _PNG_FAST)
        cv2.imwrite(f"{stem}_mask.png", np.isin(labels, (1, 3)).astype(np.uint8) * 255, _PNG_FAST)
        summary.lesions_per_slice.append(n_lesions)


def generate_phantom(
    out_dir: str | Path,
    n_patients: int = PhantomSettings.n_patients,
    n_slices: int = PhantomSettings.n_slices,
    size: int = PhantomSettings.size,
    seed: int = PhantomSettings.seed,
    progress: bool = True,
    layout: str = PhantomSettings.layout,
) -> PhantomSummary:
    """Write the phantom to ``out_dir`` in ``layout`` (``kaggle_3m`` or ``brats_mets``) and return what it
    holds.

    A folder that already holds a phantom made with the same settings is reused as it is; a folder that
    holds anything else is never overwritten (:class:`DataError`).
    """
    if n_patients < 1 or n_slices < 1 or size < 32:
        raise DataError("a phantom needs n_patients >= 1, n_slices >= 1 and size >= 32")
    if layout not in PHANTOM_LAYOUTS:
        raise DataError(f"unknown phantom layout {layout!r}; choose one of {', '.join(PHANTOM_LAYOUTS)}")
    settings = PhantomSettings(n_patients, n_slices, size, seed, layout=layout)
    root = Path(out_dir)
    if root.exists() and any(root.iterdir()):
        existing = _existing_settings(root)
        if existing == settings:
            manifest = json.loads((root / "phantom.json").read_text())
            return PhantomSummary(root, settings, manifest["case_ids"], manifest["lesions_per_slice"],
                                  manifest["lesion_radii"], reused=True)
        raise DataError(
            f"{root} is not empty and holds no phantom made with these settings; choose another folder"
        )
    summary = PhantomSummary(root, settings)
    staging = root.with_name(root.name + ".partial")
    if staging.exists():  # left by an interrupted earlier call: our own scratch space
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    write_case = _write_brats_case if layout == "brats_mets" else _write_kaggle_case
    for index in tqdm(range(n_patients), desc="generating phantom", unit="patient", disable=not progress):
        patient = _make_patient(index, settings)
        case_dir = staging / patient.case_id
        case_dir.mkdir(exist_ok=True)
        summary.case_ids.append(patient.case_id)
        summary.lesion_radii += [round(float(lesion.radius), 2) for lesion in patient.lesions]
        write_case(case_dir, patient, settings, summary)
    manifest = {
        "settings": asdict(settings),
        "case_ids": summary.case_ids,
        "lesions_per_slice": summary.lesions_per_slice,
        "lesion_radii": summary.lesion_radii,
    }
    (staging / "phantom.json").write_text(json.dumps(manifest) + "\n")
    if root.exists():
        root.rmdir()
    staging.rename(root)
    return summary
