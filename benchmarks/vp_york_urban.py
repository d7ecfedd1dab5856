"""York Urban vanishing points: angular error (calibrated and uncalibrated), run time, and resolution calibration.

Run: python benchmarks/vp_york_urban.py [FOLDER]   (York Urban: a local copy (zip, unpacked or converted folder),
else the copy converted into the cache, else a download into it)
"""

from __future__ import annotations

import sys

import cv2

from synthgap_helpers.datasets import default_cache_dir
from synthgap_helpers.geometry.validation import (
    YORK_URBAN_FULL,
    evaluate_york_urban,
    resolution_calibration,
)
from synthgap_helpers.geometry.york_urban import resolve_york_urban


def main() -> None:
    """Print the error figures and timings for both settings, then the 32-pixel calibration, each beside the numbers
    the book quotes (`YORK_URBAN_FULL`): update those when a measurement on all 51 images differs."""
    root = resolve_york_urban(sys.argv[1] if len(sys.argv) > 1 else None, default_cache_dir(), download=True)
    print(f"York Urban at {root}; OpenCV {cv2.__version__}")
    for use_focal in (True, False):
        _, s = evaluate_york_urban(root, use_focal=use_focal)
        label = "calibrated (Manhattan)" if use_focal else "uncalibrated"
        print(
            f"{label:>24}: median {s['median_deg']:.2f} deg | within 2/5/10 deg "
            f"{s['within_2deg']:.3f} / {s['within_5deg']:.3f} / {s['within_10deg']:.3f} | AUC@10 {s['auc_10deg']:.3f} "
            f"| {s['n_images']} images, {s['n_vps']} VPs, {s['seconds']:.1f} s ({1000 * s['seconds'] / s['n_images']:.0f} ms/image)"
        )
        print(f"{'quoted by the book':>24}: {YORK_URBAN_FULL['calibrated' if use_focal else 'uncalibrated']}")
    _, c = resolution_calibration(root)
    print(
        f"resolution {c['size']}px x{c['upscale']}: segments per image {c['n_segments_full']:.0f} (full) -> "
        f"{c['n_segments_small']:.1f} (small); consistent with true VPs at 5/10 deg: full "
        f"{c['full_consistent_5deg']:.3f}/{c['full_consistent_10deg']:.3f}, small "
        f"{c['small_consistent_5deg']:.3f}/{c['small_consistent_10deg']:.3f}, chance "
        f"{c['chance_consistent_5deg']:.3f}/{c['chance_consistent_10deg']:.3f}"
    )
    print(f"quoted by the book: {YORK_URBAN_FULL['resolution']}")


if __name__ == "__main__":
    main()
