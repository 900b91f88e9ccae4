"""Volume layouts made up in the test: discovery of every layout, the canonical orientation round trip, labels
kept as stored, missing sequences reported or filled, NaN-safe windowing, clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_image

from metaseg_tf.data.discover import DataError
from metaseg_tf.data.layouts import discover_volumes
from metaseg_tf.data.targets import LABEL_CONVENTIONS, resolve_target
from metaseg_tf.data.volumes import axial_axis, canonical_spacing, from_canonical, read_case, read_case_labels, sequence_of, to_canonical
from metaseg_tf.data.intensity import window_volume

SHAPE = (12, 10, 6)  # file voxel order (i, j, k)
AFFINES = {
    "RAS, slices last": np.diag([1.0, 1.0, 2.5, 1.0]),
    "LPS like BraTS": np.diag([-1.0, -1.0, 2.5, 1.0]),
    "axial axis first": np.array([[0, 0, 1.0, 0], [0, -1.0, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]]),
    "oblique (10 degrees)": np.array([[np.cos(0.17), -np.sin(0.17), 0, 0], [np.sin(0.17), np.cos(0.17), 0, 0],
                                      [0, 0, 2.5, 0], [0, 0, 0, 1]]),
}


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _labels(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """An asymmetric blob: necrotic core 1 inside enhancing 3, oedema 2 on one side only."""
    labels = np.zeros(shape, np.uint8)
    labels[2:7, 3:6, 1:4] = 2
    labels[3:6, 3:5, 1:3] = 3
    labels[4, 4, 2] = 1
    return labels


def _image(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(10, 500, shape).astype(np.float32)


@pytest.mark.parametrize("name", list(AFFINES))
def test_canonical_orientation_round_trip_and_anatomical_directions(name: str) -> None:
    affine = AFFINES[name]
    data = _image(0)
    canonical = to_canonical(data, affine)
    np.testing.assert_array_equal(from_canonical(canonical, affine), data)
    # the voxel that lies most superior, anterior and to the patient's right in world space (RAS+: large z,
    # large y, large x) lands in the last slice, first row, first column of the canonical view
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in SHAPE], indexing="ij")).reshape(3, -1).T
    world = nib.affines.apply_affine(affine, corners)
    score = world[:, 2] * 1e6 + world[:, 1] * 1e3 + world[:, 0]
    marked = np.zeros(SHAPE, np.uint8)
    marked[tuple(corners[np.argmax(score)])] = 1
    located = np.argwhere(to_canonical(marked, affine))[0]
    assert tuple(located) == (canonical.shape[0] - 1, 0, 0), name
    assert canonical_spacing(affine)[0] == pytest.approx(2.5)  # the slice axis is the 2.5 mm one


def test_axial_axis_and_spacing_follow_the_affine_not_the_array_order() -> None:
    assert axial_axis(AFFINES["axial axis first"]) == 0 and axial_axis(AFFINES["RAS, slices last"]) == 2
    assert canonical_spacing(np.diag([0.9, 0.8, 3.0, 1.0])) == pytest.approx((3.0, 0.8, 0.9))


def test_window_is_per_volume_brain_percentiles_and_nan_safe() -> None:
    volume = np.zeros((4, 8, 8), np.float32)
    volume[:, 2:6, 2:6] = np.linspace(100, 200, 64).reshape(4, 4, 4)
    volume[0, 0, 0] = np.nan
    volume[1, 0, 0] = np.inf
    windowed, bad = window_volume(volume)
    assert bad == 2 and np.isfinite(windowed).all()
    assert windowed[volume == 0].max() == 0 and windowed.max() == pytest.approx(1.0)
    assert windowed[:, 2:6, 2:6].min() == pytest.approx(0.0)
    assert window_volume(np.zeros((2, 3, 3)))[0].max() == 0  # an empty (filled) sequence stays empty


def _brats_case(root: Path, case: str, sequences: tuple[str, ...] = ("t1c", "t1n", "t2f", "t2w"),
                seg: bool = True, affine: np.ndarray = AFFINES["LPS like BraTS"]) -> Path:
    for k, name in enumerate(sequences):
        _save(root / case / f"{case}-{name}.nii.gz", _image(k), affine)
    if seg:
        _save(root / case / f"{case}-seg.nii.gz", _labels(), affine)
    return root / case


def test_brats_mets_layout_labels_missing_sequences_and_prediction_only_cases(tmp_path: Path) -> None:
    _brats_case(tmp_path, "BraTS-MET-00001-000")
    _brats_case(tmp_path, "BraTS-MET-00002-000", sequences=("t1c", "t2f", "t1n"))  # no t2w
    _brats_case(tmp_path, "BraTS-MET-00003-000", seg=False)  # validation case: prediction only
    (tmp_path / "BraTS-MET-00001-000" / "notes.txt").write_text("not a volume")
    report = discover_volumes(tmp_path)
    assert report.layout == "brats_mets" and report.convention == "brats"
    assert report.case_ids == ["BraTS-MET-00001-000", "BraTS-MET-00002-000", "BraTS-MET-00003-000"]
    assert [c.case_id for c in report.labelled_cases] == ["BraTS-MET-00001-000", "BraTS-MET-00002-000"]
    assert [p.name for p in report.ignored_files] == ["notes.txt"]
    volume = read_case(report.cases[0], ("t1c", "t2f", "t1n"))
    assert volume.images.shape == (6, 10, 12, 3) and volume.spacing == pytest.approx((2.5, 1.0, 1.0))
    np.testing.assert_array_equal(volume.labels, to_canonical(_labels(), AFFINES["LPS like BraTS"]))
    assert set(np.unique(volume.labels)) == {0, 1, 2, 3}  # labels kept as stored
    selected = report.select(("t1c", "t2w"))
    assert selected.case_ids == ["BraTS-MET-00001-000", "BraTS-MET-00003-000"]
    assert "missing sequence(s) t2w" in selected.skipped["BraTS-MET-00002-000"]
    with pytest.raises(DataError, match="has no t2w sequence"):
        read_case(report.cases[1], ("t1c", "t2w"))
    zeros = read_case(report.cases[1], ("t1c", "t2w"), fill_missing="zeros")
    assert zeros.filled == ["t2w"] and zeros.images[..., 1].max() == 0
    repeated = read_case(report.cases[1], ("t1c", "t2w"), fill_missing="repeat")
    np.testing.assert_array_equal(repeated.images[..., 1], repeated.images[..., 0])
    assert report.select(("t1c", "t2w"), fill_missing="zeros").case_ids == report.case_ids


def test_sequences_on_different_grids_and_broken_files_give_clear_errors(tmp_path: Path) -> None:
    case = _brats_case(tmp_path, "BraTS-MET-00001-000")
    _save(case / "BraTS-MET-00001-000-t2w.nii.gz", _image(9, (12, 10, 7)), AFFINES["LPS like BraTS"])
    (case / "BraTS-MET-00001-000-t2f.nii.gz").write_bytes(b"\x1f\x8b broken")
    report = discover_volumes(tmp_path)
    with pytest.raises(DataError, match="co-registered"):
        read_case(report.cases[0], ("t1c", "t2w"))
    with pytest.raises(DataError, match="cannot read NIfTI"):
        read_case(report.cases[0], ("t1c", "t2f"))


def test_msd_task01_4d_images_and_nnunet_split_channels(tmp_path: Path) -> None:
    msd = tmp_path / "Task01_BrainTumour"
    four_d = np.stack([_image(k) for k in range(4)], axis=-1)
    _save(msd / "imagesTr" / "BRATS_001.nii.gz", four_d, np.eye(4))
    _save(msd / "labelsTr" / "BRATS_001.nii.gz", _labels(), np.eye(4))
    _save(msd / "imagesTs" / "BRATS_900.nii.gz", four_d, np.eye(4))
    report = discover_volumes(msd)
    assert report.layout == "msd" and report.convention == "msd"
    assert report.case_ids == ["BRATS_001", "BRATS_900"] and [c.case_id for c in report.labelled_cases] == ["BRATS_001"]
    volume = read_case(report.cases[0], ("t1c", "t2f"))  # Task01 channels: FLAIR, T1w, T1gd, T2w
    np.testing.assert_allclose(volume.images[..., 0], to_canonical(window_volume(four_d[..., 2])[0], np.eye(4)))
    np.testing.assert_allclose(volume.images[..., 1], to_canonical(window_volume(four_d[..., 0])[0], np.eye(4)))

    nnunet = tmp_path / "Dataset001"
    for k in range(4):
        _save(nnunet / "imagesTr" / f"case_7_{k:04d}.nii.gz", _image(k), np.eye(4))
    _save(nnunet / "labelsTr" / "case_7.nii.gz", _labels(), np.eye(4))
    (nnunet / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}}))
    report = discover_volumes(nnunet)
    assert report.case_ids == ["case_7"]
    sources = {name: source.path.name for name, source in report.cases[0].sequences.items()}
    assert sources == {"t1n": "case_7_0000.nii.gz", "t1c": "case_7_0001.nii.gz", "t2w": "case_7_0002.nii.gz",
                       "t2f": "case_7_0003.nii.gz"}


def test_brainmetshare_png_folders_sorted_numerically(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for folder in ("0", "1", "2", "3", "seg"):
        for number in (1, 2, 10):  # 10 after 2, not between 1 and 2
            image = (np.full((16, 16), number * 10) if folder == "seg" else rng.integers(1, 255, (16, 16))).astype(np.uint8)
            if folder == "seg":
                image[:8] = 0
            write_image(tmp_path / "Mets_005" / folder / f"{number}.png", image)
    write_image(tmp_path / "Mets_006" / "0" / "1.png", np.ones((16, 16), np.uint8))
    write_image(tmp_path / "Mets_006" / "1" / "2.png", np.ones((16, 16), np.uint8))  # numbering differs: skipped
    report = discover_volumes(tmp_path)
    assert report.layout == "brainmetshare" and report.case_ids == ["Mets_005"]
    assert "numbering" in report.skipped["Mets_006"]
    case = report.cases[0]
    assert sorted(case.sequences) == ["t1c", "t1c_se", "t1n", "t2f"]
    assert [f.name for f in case.sequences["t1c"].slice_files] == ["1.png", "2.png", "10.png"]
    volume = read_case(case, ("t1c", "t2f"))
    assert volume.images.shape == (3, 16, 16, 2) and volume.spacing is None
    assert [int(volume.labels[z].max()) for z in range(3)] == [1, 1, 1]  # each slice's mask is binary


def test_generic_layout_combines_region_masks_into_brats_labels(tmp_path: Path) -> None:
    """The real mets_nifti_case naming: one folder is one case, region masks named whole / core."""
    affine = AFFINES["axial axis first"]
    whole = (_labels() > 0).astype(np.uint8)
    core = np.isin(_labels(), (1, 3)).astype(np.uint8)
    for name, data in (("t1ce", _image(0)), ("flair", _image(1)), ("whole_seg", whole), ("core_seg", core)):
        _save(tmp_path / f"YG_ABC_{name}_aligned.nii.gz", data, affine)
    report = discover_volumes(tmp_path)
    assert report.layout == "generic" and report.case_ids == ["YG_ABC"]
    case = report.cases[0]
    assert sorted(case.sequences) == ["t1c", "t2f"] and sorted(case.region_masks) == ["tc", "wt"]
    labels = read_case_labels(case)
    expected = np.where(core > 0, 1, np.where(whole > 0, 2, 0))
    np.testing.assert_array_equal(labels, to_canonical(expected, affine))
    assert sequence_of(Path("x_T1Gd.nii.gz")) == "t1c" and sequence_of(Path("x_FLAIR.nii")) == "t2f"
    assert sequence_of(Path("x_dwi.nii.gz")) is None


def test_folders_without_volumes_are_left_to_the_2d_layouts(tmp_path: Path, phantom_dir: Path) -> None:
    assert discover_volumes(phantom_dir) is None
    assert discover_volumes(tmp_path / "missing") is None


def test_a_seg_on_another_affine_of_the_same_shape_is_refused_not_silently_flipped(tmp_path: Path) -> None:
    case = _brats_case(tmp_path, "BraTS-MET-00001-000")
    _save(case / "BraTS-MET-00001-000-seg.nii.gz", _labels(), np.diag([1.0, 1.0, 2.5, 1.0]))  # RAS beside LPS
    report = discover_volumes(tmp_path)
    with pytest.raises(DataError, match="labels has another affine"):
        read_case(report.cases[0], ("t1c",))
    assert read_case(report.cases[0], ("t1c",), with_labels=False).labels is None


def test_a_binary_mask_collapses_and_a_brats_2021_folder_keeps_its_own_convention(tmp_path: Path) -> None:
    case = _brats_case(tmp_path / "mets", "BraTS-MET-00001-000")
    seg = case / "BraTS-MET-00001-000-seg.nii.gz"
    _save(seg, (_labels() > 0).astype(np.uint8) * 255, AFFINES["LPS like BraTS"])  # a 0/255 mask
    report = discover_volumes(tmp_path / "mets")
    assert set(np.unique(read_case_labels(report.cases[0]))) == {0, 1}
    # BraTS 2018-2021: <case>_{t1,t1ce,t2,flair,seg}, labels 1 NCR, 2 ED, 4 ET, read (and written) as they are
    brats_2021 = np.where(_labels() == 3, 4, _labels()).astype(np.uint8)
    for name in ("t1", "t1ce", "t2", "flair"):
        _save(tmp_path / "2021" / "BraTS2021_00001" / f"BraTS2021_00001_{name}.nii.gz", _image(1), AFFINES["LPS like BraTS"])
    _save(tmp_path / "2021" / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz", brats_2021, AFFINES["LPS like BraTS"])
    report = discover_volumes(tmp_path / "2021")
    assert (report.layout, report.convention, report.case_ids) == ("brats2021", "brats2021", ["BraTS2021_00001"])
    assert sorted(report.cases[0].sequences) == ["t1c", "t1n", "t2f", "t2w"]
    labels = read_case_labels(report.cases[0])
    np.testing.assert_array_equal(labels, to_canonical(brats_2021, AFFINES["LPS like BraTS"]))
    et = resolve_target("et", report.convention).masks(labels)[..., 0]
    np.testing.assert_array_equal(et, to_canonical(_labels() == 3, AFFINES["LPS like BraTS"]))


@pytest.mark.parametrize(("convention", "label"), [("brats", 3), ("brats", 2), ("brats", 1), ("msd", 3), ("msd", 1),
                                                   ("brats2021", 4), ("brats_post", 4)])
def test_a_seg_with_one_label_keeps_its_meaning_in_every_convention(tmp_path: Path, convention: str,
                                                                    label: int) -> None:
    # an enhancing-only metastasis (or oedema-only, cavity-only) seg must not become label 1
    _brats_case(tmp_path, "BraTS-MET-00001-000")
    only = (_labels() > 0).astype(np.uint8) * np.uint8(label)
    _save(tmp_path / "BraTS-MET-00001-000" / "BraTS-MET-00001-000-seg.nii.gz", only, AFFINES["LPS like BraTS"])
    report = discover_volumes(tmp_path, convention=convention)
    labels = read_case_labels(report.cases[0])
    assert set(np.unique(labels)) == {0, label}
    for region, members in LABEL_CONVENTIONS[convention].items():
        expected = (label in members) * (_labels() > 0)
        np.testing.assert_array_equal(resolve_target(region, convention).masks(labels)[..., 0],
                                      to_canonical(expected.astype(np.uint8), AFFINES["LPS like BraTS"]))


def test_the_convention_is_decided_per_dataset_and_a_mix_is_refused(tmp_path: Path, caplog) -> None:
    _brats_case(tmp_path / "gli", "BraTS-GLI-00001-000")
    assert discover_volumes(tmp_path / "gli").convention == "brats_post"  # 4: resection cavity
    _brats_case(tmp_path / "gli", "BraTS-MET-00002-000")
    with pytest.raises(DataError, match="mixes BraTS sets"):
        discover_volumes(tmp_path / "gli")
    assert discover_volumes(tmp_path / "gli", convention="brats").convention == "brats"
    # a label outside the convention is kept, and warned about
    weird = _labels()
    weird[0, 0, 0] = 5
    _save(tmp_path / "gli" / "BraTS-MET-00002-000" / "BraTS-MET-00002-000-seg.nii.gz", weird, AFFINES["LPS like BraTS"])
    with caplog.at_level("WARNING"):
        read_case_labels(discover_volumes(tmp_path / "gli", convention="brats").cases[1])
    assert "label(s) 5 (1 voxels) are not in the brats convention" in caplog.text


def test_a_single_brats_case_folder_is_that_case(tmp_path: Path) -> None:
    case = _brats_case(tmp_path, "BraTS-MET-00110-000", seg=False)
    report = discover_volumes(case)
    assert (report.layout, report.case_ids) == ("brats_mets", ["BraTS-MET-00110-000"])


def test_layout_edge_cases_are_reported_not_dropped_or_merged(tmp_path: Path) -> None:
    # a BraTS case folder with a seg but no sequence, and an unknown sequence name asked for
    _brats_case(tmp_path / "brats", "BraTS-MET-00001-000")
    _save(tmp_path / "brats" / "BraTS-MET-00002-000" / "BraTS-MET-00002-000-seg.nii.gz", _labels(), np.eye(4))
    report = discover_volumes(tmp_path / "brats")
    assert report.case_ids == ["BraTS-MET-00001-000"] and "no sequence" in report.skipped["BraTS-MET-00002-000"]
    with pytest.raises(DataError, match="unknown sequence name.*flair"):
        report.select(("flair",))
    # 4D MSD-style files whose names end in four digits stay separate cases; .nii labels are found
    four_d = np.stack([_image(k) for k in range(4)], axis=-1)
    for name in ("pt_0001", "pt_0002"):
        _save(tmp_path / "msd" / "imagesTr" / f"{name}.nii.gz", four_d, np.eye(4))
    _save(tmp_path / "msd" / "labelsTr" / "pt_0001.nii", _labels(), np.eye(4))
    report = discover_volumes(tmp_path / "msd")
    assert report.case_ids == ["pt_0001", "pt_0002"] and [c.case_id for c in report.labelled_cases] == ["pt_0001"]
    # a generic case folder: a brain mask is not the lesion label map, other files are listed as ignored
    generic = tmp_path / "generic" / "case1"
    _save(generic / "case1_t1ce.nii.gz", _image(0), np.eye(4))
    _save(generic / "case1_brain_mask.nii.gz", np.ones(SHAPE, np.uint8), np.eye(4))
    _save(generic / "case1_seg.nii.gz", _labels(), np.eye(4))
    (generic / "readme.txt").write_text("notes")
    report = discover_volumes(tmp_path / "generic")
    assert report.cases[0].labels.path.name == "case1_seg.nii.gz"
    assert sorted(p.name for p in report.ignored_files) == ["case1_brain_mask.nii.gz", "readme.txt"]


def test_the_volume_cache_key_follows_dataset_json(tmp_path: Path) -> None:
    from metaseg_tf.config import ExperimentConfig
    from metaseg_tf.data.preprocess import _volume_files, cache_key

    for k in range(4):
        _save(tmp_path / "imagesTr" / f"case_7_{k:04d}.nii.gz", _image(k), np.eye(4))
    _save(tmp_path / "labelsTr" / "case_7.nii.gz", _labels(), np.eye(4))
    config = ExperimentConfig()
    before = cache_key(_volume_files(discover_volumes(tmp_path)), config)
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}}))
    assert cache_key(_volume_files(discover_volumes(tmp_path)), config) != before
