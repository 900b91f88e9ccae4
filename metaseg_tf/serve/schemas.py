"""The JSON the prediction service answers with (pydantic models, shown in its OpenAPI page)."""

from __future__ import annotations

import base64

from pydantic import BaseModel, Field

# per-case scores returned by /predict/volume, per region (see metaseg_tf.inference.files.case_scores)
VOLUME_SCORES = ("dice", "hd95", "lesion_dice", "lesion_hd95", "truth_lesions", "detected_lesions",
                 "false_positive_lesions")


def b64_text(data: bytes) -> str:
    """Bytes (a PNG, a .nii.gz, a DICOM SEG) as the base64 text the JSON answers carry."""
    return base64.b64encode(data).decode("ascii")


class LesionSummary(BaseModel):
    count: int = Field(description="connected components (8-connected) of the mask")
    areas_px: list[int] = Field(description="area of each lesion in pixels of the uploaded image")
    total_px: int


class ProbabilitySummary(BaseModel):
    max: float
    mean: float
    fraction_above_threshold: float


class ModelPrediction(BaseModel):
    model: str
    threshold: float
    mask_png: str = Field(description="base64 PNG, 0/255, at the uploaded image's size")
    probability: ProbabilitySummary
    lesions: LesionSummary
    latency_ms: float
    attention_png: list[str] | None = Field(default=None, description="base64 PNG heat maps, finest gate first")


class PredictionResponse(BaseModel):
    width: int
    height: int
    predictions: list[ModelPrediction]


class RegionScores(BaseModel):
    """Per-case scores of one region against the uploaded ``seg`` (null where a score is undefined)."""

    dice: float | None
    hd95: float | None = Field(description="95th-percentile Hausdorff distance in mm (voxels if no spacing)")
    lesion_dice: float | None = Field(description="BraTS-MET 2023 lesion-wise Dice")
    lesion_hd95: float | None = Field(description="BraTS-MET 2023 lesion-wise HD95 in mm")
    truth_lesions: int | None
    detected_lesions: int | None
    false_positive_lesions: int | None


class Lesion(BaseModel):
    """One predicted lesion (metaseg_tf.inference.lesions): a 26-connected component of one region's mask."""

    region: str
    lesion: int = Field(description="its number in the region, from 1, largest first")
    voxels: int
    volume_mm3: float | None
    largest_axial_diameter_mm: float | None = Field(description="longest in-plane diameter on any of its axial "
                                                                "slices (RECIST 1.1 / RANO-BM)")
    centre_slice: int = Field(description="axial slice of its centroid, canonical order from 0 (the slider's)")
    first_slice: int
    last_slice: int


class VolumeModelPrediction(BaseModel):
    model: str
    threshold: float
    shape: list[int] = Field(description="the voxel grid of the input and of the returned seg, in file order")
    slices: int = Field(description="axial slices predicted")
    lesion_voxels: int
    seg_filename: str = Field(description="<case>-seg.nii.gz")
    seg_nii_gz: str = Field(description="base64 of <case>-seg.nii.gz: uint8 labels (a one-region model: the "
                                        "region's own label, e.g. BraTS TC 1) on the input's voxel grid, with its "
                                        "affine and header")
    seg_dcm_filename: str | None = Field(default=None, description="<case>-seg.dcm (DICOM input)")
    seg_dcm: str | None = Field(default=None, description="base64 of <case>-seg.dcm: a DICOM SEG (one segment per "
                                                          "region) referencing the uploaded series (DICOM input)")
    latency_ms: float
    scores: dict[str, RegionScores] | None = Field(default=None, description="per region, when a seg was sent")
    lesions: list[Lesion] = Field(default_factory=list, description="every predicted lesion of every region")


class VolumeResponse(BaseModel):
    case_id: str
    shape: list[int] = Field(description="the uploaded voxel grid, in file order")
    axial_slices: int
    canonical_shape: list[int] = Field(description="(slice, row, column) for display: axial slices inferior to "
                                                   "superior, rows anterior to posterior, columns the patient's "
                                                   "right to left (metaseg_tf.data.volumes.to_canonical)")
    spacing_mm: list[float] | None = Field(description="voxel size along the canonical axes")
    non_finite_voxels: int = Field(description="NaN or infinite voxels read (set to 0 before predicting)")
    warnings: list[str] = Field(default_factory=list, description="what the answer should be read with, e.g. "
                                                                   "that nothing finite was in the volume")
    series: list[str] = Field(default_factory=list, description="DICOM input: every series found and what it "
                                                                 "was used for")
    images_nii_gz: list[str] | None = Field(default=None, description="DICOM input: base64 .nii.gz of each sequence "
                                                                     "read (canonical grid, windowed), for display")
    predictions: list[VolumeModelPrediction]
