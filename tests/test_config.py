"""ExperimentConfig: validation, JSON/YAML round trips, the preprocessing key."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaseg_tf.config import ConfigError, ExperimentConfig


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    config = ExperimentConfig(image_size=64, filters=(8, 16, 32), clahe=False)
    loaded = ExperimentConfig.load(config.save(tmp_path / f"c{suffix}"))
    assert loaded == config


@pytest.mark.parametrize(
    "changes",
    [{"channels": 2}, {"image_size": 100}, {"normalisation": "robust"}, {"test_fraction": 1.0},
     {"n_folds": 1}, {"n_folds": 3, "fold": 3}, {"zoom_range": 1.5}, {"batch_size": 0}],
)
def test_invalid_values_are_rejected(changes: dict) -> None:
    with pytest.raises(ConfigError):
        ExperimentConfig(**changes)


def test_unknown_fields_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown config field"):
        ExperimentConfig.from_dict({"imagesize": 64})
    with pytest.raises(ConfigError, match="not found"):
        ExperimentConfig.load(tmp_path / "missing.json")


def test_preprocessing_key_changes_only_with_preprocessing_fields() -> None:
    base = ExperimentConfig()
    assert base.replace(epochs=3).preprocessing_key() == base.preprocessing_key()
    assert base.replace(clahe_clip_limit=3.0).preprocessing_key() != base.preprocessing_key()


def test_a_config_file_from_before_a_field_existed_is_the_same_config(tmp_path: Path) -> None:
    import json

    from metaseg_tf.runs.folders import same_config

    config = ExperimentConfig(epochs=3)
    older = {key: value for key, value in config.to_dict().items() if key not in ("flip_tta", "min_lesion_voxels")}
    (tmp_path / "config.json").write_text(json.dumps(older))
    assert same_config(tmp_path / "config.json", config)
    assert not same_config(tmp_path / "config.json", config.replace(flip_tta=True))
    (tmp_path / "config.json").write_text(json.dumps({**older, "a_future_field": 1}))
    assert not same_config(tmp_path / "config.json", config)


def test_the_lgg_recipes_load_and_recipe_lgg_adds_only_its_own_settings() -> None:
    """results/lgg_recipe/recipe-lgg.yml is recipe.yml plus the missing-sequence fill, the largest lesion and
    XLA (its header says so): a change of one without the other fails here."""
    import yaml

    folder = Path(__file__).resolve().parents[1] / "results/lgg_recipe"
    recipe, recipe_lgg = (yaml.safe_load((folder / name).read_text()) for name in ("recipe.yml", "recipe-lgg.yml"))
    assert recipe_lgg == {**recipe, "sequence_fill_probability": 0.2, "sequence_fill_channel": 1,
                          "keep_lesions": "largest", "jit_compile": "on"}
    for name in ("recipe.yml", "recipe-lgg.yml"):
        config = ExperimentConfig.load(folder / name)
        assert config.image_size == 128 and config.flip_tta
    assert ExperimentConfig.load(folder / "recipe-lgg.yml").keep_lesions == "largest"
