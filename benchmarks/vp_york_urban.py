"""York Urban vanishing points: angular error (calibrated and uncalibrated), run time, and resolution calibration.

Run: python benchmarks/vp_york_urban.py   (data: $SYNTHGAP_SHARED_DATA/york-urban-train or <repo>/../shared/data)
"""

from __future__ import annotations

from pathlib import Path

import cv2

from synthgap_helpers.geometry_york import YORK_URBAN_DIR, evaluate_york_urban, resolution_calibration, shared_data_dir


def main() -> None:
    """Print the error figures and timings for both settings, then the 32-pixel calibration."""
    root = shared_data_dir(Path(__file__).resolve().parents[1]) / YORK_URBAN_DIR
    print(f"York Urban at {root}; OpenCV {cv2.__version__}")
    for use_focal in (True, False):
        _, s = evaluate_york_urban(root, use_focal=use_focal)
        label = "calibrated (Manhattan)" if use_focal else "uncalibrated"
        print(
            f"{label:>24}: median {s['median_deg']:.2f} deg | within 2/5/10 deg "
            f"{s['within_2deg']:.3f} / {s['within_5deg']:.3f} / {s['within_10deg']:.3f} | AUC@10 {s['auc_10deg']:.3f} "
            f"| {s['n_images']} images, {s['n_vps']} VPs, {s['seconds']:.1f} s ({1000 * s['seconds'] / s['n_images']:.0f} ms/image)"
        )
    _, c = resolution_calibration(root)
    print(
        f"resolution {c['size']}px x{c['upscale']}: segments per image {c['n_segments_full']:.0f} (full) -> "
        f"{c['n_segments_small']:.1f} (small); consistent with true VPs at 5/10 deg: full "
        f"{c['full_consistent_5deg']:.3f}/{c['full_consistent_10deg']:.3f}, small "
        f"{c['small_consistent_5deg']:.3f}/{c['small_consistent_10deg']:.3f}, chance "
        f"{c['chance_consistent_5deg']:.3f}/{c['chance_consistent_10deg']:.3f}"
    )


if __name__ == "__main__":
    main()
