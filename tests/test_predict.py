"""Prediction: arrays, files, folders with bad files, NIfTI volumes with their affine; the real NIfTI case."""

from __future__ import annotations

from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from metaseg_tf.cli import main
from metaseg_tf.config import ConfigError
from metaseg_tf.data.discover import DataError
from metaseg_tf.data.volumes import axial_axis
from metaseg_tf.inference.files import predict_path
from metaseg_tf.inference.postprocess import select_components
from metaseg_tf.inference.predictor import Predictor


@pytest.fixture(scope="module")
def trained_run(served_runs: list[Path]) -> Path:
    """The session's small Attention U-Net run (conftest), trained once for the whole suite."""
    return served_runs[1]


def test_predictions_come_back_at_each_input_size(trained_run: Path) -> None:
    predictor = Predictor.from_run(trained_run, flip_tta=True)
    images = [np.random.default_rng(0).random((70, 50, 3)), np.random.default_rng(1).random((64, 64))]
    predictions = predictor.predict_slices(images)
    assert [p.mask.shape for p in predictions] == [(70, 50), (64, 64)]
    assert all(0 <= p.probability.min() and p.probability.max() <= 1 for p in predictions)
    assert all(set(np.unique(p.mask)) <= {0, 1} for p in predictions)
    assert all(p.lesion_count == len(p.lesion_areas) for p in predictions)


def test_small_components_are_removed_and_areas_reported() -> None:
    mask = np.zeros((20, 20), bool)
    mask[2:6, 2:6] = True  # 16 px
    mask[15, 15] = True  # 1 px
    kept, areas = select_components(mask, 5)
    assert areas == [16] and kept.sum() == 16


def test_folder_prediction_counts_and_lists_bad_files(trained_run: Path, phantom_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    for image in sorted(phantom_dir.rglob("*_1.png"))[:2]:
        (source / image.name).write_bytes(image.read_bytes())
    (source / "broken.png").write_bytes(b"not a png")
    out_dir, summary = predict_path(Predictor.from_run(trained_run), [source], tmp_path / "out", progress=False)
    assert summary == {"predicted": 2, "skipped": 1}
    table = pd.read_csv(out_dir / "predictions.csv")
    assert table["status"].str.startswith("skipped").sum() == 1
    assert len(list(out_dir.glob("*_mask.png"))) == 2 and len(list(out_dir.glob("*_overlay.png"))) == 2
    with pytest.raises(DataError, match="input not found"):
        predict_path(Predictor.from_run(trained_run), [tmp_path / "nope.png"], tmp_path / "out")


def test_slice_folders_get_a_lesion_report_per_case_from_the_masks_written(trained_run: Path, phantom_dir: Path,
                                                                            tmp_path: Path) -> None:
    """A kaggle_3m case's slices are stacked by slice number and its lesions counted in 3D from the written
    masks (spacing unknown: sizes in voxels, volumes NaN), as lesions.csv does for volumes."""
    from scipy import ndimage

    case = sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0]
    out_dir, _ = predict_path(Predictor.from_run(trained_run, threshold=0.3), [case], tmp_path / "out", progress=False)
    lesions = pd.read_csv(out_dir / "lesions.csv")
    rows = pd.read_csv(out_dir / "predictions.csv")
    outputs = sorted(rows["output"], key=lambda stem: int(stem.rsplit("_", 1)[1]))
    volume = np.stack([cv2.imread(str(out_dir / f"{stem}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0 for stem in outputs])
    _, count = ndimage.label(volume, structure=np.ones((3, 3, 3), bool))
    assert len(lesions) == count and set(lesions["case_id"]) <= {case.name}
    assert lesions["voxels"].sum() == volume.sum() and lesions["volume_mm3"].isna().all()
    assert (lesions["first_slice"] <= lesions["centre_slice"]).all() and (lesions["centre_slice"] <= lesions["last_slice"]).all()


def test_nifti_prediction_keeps_shape_and_affine(trained_run: Path, tmp_path: Path) -> None:
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [1.5, 0, 0, 0], [0, 0, 0, 1]])  # axis 0 is S-I
    volume = np.random.default_rng(0).normal(100, 20, (6, 40, 36)).astype(np.float32)
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    assert axial_axis(affine) == 0
    out_dir, summary = predict_path(Predictor.from_run(trained_run), [path], tmp_path / "out", progress=False)
    written = nib.load(str(out_dir / "case-seg.nii.gz"))
    assert written.shape == volume.shape and np.allclose(written.affine, affine)
    assert summary["cases"] == 1 and pd.read_csv(out_dir / "predictions.csv")["slices"].tolist() == [6]
    assert nib.load(str(out_dir / "case-probability.nii.gz")).shape == volume.shape
    assert (out_dir / "case-overlay.png").is_file()
    assert cv2.imread(str(path)) is None  # a NIfTI is not an image OpenCV could have read by accident


def test_outputs_of_inputs_that_share_a_name_never_overwrite_each_other(trained_run: Path, phantom_dir: Path,
                                                                         tmp_path: Path) -> None:
    slices = sorted(phantom_dir.rglob("*_1.png"))[:3]
    root = tmp_path / "in"
    for folder, source in zip(("a", "b"), slices):
        (root / folder).mkdir(parents=True)
        (root / folder / "x.png").write_bytes(source.read_bytes())
    cv2.imwrite(str(root / "x.tif"), cv2.imread(str(slices[2])))
    cv2.imwrite(str(root / "x.png"), cv2.imread(str(slices[2])))
    out_dir, summary = predict_path(Predictor.from_run(trained_run), [root], tmp_path / "out", progress=False)
    assert summary == {"predicted": 4, "skipped": 0}
    masks = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*_mask.png"))
    assert masks == ["a/x_mask.png", "b/x_mask.png", "x-png_mask.png", "x-tif_mask.png"]
    table = pd.read_csv(out_dir / "predictions.csv")
    assert sorted(table["output"]) == ["a/x", "b/x", "x-png", "x-tif"]
    twice = predict_path(Predictor.from_run(trained_run), [root / "a" / "x.png", root / "b" / "x.png"],
                         tmp_path / "out", progress=False)[0]  # two files of one name given directly
    assert sorted(p.name for p in twice.glob("*_mask.png")) == ["x-png-2_mask.png", "x-png_mask.png"]


def test_nan_voxels_are_counted_and_do_not_blank_the_volume(trained_run: Path, tmp_path: Path) -> None:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])  # axis 2 is S-I
    volume = np.random.default_rng(0).normal(100, 20, (40, 36, 5)).astype(np.float32)
    volume[:4, :4, :] = np.nan  # a corner of NaN on every slice
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    out_dir, _ = predict_path(Predictor.from_run(trained_run), [path], tmp_path / "out", progress=False)
    assert pd.read_csv(out_dir / "predictions.csv")["non_finite_voxels"].tolist() == [4 * 4 * 5]
    probability = nib.load(str(out_dir / "nan-probability.nii.gz")).get_fdata()
    assert np.isfinite(probability).all() and probability.std() > 0  # not a blank NaN volume


def test_real_nifti_case(trained_run: Path, real_data: Path, tmp_path: Path) -> None:
    """The real metastasis case: T1 post-contrast and FLAIR volumes, 256 x 256 x 224, axial axis 2."""
    case = real_data / "mets_nifti_case"
    t1ce, flair = sorted(case.glob("*t1ce*.nii.gz"))[0], sorted(case.glob("*flair*.nii.gz"))[0]
    out_dir, summary = predict_path(Predictor.from_run(trained_run), [t1ce], tmp_path / "out", progress=False)
    assert axial_axis(nib.load(str(t1ce)).affine) == 2
    assert summary["cases"] == 1 and pd.read_csv(out_dir / "predictions.csv")["slices"].tolist() == [224]
    written = nib.load(str(next(out_dir.glob("*-seg.nii.gz"))))
    source = nib.load(str(t1ce))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    # kaggle_3m channels are pre-contrast, FLAIR, post-contrast; this case has no pre-contrast volume
    three = predict_path(Predictor.from_run(trained_run), [t1ce, flair, t1ce], tmp_path / "out2", progress=False)[0]
    assert pd.read_csv(three / "predictions.csv")["slices"].tolist() == [224]
    with pytest.raises(DataError, match="give 1 volume or 3"):
        predict_path(Predictor.from_run(trained_run), [t1ce, flair], tmp_path / "out3", progress=False)


@pytest.mark.parametrize("name", ["nested_unet", "attention_unet"])
def test_models_saved_by_the_release_before_the_layout_move_load_and_predict_the_same(
        name: str, tmp_path: Path) -> None:
    import shutil

    import keras

    from metaseg_tf.inference.loading import load_model

    fixtures = Path(__file__).parent / "fixtures"
    saved = np.load(fixtures / "legacy-predictions.npz")
    shutil.copy(fixtures / f"legacy-{name}.keras", tmp_path / "best.keras")
    model = load_model(tmp_path)
    output = model.predict(saved["images"], verbose=0)
    output = output[-1] if isinstance(output, list) else output
    np.testing.assert_allclose(np.asarray(output), saved[name], atol=1e-5)
    compiled = keras.saving.load_model(fixtures / f"legacy-{name}.keras")  # the registered loss and metrics
    assert type(compiled.loss[-1] if isinstance(compiled.loss, list) else compiled.loss).__name__ == "SegmentationLoss"


def test_volume_cases_are_written_back_as_brats_seg_files_in_the_input_grid(brats_run: Path, brats_phantom_dir: Path,
                                                                             tmp_path: Path) -> None:
    """A multilabel run predicts a BraTS case folder (and a whole dataset folder): ``<case>-seg.nii.gz`` with
    labels of the BraTS convention, on the input's grid with its affine, and per-case scores per region."""
    case = sorted(p for p in brats_phantom_dir.iterdir() if p.is_dir())[0]
    predictor = Predictor.from_run(brats_run, threshold=0.3)
    assert predictor.target.names == ["wt", "tc", "et"] and predictor.target.convention == "brats"
    out_dir, summary = predict_path(predictor, [case], tmp_path / "out", progress=False)
    assert summary["cases"] == 1
    source = nib.load(str(case / f"{case.name}-t1c.nii.gz"))
    seg = nib.load(str(out_dir / f"{case.name}-seg.nii.gz"))
    assert seg.shape == source.shape and np.allclose(seg.affine, source.affine)
    assert seg.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 3}
    probability = nib.load(str(out_dir / f"{case.name}-probability.nii.gz"))
    assert probability.shape == (*source.shape, 3)  # one volume per region: WT, TC, ET
    row = pd.read_csv(out_dir / "predictions.csv").iloc[0]
    assert row["status"] == "ok" and 0 <= row["wt_dice"] <= 1 and "et_lesion_hd95" in row
    whole, whole_summary = predict_path(predictor, [brats_phantom_dir], tmp_path / "all", progress=False)
    assert whole_summary["cases"] == 4 and len(list(whole.glob("*-seg.nii.gz"))) == 4
    # the lesion report: per region, its lesions add up to the region's voxels in the seg file written
    lesions, rows = pd.read_csv(whole / "lesions.csv"), pd.read_csv(whole / "predictions.csv")
    assert set(lesions["case_id"]) <= set(rows["case_id"]) and len(lesions) == rows[["wt_lesions", "tc_lesions",
                                                                                      "et_lesions"]].sum().sum()
    for row in rows.itertuples():
        labels = np.asarray(nib.load(str(whole / f"{row.case_id}-seg.nii.gz")).dataobj)
        zooms = np.prod(nib.load(str(whole / f"{row.case_id}-seg.nii.gz")).header.get_zooms()[:3])
        own = lesions[lesions["case_id"] == row.case_id]
        for region, members in (("wt", (1, 2, 3)), ("tc", (1, 3)), ("et", (3,))):
            assert own[own["region"] == region]["voxels"].sum() == np.isin(labels, members).sum()
            assert getattr(row, f"{region}_lesion_volume_mm3") == pytest.approx(
                np.isin(labels, members).sum() * zooms, rel=1e-5)


def test_case_scores_read_the_labels_in_the_convention_of_the_predicted_dataset(brats_run: Path, brats_phantom_dir: Path,
                                                                               tmp_path: Path) -> None:
    """The BraTS-trained run predicts one case in BraTS layout and the same case in MSD layout (4D FLAIR, T1w,
    T1gd, T2w; labels 1 oedema, 2 non-enhancing, 3 enhancing): the per-region scores must be the same."""
    case = sorted(p for p in brats_phantom_dir.iterdir() if p.is_dir())[0]
    volumes = {name: nib.load(str(case / f"{case.name}-{name}.nii.gz")) for name in ("t2f", "t1n", "t1c", "t2w", "seg")}
    affine = volumes["t1c"].affine
    four_d = np.stack([np.asarray(volumes[name].dataobj) for name in ("t2f", "t1n", "t1c", "t2w")], axis=-1)
    seg = np.asarray(volumes["seg"].dataobj)
    msd_labels = np.select([seg == 1, seg == 2, seg == 3], [2, 1, 3], 0).astype(np.uint8)  # NETC 1->2, SNFH 2->1
    for folder, data in (("imagesTr", four_d), ("labelsTr", msd_labels)):
        (tmp_path / "msd" / folder).mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "msd" / folder / f"{case.name}.nii.gz"))
    predictor = Predictor.from_run(brats_run, threshold=0.3)
    brats = pd.read_csv(predict_path(predictor, [case], tmp_path / "a", progress=False)[0] / "predictions.csv")
    msd = pd.read_csv(predict_path(predictor, [tmp_path / "msd"], tmp_path / "b", progress=False)[0] / "predictions.csv")
    for column in ("wt_dice", "tc_dice", "et_dice", "tc_lesion_dice"):
        assert msd[column].iloc[0] == pytest.approx(brats[column].iloc[0]), column


def _msd_copy(case: Path, root: Path) -> Path:
    """The BraTS case as an MSD Task01 dataset: one 4D file (FLAIR, T1w, T1gd, T2w) and labels 1 oedema,
    2 non-enhancing, 3 enhancing."""
    volumes = {name: nib.load(str(case / f"{case.name}-{name}.nii.gz")) for name in ("t2f", "t1n", "t1c", "t2w", "seg")}
    four_d = np.stack([np.asarray(volumes[name].dataobj) for name in ("t2f", "t1n", "t1c", "t2w")], axis=-1)
    seg = np.asarray(volumes["seg"].dataobj)
    msd_labels = np.select([seg == 1, seg == 2, seg == 3], [2, 1, 3], 0).astype(np.uint8)
    for folder, data in (("imagesTr", four_d), ("labelsTr", msd_labels)):
        (root / folder).mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, volumes["t1c"].affine), str(root / folder / f"{case.name}.nii.gz"))
    return root


def test_segs_are_written_in_the_predicted_datasets_convention_and_scored_as_written(
        brats_run: Path, brats_phantom_dir: Path, tmp_path: Path) -> None:
    """A BraTS-trained run predicting MSD data writes MSD labels (oedema 1, not BraTS's NETC 1), says so in
    predictions.csv, and its per-case scores are those of the written file read back by region, as the
    challenge scripts read a submission; input folders of two conventions are refused."""
    from metaseg_tf.evaluation.scores import hausdorff_distance, overlap_scores

    case = sorted(p for p in brats_phantom_dir.iterdir() if p.is_dir())[0]
    msd = _msd_copy(case, tmp_path / "msd")
    predictor = Predictor.from_run(brats_run, threshold=0.3)
    brats_dir, _ = predict_path(predictor, [case], tmp_path / "a", progress=False)
    msd_dir, _ = predict_path(predictor, [msd], tmp_path / "b", progress=False)
    as_brats = np.asarray(nib.load(str(brats_dir / f"{case.name}-seg.nii.gz")).dataobj)
    written = nib.load(str(msd_dir / f"{case.name}-seg.nii.gz"))
    as_msd = np.asarray(written.dataobj)
    assert (as_brats > 0).any() and set(np.unique(as_brats)) > {0, 2}
    np.testing.assert_array_equal(as_msd, np.select([as_brats == 1, as_brats == 2, as_brats == 3], [2, 1, 3], 0))
    row = pd.read_csv(msd_dir / "predictions.csv").iloc[0]
    assert row["label_convention"] == "msd"
    truth = np.asarray(nib.load(str(msd / "labelsTr" / f"{case.name}.nii.gz")).dataobj)
    spacing = written.header.get_zooms()[:3]
    for region, members in {"wt": (1, 2, 3), "tc": (2, 3), "et": (3,)}.items():
        mine, theirs = np.isin(as_msd, members), np.isin(truth, members)
        assert row[f"{region}_dice"] == pytest.approx(overlap_scores(theirs, mine)["dice"]), region
        assert row[f"{region}_hd95"] == pytest.approx(hausdorff_distance(theirs, mine, 95, spacing)), region
    with pytest.raises(DataError, match="different label conventions"):
        predict_path(predictor, [case, msd], tmp_path / "c", progress=False)


def test_a_4d_msd_file_and_a_lone_brats_case_folder_are_predicted_as_cases(brats_run: Path, brats_phantom_dir: Path,
                                                                            tmp_path: Path) -> None:
    case = sorted(p for p in brats_phantom_dir.iterdir() if p.is_dir())[0]
    msd = _msd_copy(case, tmp_path / "msd")
    predictor = Predictor.from_run(brats_run, threshold=0.3)
    out_dir, summary = predict_path(predictor, [msd / "imagesTr" / f"{case.name}.nii.gz"], tmp_path / "a", progress=False)
    assert summary["cases"] == 1 and (out_dir / f"{case.name}-seg.nii.gz").is_file()
    # a validation case: four sequences and no seg; the file carries the case id, as an evaluator matches it
    lone = tmp_path / case.name
    lone.mkdir()
    for name in ("t1c", "t1n", "t2f", "t2w"):
        (lone / f"{case.name}-{name}.nii.gz").write_bytes((case / f"{case.name}-{name}.nii.gz").read_bytes())
    out_dir, _ = predict_path(predictor, [lone], tmp_path / "b", progress=False)
    assert [p.name for p in out_dir.glob("*-seg.nii.gz")] == [f"{case.name}-seg.nii.gz"]
    # the web app's volume route writes only the seg it returns
    from metaseg_tf.data.layouts import discover_volumes
    from metaseg_tf.data.volumes import read_case
    from metaseg_tf.inference.files import write_case_prediction

    volume = read_case(discover_volumes(lone).cases[0], ("t1c", "t2f", "t1n"))
    (tmp_path / "c").mkdir()
    written = write_case_prediction(volume, predictor.predict_volume(volume), tmp_path / "c", outputs=("seg",))
    assert list(written) == ["seg"] and [p.name for p in (tmp_path / "c").iterdir()] == [f"{case.name}-seg.nii.gz"]


def test_a_context_model_reads_the_neighbouring_slices_of_a_folder_by_case_and_number(brats_run: Path,
                                                                                     tmp_path: Path) -> None:
    """Slices named <case>_<n> are each other's 2.5D neighbours at prediction, as at training; a lone slice is
    its own neighbour."""
    predictor = Predictor.from_run(brats_run, threshold=0.3)
    rng = np.random.default_rng(0)
    images = [rng.random((40, 40, 3)).astype(np.float32) for _ in range(3)]
    together = predictor.predict_slices(images, case_ids=["a", "a", "a"], slice_indices=[3, 1, 2])
    alone = predictor.predict_slices(images)
    assert not np.allclose(together[2].probability, alone[2].probability)
    single = predictor.predict_slices(images[:1], case_ids=["a"], slice_indices=[1])
    np.testing.assert_allclose(single[0].probability, alone[0].probability, atol=1e-6)
    from metaseg_tf.data.context import stack_context

    slices = np.stack([predictor.prepare_slice(image, alone=False) for image in images])
    expected = predictor._probabilities(stack_context(slices, np.array([[1, 2, 0]])))[0, ..., 0]  # slice 2: 1, 2, 3
    resized = cv2.resize(expected, (40, 40), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(together[2].probability, resized, atol=1e-5)
    folder = tmp_path / "case"
    folder.mkdir()
    for number, image in zip((3, 1, 2), images):
        cv2.imwrite(str(folder / f"a_{number}.png"), cv2.cvtColor(np.round(image * 255).astype(np.uint8), cv2.COLOR_RGB2BGR))
    out_dir, _ = predict_path(predictor, [folder], tmp_path / "out", progress=False)
    assert len(list(out_dir.glob("a_*_mask.png"))) == 3


def test_small_lesions_are_removed_in_3d_per_case_with_slices_placed_by_number() -> None:
    from metaseg_tf.inference.postprocess import select_lesions

    masks = np.zeros((5, 8, 8), np.uint8)
    masks[0, 1:3, 1:3] = 1  # case a, slice 3: 4 voxels, joined with slice 4 below into one lesion of 8
    masks[1, 1:3, 1:3] = 1  # case a, slice 4
    masks[2, 1:3, 1:3] = 1  # case a, slice 6: 4 voxels; slice 5 is missing, so it stays a lesion of its own
    masks[3, 5:7, 5:7] = 1  # case b, slice 4: 4 voxels
    masks[4, 5:7, 5:7] = 1  # case b, slice 3
    kept = select_lesions(masks, ["a", "a", "a", "b", "b"], [3, 4, 6, 4, 3], min_voxels=5)
    np.testing.assert_array_equal(kept[[0, 1, 3, 4]], masks[[0, 1, 3, 4]])
    assert kept[2].sum() == 0
    np.testing.assert_array_equal(select_lesions(masks, list("aaabb"), [3, 4, 6, 4, 3], 0), masks)

    # the largest lesion alone (Buda et al.'s 3D LCC), or the lesions over >= 2 neighbouring slices, per case
    cases, numbers = ["a", "a", "a", "b", "b"], [3, 4, 6, 4, 3]
    largest = select_lesions(masks, cases, numbers, 0, keep="largest")
    np.testing.assert_array_equal(largest[[0, 1, 3, 4]], masks[[0, 1, 3, 4]])  # a's 8-voxel lesion, b's only one
    assert largest[2].sum() == 0
    persistent = select_lesions(masks, cases, numbers, 0, keep="persistent")
    np.testing.assert_array_equal(persistent, largest)  # a's slice 6 stands alone: its neighbour 5 is missing
    two = np.zeros((3, 8, 8), np.uint8)
    two[0:2, 1:3, 1:3] = 1  # 8 voxels over two slices
    two[0:3, 5:6, 5:6] = 1  # 3 voxels over three slices
    two[2, 6:8, 0:2] = 1  # 4 voxels on slice 2 only
    assert select_lesions(two, ["c"] * 3, [0, 1, 2], 0, keep="largest").sum() == 8
    assert select_lesions(two, ["c"] * 3, [0, 1, 2], 0, keep="persistent").sum() == 8 + 3
    # a case of one slice has no neighbours: every lesion stays (as for a slice given by itself)
    np.testing.assert_array_equal(select_lesions(two[2:], ["d"], [7], 0, keep="persistent"), two[2:])
    with pytest.raises(ValueError, match="keep must be one of"):
        select_lesions(masks, cases, numbers, 0, keep="biggest")


def test_keep_lesions_in_2d_and_through_the_predictor(trained_run: Path) -> None:
    mask = np.zeros((20, 20), np.uint8)
    mask[2:6, 2:6], mask[10:12, 10:12] = 1, 1  # 16 and 4 px
    assert select_components(mask, 0, "largest")[1] == [16]
    assert select_components(mask, 0, "persistent")[1] == [16, 4], "a slice by itself has no neighbours"
    assert select_components(np.zeros((4, 4), np.uint8), 0, "largest")[1] == []
    predictor = Predictor.from_run(trained_run, keep_lesions="largest")
    probabilities = np.zeros((3, 20, 20, 1), np.float32)
    probabilities[0, 2:6, 2:6], probabilities[2, 10:12, 10:12] = 0.9, 0.9  # slices 0 and 2 of one case
    kept = predictor.masks(probabilities, ["c"] * 3, [0, 1, 2])
    assert kept[0].sum() == 16 and kept[2].sum() == 0
    assert predictor.inference_record()["keep_lesions"] == "largest"
    with pytest.raises(ConfigError, match="keep_lesions"):
        Predictor.from_run(trained_run, keep_lesions="biggest")


def test_small_lesion_removal_places_sparse_slice_numbers_as_the_evaluation_does() -> None:
    from metaseg_tf.inference.postprocess import select_lesions

    masks = np.zeros((2, 8, 8), np.uint8)
    masks[:, 2:4, 2:4] = 1  # two slices numbered like dates: a volume spanning the numbers would not fit in memory
    kept = select_lesions(masks, ["a", "a"], [20010101, 20030101], min_voxels=5)
    assert kept.sum() == 0, "far-apart slices are separate 4-voxel lesions, both below 5"


def test_a_run_that_chooses_its_threshold_on_validation_predicts_and_serves_at_that_threshold(
        trained_run: Path, phantom_slice, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json
    import shutil

    from fastapi.testclient import TestClient

    from metaseg_tf.evaluation.report import evaluate_run
    from metaseg_tf.inference.export import stale_control_threshold
    from metaseg_tf.runs.records import chosen_threshold, run_threshold
    from metaseg_tf.serve.api import create_app

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("export-*", "evaluation-*"))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "threshold_from_validation": True}))
    before = Predictor.from_run(run)
    assert (before.threshold, before.threshold_source) == (config["threshold"], "config")
    assert "no evaluation has chosen it yet" in caplog.text
    assert chosen_threshold(trained_run) is None and chosen_threshold(run) is None
    assert run_threshold(run) == (config["threshold"], "config")  # what int8 accuracy control scores at

    evaluation = evaluate_run(run, "test", progress=False)
    assert evaluation.summary["threshold_source"] == "validation"
    chosen = evaluation.summary["threshold"]
    assert chosen_threshold(run) == chosen
    predictor = Predictor.from_run(run)
    assert (predictor.threshold, predictor.threshold_source) == (chosen, "validation")
    assert run_threshold(run) == (chosen, "validation")
    # an int8 export controlled before the evaluation chose its threshold is flagged; one controlled at it is not
    export = tmp_path / "export-openvino-int8"
    export.mkdir()
    before_choice = chosen + 0.1 if chosen < 0.5 else chosen - 0.1  # another threshold than the chosen one
    (export / "export.json").write_text(json.dumps({"threshold": before_choice, "threshold_source": "config"}))
    assert stale_control_threshold(export, run) == chosen
    (export / "export.json").write_text(json.dumps({"threshold": chosen, "threshold_source": "validation"}))
    assert stale_control_threshold(export, run) is None
    (export / "export.json").write_text(json.dumps({"precision": "int8", "max_drop": None}))  # plain quantisation
    assert stale_control_threshold(export, run) is None
    given = Predictor.from_run(run, threshold=0.42)
    assert (given.threshold, given.threshold_source) == (0.42, "given")
    caplog.clear()
    Predictor.from_run(run, flip_tta=not config["flip_tta"])
    assert "chosen on validation with the run's own settings, not with flip TTA" in caplog.text

    # whatever the sweep chose, the served threshold is the recorded one, not the config's 0.5
    summary = json.loads((evaluation.out_dir / "summary.json").read_text())
    (evaluation.out_dir / "summary.json").write_text(json.dumps({**summary, "threshold": 0.35}))
    with TestClient(create_app([run])) as client:
        (info,) = client.get("/models").json()
        assert (info["threshold"], info["threshold_source"]) == (0.35, "validation")
        image = phantom_slice[0].read_bytes()
        served = client.post("/predict", files={"file": ("s.png", image)}).json()["predictions"][0]
        assert served["threshold"] == 0.35


def _tree(folder: Path) -> dict[str, object]:
    """Every output of a predictions folder by name: NIfTI files by their voxels and affine (their gzip headers
    carry the time), the rest byte for byte; the parts' own records left out."""
    found: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_dir() or name.startswith("parts") or name.endswith(".lock"):
            continue
        if name.endswith(".nii.gz"):
            image = nib.load(str(path))
            found[name] = (np.asarray(image.dataobj).tobytes(), image.affine.tobytes(), image.get_data_dtype().str)
        else:
            found[name] = path.read_bytes()
    return found


@pytest.mark.parametrize("kind", ["volume cases", "slices of a folder"])
def test_parts_together_write_exactly_what_one_process_writes(brats_run: Path, brats_phantom_dir: Path,
                                                              phantom_dir: Path, tmp_path: Path, kind: str) -> None:
    """nnU-Net's -num_parts/-part_id: 3 parts of 8 volume cases (two inputs that share case ids), or 4 parts of
    a slice folder (a 2.5D model: each case's slices in one part) and a broken file, run into one shared folder,
    give the files and the predictions.csv of one process."""
    if kind == "volume cases":  # two inputs that share case ids: names made unique over all, as one process does
        run, inputs, parts = brats_run, [brats_phantom_dir, brats_phantom_dir], 3
    else:
        (tmp_path / "bad.png").write_bytes(b"not an image")
        run, inputs, parts = brats_run, [phantom_dir, tmp_path / "bad.png"], 4
    single, _ = predict_path(Predictor.from_run(run), inputs, tmp_path / "one", progress=False)
    shared = tmp_path / "shared"
    written = []
    for index in reversed(range(parts)):  # the order they finish in does not matter
        assert main(["-q", "predict", str(run), "--input", *map(str, inputs), "--out", str(shared),
                     "--num-parts", str(parts), "--part-id", str(index)]) == 0
        written.append((shared / "predictions.csv").is_file())
    assert written == [False] * (parts - 1) + [True], "the last part to finish writes predictions.csv"
    assert _tree(shared) == _tree(single)
    assert len(list((shared / "parts").glob("part-*-of-*.json"))) == parts


def test_parts_finishing_at_once_write_predictions_csv_exactly_once(tmp_path: Path) -> None:
    """Eight parts that finish in the same instant (threads: each opens its own lock, as processes do): none
    is refused, exactly one writes predictions.csv, with every row in its place; a part that died after its
    rows were in, run again, finishes without predicting."""
    import threading

    from metaseg_tf.inference.parts import Part, finish_part, open_shared, part_done

    count, written, errors = 8, [], []
    for index in range(count):
        open_shared(tmp_path / "shared", Part(count, index), {"run": "r"})
    # an option the first parts did not know yet (unset: None) still joins; one set otherwise does not
    open_shared(tmp_path / "shared", Part(count, 0), {"run": "r", "keep_lesions": None})
    with pytest.raises(ConfigError, match="keep_lesions differ"):
        open_shared(tmp_path / "shared", Part(count, 0), {"run": "r", "keep_lesions": "largest"})
    barrier = threading.Barrier(count)

    def finish(index: int) -> None:
        barrier.wait()
        try:
            rows = [((1, k), {"case_id": f"c{k}", "status": "ok"}) for k in range(index, 20, count)]
            written.append(finish_part(tmp_path / "shared", Part(count, index), rows) is not None)
        except Exception as error:  # noqa: BLE001 - any refusal is the failure this test looks for
            errors.append(error)

    threads = [threading.Thread(target=finish, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and sorted(written) == [False] * (count - 1) + [True]
    assert list(pd.read_csv(tmp_path / "shared" / "predictions.csv")["case_id"]) == [f"c{k}" for k in range(20)]
    (tmp_path / "shared" / "predictions.csv").unlink()  # as if the writer had died before it
    assert part_done(tmp_path / "shared", Part(count, 3))
    assert finish_part(tmp_path / "shared", Part(count, 3), None) is not None
    assert len(pd.read_csv(tmp_path / "shared" / "predictions.csv")) == 20


def test_parts_of_another_request_are_refused_and_a_part_done_only_finishes(brats_run: Path, brats_phantom_dir: Path,
                                                                  tmp_path: Path, capsys) -> None:
    shared, command = tmp_path / "shared", ["-q", "predict", str(brats_run), "--input", str(brats_phantom_dir)]
    assert main([*command, "--out", str(shared), "--num-parts", "2", "--part-id", "0"]) == 0
    done = (shared / "parts" / "part-0-of-2.json").stat().st_mtime_ns
    assert main([*command, "--out", str(shared), "--num-parts", "2", "--part-id", "0"]) == 0  # only finishes
    assert (shared / "parts" / "part-0-of-2.json").stat().st_mtime_ns == done, "not predicted again"
    assert main([*command, "--out", str(shared), "--num-parts", "3", "--part-id", "1"]) == 2
    assert "holds the parts of another prediction (num_parts differ)" in capsys.readouterr().err
    assert main([*command, "--out", str(shared), "--num-parts", "2", "--part-id", "1", "--threshold", "0.3"]) == 2
    assert "threshold differ" in capsys.readouterr().err
    assert main([*command, "--num-parts", "2", "--part-id", "1"]) == 2
    assert "name the predictions folder the parts share with --out" in capsys.readouterr().err
    assert main([*command, "--out", str(shared), "--num-parts", "2", "--part-id", "2"]) == 2
    assert "--part-id must lie in [0, 1]" in capsys.readouterr().err
    assert not (shared / "predictions.csv").exists(), "part 1 never ran"
