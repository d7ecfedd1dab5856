"""Profiles, validation messages, overrides and the run directory's config record."""

import json

import pytest

from synthgap_helpers import config


@pytest.mark.parametrize("profile", config.PROFILES)
def test_every_shipped_profile_validates(profile, tmp_path):
    cfg = config.resolve(profile, run_dir=tmp_path)
    assert cfg.profile == profile and cfg.run_dir == tmp_path.resolve()


def test_smoke_profile_uses_small_balanced_subsets(tmp_path):
    cfg = config.resolve("smoke", run_dir=tmp_path)
    assert (cfg.data.train_per_class, cfg.data.val_per_class, cfg.data.test_per_class) == (50, 20, 50)


def test_unknown_profile_lists_the_shipped_ones():
    with pytest.raises(config.ConfigError, match="unknown profile 'fast'.*smoke, gpu-small, paper"):
        config.resolve("fast")


def test_unknown_key_names_key_value_and_allowed_keys(tmp_path):
    with pytest.raises(config.ConfigError) as info:
        config.resolve("smoke", tmp_path, ["data.train_per_klass=10"])
    message = str(info.value)
    assert "data.train_per_klass" in message and "10" in message and "train_per_class" in message


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(config.ConfigError, match=r"data\.val_per_class = 'many'.*integer"):
        config.resolve("smoke", tmp_path, ["data.val_per_class=many"])


def test_out_of_range_value_says_what_is_allowed(tmp_path):
    with pytest.raises(config.ConfigError, match=r"data\.val_per_class = 0.*greater than or equal to 1"):
        config.resolve("smoke", tmp_path, {"data.val_per_class": 0})


def test_literal_value_lists_the_choices(tmp_path):
    with pytest.raises(config.ConfigError, match=r"on_bad_image = 'ignore'.*'error' or 'skip'"):
        config.resolve("smoke", tmp_path, ["data.on_bad_image=ignore"])


def test_bad_device_is_refused(tmp_path):
    with pytest.raises(config.ConfigError, match="device = 'gpu'"):
        config.resolve("smoke", tmp_path, ["device=gpu"])


def test_overrides_parse_yaml_values_into_nested_keys():
    assert config.parse_overrides(["seed=3", "data.test_per_class=null", "data.root=/x y"]) == {
        "seed": 3, "data": {"test_per_class": None, "root": "/x y"}}
    assert config.parse_overrides("seed=3 device=cpu") == {"seed": 3, "device": "cpu"}


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(config.ConfigError, match="'seed' is not of the form key=value"):
        config.parse_overrides(["seed"])


def test_profile_file_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("seed: 7\ndata:\n  val_per_class: 3\n")
    cfg = config.resolve(str(path), run_dir=tmp_path / "run")
    assert (cfg.profile, cfg.seed, cfg.data.val_per_class) == ("mine", 7, 3)


def test_load_records_parameters_and_provenance(tmp_path):
    cfg = config.load("smoke", run_dir=tmp_path, overrides=["seed=5"])
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["params"] == cfg.params() and record["params"]["seed"] == 5
    provenance = record["provenance"]
    assert {"started_utc", "python", "packages", "git_sha", "device", "seed"} <= set(provenance)
    assert provenance["packages"]["torch"] and provenance["device"] == "cpu"


def test_same_parameters_reuse_the_run_directory(tmp_path):
    config.load("smoke", run_dir=tmp_path)
    before = (tmp_path / "config.json").read_text()
    config.load("smoke", run_dir=tmp_path)
    assert (tmp_path / "config.json").read_text() == before


def test_other_parameters_on_the_same_run_directory_are_refused(tmp_path):
    config.load("smoke", run_dir=tmp_path)
    with pytest.raises(config.ConfigError, match=r"data\.val_per_class: recorded 20, now 30"):
        config.load("smoke", run_dir=tmp_path, overrides=["data.val_per_class=30"])


def test_banner_says_smoke_numbers_check_the_machinery_only_and_names_the_data(tmp_path):
    text = config.banner(config.resolve("smoke", tmp_path)).data
    assert "smoke" in text and "machinery only" in text
    assert "CIFAR-10 from the embedded sample" in text and "700 train / 500 test images, fingerprint `" in text


def test_the_embedded_sample_excludes_a_data_folder_and_a_york_urban_folder(tmp_path):
    with pytest.raises(config.ConfigError, match="root .* must be null"):
        config.resolve("smoke", tmp_path, ["data.root=/data/cifar"])
    with pytest.raises(config.ConfigError, match="geometry.york_urban_root .* must be null"):
        config.resolve("smoke", tmp_path, ["geometry.york_urban_root=/data/york"])


def test_parameters_added_by_a_newer_version_are_recorded_not_refused(tmp_path):
    config.load("smoke", run_dir=tmp_path)
    path = tmp_path / "config.json"
    record = json.loads(path.read_text())
    del record["params"]["data"]["on_bad_image"]
    path.write_text(json.dumps(record))
    config.load("smoke", run_dir=tmp_path)
    assert json.loads(path.read_text())["params"]["data"]["on_bad_image"] == "error"


def test_each_torchrun_process_gets_its_own_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a node with 4 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert config.resolve_device("cuda") == "cuda:3"
    assert config.resolve_device("cuda:1") == "cuda:1" and config.resolve_device("cpu") == "cpu"
