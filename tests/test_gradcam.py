"""Grad-CAM maps against pytorch-grad-cam, metric formulas on hand-made maps, faithfulness, bad inputs."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from synthgap_helpers import results
from synthgap_helpers.gradcam.figures import metric_distributions, overlay_grid
from synthgap_helpers.gradcam.maps import deletion_insertion, gradcam_maps
from synthgap_helpers.gradcam.metrics import attention_metrics, compare_arms

MEAN, STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)


def resnet18_cifar() -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem: 3x3 stride-1 conv1, no max-pool."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return resnet18_cifar().eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return torch.tensor([0, 3, 9, 1, 3, 7])


def normalized(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def reference_gradcam(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, layer: str
) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-grad-cam on a copy of the model: (raw ReLU map at the layer's resolution, its min-max scaled output)."""
    model = copy.deepcopy(model)
    target_layer = getattr(model, layer)
    targets = [ClassifierOutputTarget(int(t)) for t in labels]
    with GradCAM(model=model, target_layers=[target_layer]) as cam:
        scaled = cam(input_tensor=x, targets=targets)
        hooks = cam.activations_and_grads
        activations, gradients = hooks.activations[0].numpy(), hooks.gradients[0].numpy()
        raw = cam.get_cam_image(x, target_layer, targets, activations, gradients)
    return np.maximum(raw, 0), scaled


def grad_cam_scaling(upsampled: torch.Tensor, native: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's output from our maps: min-max at the layer's resolution, cv2 bilinear resize, min-max again.

    Each min-max is (m - min) / (max - min + 1e-7); both compose to one min-max of the
    upsampled map U whose epsilon is 1e-7 (range of the native map A + 1e-7):
    (U - min U) / (max U - min U + 1e-7 (max A - min A + 1e-7)).
    """

    def low_and_range(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = maps.flatten(1)
        return flat.amin(1)[:, None, None], (flat.amax(1) - flat.amin(1))[:, None, None]

    low, spread = low_and_range(upsampled)
    return (upsampled - low) / (spread + 1e-7 * (low_and_range(native)[1] + 1e-7))


# --- maps ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("layer", "size"), [("layer4", 4), ("layer3", 8)])
def test_maps_equal_pytorch_grad_cam(model, images, labels, layer, size):
    """Exact at the layer's resolution (raw values); at 32x32 after pytorch-grad-cam's own scaling."""
    raw, scaled = reference_gradcam(model, normalized(images), labels, layer)
    native = gradcam_maps(model, images, labels, layer, normalize=(MEAN, STD), upsample=False)
    upsampled = gradcam_maps(model, images, labels, layer, normalize=(MEAN, STD))
    assert native.shape == (6, size, size) and upsampled.shape == (6, 32, 32)
    assert native.amax() > 0
    torch.testing.assert_close(native, torch.from_numpy(raw), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_cam_scaling(upsampled, native), torch.from_numpy(scaled), rtol=0, atol=1e-5)


def test_predicted_targets_are_the_models_top_classes(model, images):
    with torch.no_grad():
        predicted = model(normalized(images)).argmax(1)
    torch.testing.assert_close(
        gradcam_maps(model, images, "predicted", normalize=(MEAN, STD)),
        gradcam_maps(model, images, predicted, normalize=(MEAN, STD)),
    )


def test_uint8_with_mean_std_callable_or_prenormalised_float_give_one_map(model, images, labels):
    from_pair = gradcam_maps(model, images, labels, normalize=(MEAN, STD))
    torch.testing.assert_close(gradcam_maps(model, normalized(images), labels), from_pair)
    torch.testing.assert_close(gradcam_maps(model, images, labels, normalize=lambda x: normalized(x * 255)), from_pair)


def test_batched_maps_equal_one_image_at_a_time(model, images, labels):
    batched = gradcam_maps(model, images, labels, batch_size=4)
    singles = torch.cat([gradcam_maps(model, images[i : i + 1], labels[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(batched, singles, rtol=1e-4, atol=1e-6)


def test_explaining_leaves_parameters_gradients_and_mode_untouched(images, labels):
    fresh = resnet18_cifar().train()
    fresh.fc.weight.requires_grad_(False)
    gradcam_maps(fresh, images[:2], labels[:2])
    assert all(p.grad is None for p in fresh.parameters())
    assert fresh.training
    assert not fresh.fc.weight.requires_grad
    assert all(p.requires_grad for name, p in fresh.named_parameters() if name != "fc.weight")


def test_unknown_layer_lists_the_valid_names(model, images, labels):
    with pytest.raises(ValueError, match=r"'layer5' is not in the model.*layer3.*layer4"):
        gradcam_maps(model, images, labels, layer="layer5")


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (torch.tensor([0, 1]), "2 entries for 6 images"),
        (torch.tensor([0, 1, 2, 3, 4, 10]), r"\[0, 10\)"),
        (torch.tensor([0, 1, 2, 3, 4, -1]), r"\[0, 10\)"),
        ("true", "'predicted'"),
    ],
)
def test_bad_targets_are_rejected_before_any_work(model, images, targets, message):
    with pytest.raises(ValueError, match=message):
        gradcam_maps(model, images, targets)


def test_empty_or_misshapen_image_batch_is_an_error(model):
    with pytest.raises(ValueError, match="empty"):
        gradcam_maps(model, torch.empty(0, 3, 32, 32, dtype=torch.uint8), "predicted")
    with pytest.raises(ValueError, match="N x C x H x W"):
        gradcam_maps(model, torch.zeros(3, 32, 32, dtype=torch.uint8), "predicted")


# --- metrics ------------------------------------------------------------------------------

DIAGONAL = math.hypot(10, 10)


def hot_pixel() -> torch.Tensor:
    m = torch.zeros(10, 10)
    m[2, 7] = 5.0
    return m


def two_blobs() -> torch.Tensor:
    """Two equal 2x2 blobs, rows 4-5, columns 1-2 and 7-8: mirror images about the centre."""
    m = torch.zeros(10, 10)
    m[4:6, 1:3] = 1.0
    m[4:6, 7:9] = 1.0
    return m


def test_uniform_map_metrics():
    row = attention_metrics(torch.full((1, 10, 10), 0.25)).iloc[0]
    expected = {
        "entropy": 1, "gini": 0, "focus": 0.1, "coverage": 1, "intensity": 1, "centroid_offset": 0, "peak": 0.25,
    }
    assert row[list(expected)].to_numpy() == pytest.approx(list(expected.values()), abs=1e-12)
    assert row["spread"] == pytest.approx(math.sqrt(2 * (10**2 - 1) / 12) / DIAGONAL)


def test_single_hot_pixel_metrics():
    row = attention_metrics(hot_pixel()[None]).iloc[0]
    expected = {
        "entropy": 0, "gini": 99 / 100, "focus": 1, "coverage": 1 / 100, "intensity": 1 / 100, "spread": 0, "peak": 5,
    }
    assert row[list(expected)].to_numpy() == pytest.approx(list(expected.values()), abs=1e-12)
    assert row["centroid_offset"] == pytest.approx(math.hypot(2 - 4.5, 7 - 4.5) / DIAGONAL)


def test_two_symmetric_blobs_centre_their_centroid_and_spread_by_their_separation():
    row = attention_metrics(two_blobs()[None]).iloc[0]
    # pixel offsets from the centroid (4.5, 4.5): rows +-0.5, columns +-2.5 or +-3.5
    expected = {
        "centroid_offset": 0,
        "spread": math.sqrt(0.25 + (2.5**2 + 3.5**2) / 2) / DIAGONAL,
        "entropy": math.log(8) / math.log(100),
        "gini": 1 - 8 / 100,
        "focus": 1,
        "coverage": 8 / 100,
        "intensity": 8 / 100,
    }
    assert row[list(expected)].to_numpy() == pytest.approx(list(expected.values()), abs=1e-12)


def test_all_zero_map_gives_nan_metrics_and_zero_peak(recwarn):
    row = attention_metrics(torch.zeros(1, 10, 10)).iloc[0]
    assert row.drop("peak").isna().all()
    assert row["peak"] == 0
    assert len(recwarn) == 0


def test_metrics_are_scale_free_and_batch_equals_single():
    noise = torch.rand(10, 10, generator=torch.Generator().manual_seed(0))
    maps = torch.stack([hot_pixel(), two_blobs(), noise, torch.zeros(10, 10)])
    batch = attention_metrics(maps)
    singles = pd.concat([attention_metrics(m[None]) for m in maps], ignore_index=True)
    pd.testing.assert_frame_equal(batch, singles)
    pd.testing.assert_frame_equal(attention_metrics(7 * maps).drop(columns="peak"), batch.drop(columns="peak"))


@pytest.mark.parametrize("maps", [-torch.ones(1, 4, 4), torch.ones(4, 4), torch.full((1, 4, 4), float("nan"))])
def test_metrics_reject_maps_that_are_not_non_negative_batches(maps):
    with pytest.raises(ValueError, match="maps must"):
        attention_metrics(maps)


# --- comparison of arms ---------------------------------------------------------------------


def arms_with_shift(shift_noise: float) -> dict[str, pd.DataFrame]:
    """A reference arm of 300 images and an arm shifted by 0.125 plus N(0, shift_noise) per image.

    Reference values are multiples of 1/64 so that a noiseless shift is exact in floating point.
    """
    rng = np.random.default_rng(0)
    real = pd.DataFrame({"focus": rng.integers(0, 64, 300) / 64, "entropy": rng.integers(32, 64, 300) / 64})
    return {"real": real, "sd": real + 0.125 + rng.normal(0, shift_noise, (300, 2))}


def test_compare_arms_reports_the_paired_mean_difference_with_interval_and_dz():
    arms = arms_with_shift(0.05)
    table = compare_arms(arms, n_resamples=500).set_index("metric")
    diff = arms["sd"]["focus"] - arms["real"]["focus"]
    row = table.loc["focus"]
    assert (row["arm"], row["n_images"]) == ("sd", 300)
    assert row["difference"] == pytest.approx(diff.mean())
    assert row["cohens_dz"] == pytest.approx(diff.mean() / diff.std(ddof=1))
    assert row["ci_low"] < row["difference"] < row["ci_high"]
    assert row["ci_high"] - row["ci_low"] == pytest.approx(2 * 1.96 * diff.std() / math.sqrt(300), rel=0.2)
    pd.testing.assert_frame_equal(compare_arms(arms, n_resamples=500), compare_arms(arms, n_resamples=500))


def test_compare_arms_pairs_images_so_a_constant_shift_has_a_zero_width_interval():
    row = compare_arms(arms_with_shift(0.0), n_resamples=200).iloc[0]
    assert (row["difference"], row["ci_low"], row["ci_high"]) == (0.125, 0.125, 0.125)
    assert math.isnan(row["cohens_dz"])


def test_compare_arms_drops_images_undefined_in_either_arm():
    arms = arms_with_shift(0.05)
    arms["sd"].loc[:9, "focus"] = np.nan
    table = compare_arms(arms, n_resamples=100).set_index("metric")
    assert table.loc["focus", "n_images"] == 290
    assert table.loc["entropy", "n_images"] == 300


def test_compare_arms_rejects_a_missing_reference_or_different_images():
    arms = arms_with_shift(0.05)
    with pytest.raises(ValueError, match="reference arm 'synthetic'"):
        compare_arms(arms, reference="synthetic")
    arms["sd"] = arms["sd"].iloc[1:]
    with pytest.raises(ValueError, match="same images"):
        compare_arms(arms)


def seeded_arms(n_seeds: int, n_images: int, rng: np.random.Generator, effect: float = 0.1,
                seed_sd: float = 0.3, image_sd: float = 0.3) -> dict[str, pd.DataFrame]:
    """Arms 'real' and 'sd' of `n_seeds` models each on the same images, indexed (seed, image): every image has its
    own level, every model its own offset (sd `seed_sd`: what another training run changes), every map its noise;
    'sd' is `effect` higher on average."""
    level = rng.normal(0, 1, n_images)
    index = pd.MultiIndex.from_product([range(n_seeds), [f"img{i}" for i in range(n_images)]])

    def arm(shift: float) -> pd.DataFrame:
        values = level + shift + rng.normal(0, seed_sd, (n_seeds, 1)) + rng.normal(0, image_sd, (n_seeds, n_images))
        return pd.DataFrame({"focus": values.ravel()}, index=index)

    return {"real": arm(0.0), "sd": arm(effect)}


def first_seed(arms: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Each arm's first model only, indexed by image: the comparison of two networks."""
    return {name: frame.xs(0, level=0) for name, frame in arms.items()}


def test_compare_arms_averages_over_seeds_and_the_seed_level_widens_the_interval():
    arms = seeded_arms(5, 60, np.random.default_rng(3))
    row = compare_arms(arms, n_resamples=1000).iloc[0]
    by_image = {name: frame["focus"].groupby(level=1, sort=False).mean() for name, frame in arms.items()}
    assert (row["seeds"], row["reference_seeds"], row["n_images"]) == (5, 5, 60)
    assert row["difference"] == pytest.approx((by_image["sd"] - by_image["real"]).mean())
    one = compare_arms(first_seed(arms), n_resamples=1000).iloc[0]
    assert (one["seeds"], one["reference_seeds"]) == (1, 1)
    # the seed offsets (sd 0.3) dwarf the image noise left in a paired mean over 60 images: only the seed level
    # sees them, so the interval over every seed is several times wider than that of one model per arm
    assert row["ci_high"] - row["ci_low"] > 3 * (one["ci_high"] - one["ci_low"])


def test_two_level_intervals_cover_the_arm_effect_and_p_values_hold_their_level():
    """Coverage by simulation: 120 studies of 5 seeds per arm on 40 images, the true difference 0.1. Measured here:
    the two-level interval covers it in 0.90 of the studies (a seed level of S draws instead of S - 1: 0.86; one
    model per arm: 0.20), and without a difference p < 0.05 in 0.08 of them."""
    rng = np.random.default_rng(11)
    covered, one_model, rejected = [], [], []
    for study in range(120):
        arms = seeded_arms(5, 40, rng)
        row = compare_arms(arms, n_resamples=400, seed=study).iloc[0]
        covered.append(row["ci_low"] <= 0.1 <= row["ci_high"])
        one = compare_arms(first_seed(arms), n_resamples=400, seed=study).iloc[0]
        one_model.append(one["ci_low"] <= 0.1 <= one["ci_high"])
        rejected.append(compare_arms(seeded_arms(5, 40, rng, effect=0.0), n_resamples=400, seed=study).iloc[0]["p"] < 0.05)
    assert 0.85 <= np.mean(covered) <= 0.99
    assert np.mean(one_model) < 0.5  # one network per arm: the interval ignores what another training run changes
    assert np.mean(rejected) <= 0.1


def test_compare_arms_gives_raw_and_holm_adjusted_p_over_the_whole_table():
    arms = arms_with_shift(0.05)  # focus and entropy both shifted by 0.125: clearly different from 0
    arms["di"] = arms["real"] + np.random.default_rng(1).normal(0, 0.05, arms["real"].shape)  # no shift
    table = compare_arms(arms, n_resamples=999).set_index(["arm", "metric"])
    assert list(table.columns[-3:]) == ["p", "p (Holm)", "significant after Holm"]
    assert table.loc[("sd", "focus"), "p"] == pytest.approx(2 / 1000)  # no draw at or below 0: the smallest p
    np.testing.assert_allclose(table["p (Holm)"], results.holm(table["p"]))  # one family: 2 arms x 2 metrics
    assert table.loc["sd", "significant after Holm"].all() and not table.loc["di", "significant after Holm"].any()


def test_compare_arms_rejects_a_seed_with_other_images():
    arms = seeded_arms(2, 10, np.random.default_rng(0))
    arms["sd"] = arms["sd"].drop((1, "img3"))
    with pytest.raises(ValueError, match="every seed of arm 'sd' must have the same images"):
        compare_arms(arms)


# --- deletion / insertion -----------------------------------------------------------------


class SalientPixelSum(nn.Module):
    """Two classes: logit 0 = sum of channel 0 over the pixels of `mask`, logit 1 = 1."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = nn.Parameter(mask.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = (x[:, 0] * self.mask).flatten(1).sum(1)
        return torch.stack([evidence, torch.ones_like(evidence)], dim=1)


def test_deletion_and_insertion_curves_on_a_model_that_reads_four_pixels():
    mask = torch.zeros(4, 4)
    mask[:2, :2] = 1  # 4 of 16 pixels carry all the evidence for class 0
    faithful, backwards = mask + 0.1 * torch.rand(4, 4), 1 - mask  # backwards ranks the 4 pixels last
    maps = torch.stack([faithful, backwards])
    result = deletion_insertion(SalientPixelSum(mask), torch.ones(2, 3, 4, 4), [0, 0], maps, steps=4, progress=False)
    high, low = torch.sigmoid(torch.tensor(3.0)).item(), torch.sigmoid(torch.tensor(-1.0)).item()  # 4 - 1 and 0 - 1
    curves = result.curves
    assert list(curves.index) == [0, 0.25, 0.5, 0.75, 1]
    middle = (high + low) / 2
    assert curves["deletion_prob"].to_numpy() == pytest.approx([high, middle, middle, middle, low])
    assert curves["insertion_acc"].to_numpy() == pytest.approx([0, 0.5, 0.5, 0.5, 1])
    # trapezoids: the faithful map loses the evidence after the first quarter, the backwards one in the last
    deletion_aucs = [0.25 * middle + 0.75 * low, 0.75 * high + 0.25 * middle]
    assert result.per_image["deletion_auc"].to_numpy() == pytest.approx(deletion_aucs)
    assert result.per_image["insertion_auc"][0] == pytest.approx(0.25 * middle + 0.75 * high)
    assert result.auc["deletion_prob"] == pytest.approx(result.per_image["deletion_auc"].mean())


def test_deletion_insertion_rejects_maps_of_another_shape(model, images, labels):
    with pytest.raises(ValueError, match="maps must have shape"):
        deletion_insertion(model, images, labels, torch.zeros(6, 4, 4))


# --- figures -------------------------------------------------------------------------------


def test_figures_have_a_panel_per_arm_and_image_and_per_metric(images):
    maps = {"real": torch.rand(3, 4, 4), "sd": torch.zeros(3, 32, 32)}
    grid = overlay_grid(images[:3], maps, titles=["a", "b", "c"])
    assert len(grid.axes) == 3 * 3
    metrics = {arm: attention_metrics(m) for arm, m in maps.items()}
    distributions = metric_distributions(metrics)
    assert sum(ax.get_visible() for ax in distributions.axes) == 8
    for figure in (grid, distributions):
        figure.savefig(io.BytesIO(), format="png")
