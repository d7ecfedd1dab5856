"""Tests of the profile cost estimate: the counts follow from the parameters, hours from the rates given."""

from __future__ import annotations

import math

import pytest
import torch

from synthgap_helpers import cli, config, cost
from synthgap_helpers.sd import pipelines as diffusion
from synthgap_helpers.train import arms as train_arms
from synthgap_helpers.train.models import MODELS, build_model

GENERATION_ROWS = ("SD generation (02)", "DI embedding training (03)", "DI sampling (03)")


def image_folder(root, per_class: dict[str, int], suffix: str = ".png"):
    """A class-folder set with `per_class[c]` empty image files in class folder c (counting reads no pixels)."""
    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i:04d}{suffix}").write_bytes(b"")
    return root


def test_real_and_synthetic_sizes_follow_the_profile():
    paper = config.resolve("paper")
    assert cost.real_sizes(paper) == {"train": 45000, "val": 5000, "test": 10000}
    assert cost.synthetic_sizes(paper) == {"sd": 50000, "di": 45000 * 5}
    smoke = config.resolve("smoke")  # 2 groups of 20 inverted, 2 samples each; 20 SD images per class
    assert cost.synthetic_sizes(smoke) == {"sd": 200, "di": 80}


def test_work_counts_steps_images_and_guided_passes():
    cfg = config.resolve("gpu-small")
    work = cost.work_table(cfg)
    assert work.loc["SD generation (02)", "amount"] == 5000
    assert "18 denoising steps x 2 U-Net passes" in work.loc["SD generation (02)", "what"]  # img2img: int(25 x 0.75)
    assert work.loc["DI embedding training (03)", "amount"] == 50 * 2000
    # the 5 arms, di@sd-size and real+di@sd-size, 5 seeds each
    assert work.loc["classifier training (04)", "amount"] == 7 * 5 * 10000 * 128
    assert "7 arms" in work.loc["classifier training (04)", "what"]
    assert work.loc["low-data sweep (07)", "amount"] == 4 * 3 * 5 * 5000 * 128
    assert work.loc["fine-tuning (07)", "amount"] == 4 * 2 * 5 * (5000 + 5000) * 128  # synthetic-only model, then tuning
    assert work.loc["Grad-CAM maps (05)", "amount"] == 7 * 5 * 1000  # every seed of every arm
    only = cost.work_table(config.resolve("gpu-small", overrides={"gradcam.model_seed": 0}))
    assert only.loc["Grad-CAM maps (05)", "amount"] == 7 * 1000
    assert work.loc["real-vs-synthetic detectors (07)", "amount"] == 2 * 3 * 1000 * 128  # sd, di and the real floor


def test_curation_counts_every_selection_arm_and_scaling_share_once():
    from synthgap_helpers.curation.stage import SELECTIONS

    assert cost.CURATION_SELECTIONS == len(SELECTIONS)
    work = cost.work_table(config.resolve("gpu-small"))  # 2 sources, 2 arms, 5 seeds, 5000 steps at batch 128
    # 7 selections x 2 arms x 2 sources, plus the scaling shares 0.1, 0.25 and 1.0 (0.5 is the random selection)
    assert work.loc["curation selections and scaling (08)", "amount"] == 5 * (7 * 2 * 2 + 3 * 2) * 5000 * 128
    assert work.loc["curation scores (08)", "amount"] == 5000 + 5000 * 5 + 10 * 400 + 10 * 100
    disk = cost.disk_table(config.resolve("smoke"))  # 200 SD + 80 DI + 200 reference + 50 untrained real images
    assert disk.loc["curation scores and rows", "bytes"] == cost.CSV_ROW_BYTES * 530


def test_an_epoch_budget_counts_whole_batches_over_the_pool():
    cfg = config.resolve("smoke", overrides={"train.steps": None, "train.epochs": 1.5, "train.batch_size": 64,
                                             "train.mix": "concat", "train.seeds": 1})
    per_arm = {"real": 500, "sd": 200, "di": 80, "real+sd": 700, "real+di": 580, "sd@di-size": 80,
               "real+sd@di-size": 580}
    expected = sum(-(-int(1.5 * n) // 64) * 64 for n in per_arm.values())
    assert cost.work_table(cfg).loc["classifier training (04)", "amount"] == expected
    shared = config.resolve("smoke", overrides={"train.steps": None, "train.epochs": 2.0, "train.batch_size": 50,
                                                "train.mix": "fixed_share", "lowdata.steps": None,
                                                "lowdata.k_per_class": [5, 20], "lowdata.seeds": 1})
    # fixed_share: an epoch is a pass over the k real images, whatever is added; lowdata.sources auto: the generators
    per_k = {5: -(-100 // 50) * 50, 20: -(-400 // 50) * 50}
    assert cost.work_table(shared).loc["low-data sweep (07)", "amount"] == (1 + len(shared.generators)) * sum(per_k.values())


def test_hours_are_amount_over_rate_and_bad_rates_are_named():
    estimate = cost.profile_cost(config.resolve("gpu-small"))
    hours = estimate.with_hours({"train": 1000.0})
    assert hours.loc["classifier training (04)", "hours"] == pytest.approx(7 * 5 * 10000 * 128 / 1000 / 3600)
    assert hours["hours"].isna().sum() == 10  # the stages without a rate
    total, missing = estimate.total_hours({"train": 1000.0})
    assert total == pytest.approx(hours["hours"].sum()) and missing == list(hours.index[hours["hours"].isna()])
    with pytest.raises(ValueError, match="rate keys \\['gpu'\\] are not known"):
        estimate.with_hours({"gpu": 1.0})
    with pytest.raises(ValueError, match="sd=0.0 must be a positive"):
        estimate.with_hours({"sd": 0.0})
    with pytest.raises(ValueError, match="--rate 'sd:3'"):
        cost.parse_rates(["sd:3"])
    assert cost.parse_rates(["sd=3", "train=1e4"]) == {"sd": 3.0, "train": 10000.0}


def test_disk_counts_weights_images_embeddings_and_checkpoints():
    assert cost.CLASSIFIER_PARAMETERS["resnet18_cifar"] == 11_173_962  # the CIFAR ResNet-18 of the DI authors
    assert cost.download_bytes("tiny") == 0 and cost.download_bytes("someone/other-model") is None
    assert cost.download_bytes("CompVis/stable-diffusion-v1-4") == 4 * cost.SD1_PARAMETERS
    disk = cost.disk_table(config.resolve("paper"))
    assert disk.loc["DI embeddings and resumable checkpoints", "bytes"] == 4 * 45000 * 5 * 768 * 4
    assert disk.loc["classifier checkpoints", "bytes"] == 7 * 5 * 4 * 11_173_962  # 5 arms, di@sd-size, real+di@sd-size
    assert disk.loc["SD images", "bytes"] == 50000 * (3 * 32 * 32 + cost.PNG_OVERHEAD)
    unknown = cost.disk_table(config.resolve("paper", overrides={"sd.model": "/models/my-sd"}))
    assert math.isnan(unknown.loc["diffusion weights", "bytes"])  # unknown: not counted in the total


def test_sd1_parameter_count_is_the_architectures():
    """SD 1.x: U-Net 859,520,964 + VAE 83,653,863 + CLIP text encoder 123,060,480 parameters (published counts)."""
    pipe = diffusion.sd15_random_pipeline(device="meta")
    counts = [sum(p.numel() for p in part.parameters()) for part in (pipe.unet, pipe.vae, pipe.text_encoder)]
    assert counts == [859_520_964, 83_653_863, 123_060_480] and sum(counts) == cost.SD1_PARAMETERS


def test_classifier_parameter_counts_and_the_tiny_width_are_the_architectures():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in build_model(name).parameters()) for name in MODELS}
    assert counts == cost.CLASSIFIER_PARAMETERS and cost.TINY_WIDTH == diffusion.TINY_WIDTH


def test_human_bytes():
    assert [cost.human_bytes(n) for n in (999, 1536, 8.53e9, None)] == ["999 B", "1.5 KB", "8.5 GB", "unknown"]


def test_cli_prints_hours_for_the_rates_given(capsys):
    assert cli.main(["cost", "--profile", "smoke", "--rate", "train=100"]) == 0
    out = capsys.readouterr().out
    assert "hours" in out and "classifier training (04)" in out and "total of the known items" in out
    assert cli.main(["cost", "--profile", "smoke", "--rate", "speed=1"]) == 2
    assert "not known" in capsys.readouterr().err


def test_no_generator_means_no_generation_rows_no_diffusion_weights_and_no_pngs():
    cfg = config.resolve("cpu-analysis")
    assert cfg.generators == [] and cost.synthetic_sizes(cfg) == {}
    work, disk = cost.work_table(cfg), cost.disk_table(cfg)
    assert not set(GENERATION_ROWS) & set(work.index)
    assert not {"SD images", "DI images", "DI embeddings and resumable checkpoints"} & set(disk.index)
    assert disk.loc["diffusion weights", "bytes"] == 0
    only_sd = cost.work_table(config.resolve("gpu-small", overrides={"generators": ["sd"]}))
    assert "SD generation (02)" in only_sd.index and "DI sampling (03)" not in only_sd.index
    assert only_sd.loc["classifier training (04)", "amount"] == 3 * 5 * 10000 * 128  # real, sd, real+sd


def test_an_external_set_is_counted_in_its_folders_trained_explained_and_curated(tmp_path):
    folder = image_folder(tmp_path / "ext", {"airplane": 30, "cat": 20}, ".jpg")
    (folder / "cat" / ".hidden.png").write_bytes(b"")  # not an image the loader reads
    (folder / "cat" / "notes.txt").write_text("x")
    cfg = config.resolve("cpu-analysis", overrides={"synthetic.ext.paths": [str(folder)]})
    assert cost.synthetic_sizes(cfg) == {"ext": 50}
    work = cost.work_table(cfg)
    train, low, cur = cfg.train, cfg.lowdata, cfg.curation
    assert cost.training_arms(cfg) == {"real": 5000, "ext": 50, "real+ext": 5000}  # fixed_share: epochs of the real set
    assert work.loc["classifier training (04)", "amount"] == 3 * train.seeds * train.steps * train.batch_size
    assert "ext: 50 images counted in its folders" in work.loc["classifier training (04)", "what"]
    assert work.loc["Grad-CAM maps (05)", "amount"] == 3 * train.seeds * 10 * cfg.gradcam.images_per_class
    assert work.loc["real-vs-synthetic detectors (07)", "amount"] == 2 * 2 * cfg.gap.detector_steps * 128
    assert work.loc["domain gap half-splits (07)", "amount"] == 2 * (cfg.gap.n_resamples + 1)
    assert work.loc["curation scores (08)", "amount"] == 50 + 10 * (cur.reference_per_class + cur.untrained_per_class)
    assert work.loc["curation selections and scaling (08)", "amount"] > 0
    # no manifest naming each image's real source: left out of the low-data sweep, which trains real arms only
    assert work.loc["low-data sweep (07)", "amount"] == len(low.k_per_class) * low.seeds * low.steps * 128
    assert "left out (no provenance): ext" in work.loc["low-data sweep (07)", "what"]
    assert work.loc["fine-tuning (07)", "amount"] == 0
    assert not set(GENERATION_ROWS) & set(work.index)
    disk = cost.disk_table(cfg)
    assert disk.loc["classifier checkpoints", "bytes"] == 3 * train.seeds * 4 * cost.CLASSIFIER_PARAMETERS[train.model]


def test_an_external_set_without_images_yet_is_assumed_as_large_as_the_real_subset_and_says_so(tmp_path):
    cfg = config.resolve("cpu-analysis", overrides={"synthetic.later.paths": [str(tmp_path / "not-yet")]})
    assert cost.synthetic_sizes(cfg) == {"later": 5000}
    what = cost.work_table(cfg).loc["classifier training (04)", "what"]
    assert "size unknown" in what and "assumed 5,000" in what


def test_arms_follow_the_training_stages_rule_for_generated_and_external_sets(tmp_path):
    small = image_folder(tmp_path / "small", {"airplane": 2, "cat": 2})
    large = image_folder(tmp_path / "large", {"airplane": 5, "cat": 5})
    cfg = config.resolve("cpu-analysis", run_dir=tmp_path / "run",
                         overrides={"synthetic.small.paths": [str(small)], "synthetic.large.paths": [str(large)]})
    planned, skipped = train_arms.plan_arms(cfg)
    assert not skipped and set(cost.training_arms(cfg)) == {arm.name for arm in planned}
    assert cost.training_arms(cfg)["large@small-size"] == 4
    counts = {"sd": 5000, "di": 25000, "ext": 5000}
    folders = {name: (image_folder(tmp_path / name, {"a": n // 1000}),) for name, n in counts.items()}
    names = [arm for name in folders for arm in (name, f"real+{name}")]
    assert cost._equal_size_arms(counts) == train_arms.equal_size_names(counts) == ["di@ext-size", "real+di@ext-size"]
    assert train_arms.equal_size_arms(folders, names) == ["di@ext-size", "real+di@ext-size"]
    assert train_arms.equal_size_arms(folders, list(folders)) == ["di@ext-size"]  # no real+ arm asked for
    assert cost.EQUAL_SIZE_MARK == train_arms.EQUAL_SIZE_MARK
    mixed = config.resolve("gpu-small", overrides={"synthetic.ext.paths": [str(large)]})
    assert list(cost.synthetic_sizes(mixed)) == ["sd", "di", "ext"]  # generators first, as sets.auto_names
    assert {"sd@ext-size", "di@ext-size", "real+ext"} <= set(cost.training_arms(mixed))


def test_profiles_side_by_side_mark_the_stages_a_profile_does_not_run():
    work, disk = cost.compare_profiles(["gpu-small", "cpu-analysis"])
    assert work.loc["SD generation (02)", "cpu-analysis"] == "-" and work.loc["SD generation (02)", "unit"] == "images"
    assert disk.loc["SD images", "cpu-analysis"] == "-" and disk.loc["diffusion weights", "cpu-analysis"] == "0 B"
