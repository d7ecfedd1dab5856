"""Tables and figures of the Diffusion Inversion chapter: parameters, per-group losses, real vs inverted images."""

from __future__ import annotations

import json
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from synthgap_helpers.inversion import embeddings, stage
from synthgap_helpers.plots import mosaic

_SHOWN = ("model", "num_tokens", "group_size", "num_groups", "resolution", "steps", "batch_size", "lr", "weight_decay",
          "init", "guidance", "uncond", "sample_steps", "scheduler", "samples_per_image", "perturbation", "noise_std",
          "interpolation_strength", "save_size")


def parameter_table(cfg: Any) -> Any:
    """The run's inversion parameters beside the authors' CIFAR-10 defaults and STL-10 example, and where each of
    the run's values comes from: the authors' source that sets it (the CIFAR-10 defaults first), else ours."""
    import pandas as pd

    from synthgap_helpers.params import INVERSION_PRESETS

    cifar, stl = INVERSION_PRESETS["authors-cifar10"], INVERSION_PRESETS["authors-stl10"]
    rows = {}
    for name in _SHOWN:
        value = getattr(cfg.inversion, name)
        match = next((preset[name] for preset in (cifar, stl) if name in preset and preset[name].value == value), None)
        rows[name] = {"this run": str(value),
                      "authors, CIFAR-10": str(cifar[name].value) if name in cifar else "-",
                      "authors, STL-10": str(stl[name].value) if name in stl else "-",
                      "this run's value from": match.origin if match is not None else "ours"}
    return pd.DataFrame.from_dict(rows, orient="index")


def read_losses(cfg: Any) -> dict[str, list[float]]:
    """The stored loss curve of every finished group, by group name."""
    folder = cfg.run_dir / embeddings.LOSS_DIR
    return {path.stem: json.loads(path.read_text())["loss"] for path in sorted(folder.glob("group_*.json"))}


def group_table(cfg: Any) -> Any:
    """Finished groups: images, steps, and the mean loss over the first and the last tenth of the steps."""
    import pandas as pd

    rows = {}
    for name, losses in read_losses(cfg).items():
        _, labels, meta = embeddings.load_group_embeddings(cfg.run_dir, name)
        tenth = max(1, len(losses) // 10)
        rows[name] = {"images": len(labels), "classes": len(set(labels.tolist())), "steps": meta["step"],
                      "loss, first tenth": float(np.mean(losses[:tenth])),
                      "loss, last tenth": float(np.mean(losses[-tenth:]))}
    return pd.DataFrame.from_dict(rows, orient="index").round(4)


def loss_curves(cfg: Any, window: int | None = None) -> Figure:
    """Training loss per step of every finished group (thin) and its running mean (thick)."""
    curves = read_losses(cfg)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for index, (name, losses) in enumerate(curves.items()):
        values = np.asarray(losses, dtype=float)
        width = window or max(1, len(values) // 10)
        smooth = np.convolve(values, np.ones(width) / width, mode="valid")
        colour = f"C{index % 10}"
        ax.plot(np.arange(1, len(values) + 1), values, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(np.arange(width, len(values) + 1), smooth, color=colour, linewidth=2, label=name)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("denoising loss (MSE)")
    ax.set_title("Embedding training, per group")
    if curves:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def real_vs_inverted(real: Any, inverted: Any) -> Figure:
    """Two rows: real images, and below each the unperturbed sample from its embedding."""
    count = len(real)
    images = torch.cat([real.images, inverted.images])
    fig, ax = plt.subplots(figsize=(1.1 * count + 1.5, 2.8))
    ax.imshow(mosaic(images, 2, count), interpolation="nearest")
    ax.set_xticks(np.arange(count) * 33 + 16, [real.classes[int(label)] for label in real.labels], rotation=45,
                  fontsize="small")
    ax.set_yticks([16, 49], ["real", "inverted"])
    ax.set_title("Real training images and samples from their embeddings (no perturbation)")
    fig.tight_layout()
    return fig


def inverted_sets(cfg: Any) -> dict[str, Any]:
    """The real images that were inverted, and the synthetic set sampled from them, for `plots.sample_grid`."""
    from synthgap_helpers.imagesets import has_manifest
    from synthgap_helpers.sets import reading

    train, groups = stage.run_groups(cfg)
    finished = [g for g in groups if embeddings.embeddings_path(cfg.run_dir, g).is_file()]
    positions = [p for g in finished for p in g.positions]
    sets = {"real (inverted)": train.subset(positions)}
    folder = cfg.run_dir / "synthetic" / "di"
    if has_manifest(folder):
        sets["di (sampled)"] = reading(cfg).folder(folder)
    return sets
