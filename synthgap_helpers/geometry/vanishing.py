"""Projective geometry of images: line segments (LSD) and vanishing points.

Conventions used throughout:

* A segment is a row ``(x1, y1, x2, y2)`` in pixel coordinates of the *original* image
  (0-based, x right, y down), even when detection ran on an upsampled copy.
* A vanishing point is a homogeneous pixel vector ``v = (vx, vy, vw)``; its pixel position is
  ``(vx / vw, vy / vw)``. A point at infinity (``vw == 0``) is reported with the finite stand-in
  ``vw = 1e-12 * |v|`` (coordinates of magnitude ~1e12 along the right direction), so that
  ``K^-1 [x, y, 1]`` still gives its direction to within 1e-9 degrees.
* The consistency angle between segment ``i`` and point ``v`` is the image angle between the
  segment and the line joining the segment midpoint ``m_i`` to ``v``:
  ``theta_i(v) = atan2(|v . l_i|, |v . p_i|)`` with ``l_i`` the segment's homogeneous line and
  ``p_i`` the perpendicular line through ``m_i`` (both scaled by the segment length); it lies in
  [0, 90] degrees and is defined for points at infinity.

Structural metrics built on these live in :mod:`synthgap_helpers.geometry.metrics`, validation on
York Urban in :mod:`synthgap_helpers.geometry.validation`, figures in :mod:`synthgap_helpers.geometry.figures`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation

MAX_ANALYSIS_PIXELS = 60_000_000
"""Largest image (after upsampling) analysed; bigger inputs raise ValueError instead of exhausting memory."""


# --------------------------------------------------------------------------- image input


def as_gray_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Return a 2-D uint8 gray copy of an H x W, H x W x C or C x H x W (C in 1, 3, 4) image.

    Accepts numpy arrays and torch tensors, uint8 or float in [0, 1]; raises ValueError naming
    ``name`` for anything else so that bad input fails loudly, not deep inside OpenCV.
    """
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        channels_last = array
    elif array.ndim == 3 and array.shape[0] in (1, 3, 4):
        channels_last = np.moveaxis(array, 0, -1)
    elif array.ndim == 2:
        channels_last = array[..., None]
    else:
        raise ValueError(
            f"{name} must be H x W, H x W x C or C x H x W with C in (1, 3, 4); got shape {array.shape}"
        )
    if channels_last.shape[0] < 1 or channels_last.shape[1] < 1:
        raise ValueError(f"{name} must have at least one pixel; got shape {array.shape}")
    if channels_last.dtype != np.uint8:
        if not np.issubdtype(channels_last.dtype, np.floating) and not np.issubdtype(
            channels_last.dtype, np.integer
        ):
            raise ValueError(f"{name} must be uint8 or float in [0, 1]; got dtype {array.dtype}")
        scale = 255.0 if np.issubdtype(channels_last.dtype, np.floating) else 1.0
        channels_last = np.clip(np.nan_to_num(channels_last * scale), 0, 255).astype(np.uint8)
    rgb = channels_last[..., :3]
    gray = rgb[..., 0] if rgb.shape[-1] == 1 else cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    return np.ascontiguousarray(gray)


def upsample(gray: np.ndarray, upscale: int) -> np.ndarray:
    """Bicubic upsampling by an integer factor (LSD finds almost nothing on 32-pixel images)."""
    if not isinstance(upscale, (int, np.integer)) or upscale < 1:
        raise ValueError(f"upscale must be an integer >= 1; got {upscale!r}")
    height, width = gray.shape
    if height * width * upscale**2 > MAX_ANALYSIS_PIXELS:
        raise ValueError(
            f"image of shape {gray.shape} at upscale={upscale} exceeds {MAX_ANALYSIS_PIXELS} analysed "
            "pixels; downsample it first or lower upscale"
        )
    if upscale == 1:
        return gray
    return cv2.resize(gray, (width * upscale, height * upscale), interpolation=cv2.INTER_CUBIC)


# --------------------------------------------------------------------------- segments


def normalise_lsd_lines(lines: np.ndarray | None) -> np.ndarray:
    """LSD's ``lines`` as an (N, 4) float64 array: OpenCV 4.x gives (N, 1, 4), 5.x (N, 4) or None."""
    if lines is None:
        return np.zeros((0, 4))
    return np.asarray(lines, dtype=np.float64).reshape(-1, 4)


def detect_segments(image: np.ndarray, upscale: int = 1, min_length: float = 0.03) -> np.ndarray:
    """Line segments (N, 4) of an image with OpenCV's LSD, in original pixel coordinates.

    The image is analysed ``upscale`` times larger (bicubic); segments shorter than ``min_length``
    times the image's longer side are dropped, so the threshold follows the resolution.
    """
    if not 0 <= min_length < 1:
        raise ValueError(f"min_length must be a fraction of the image size in [0, 1); got {min_length!r}")
    gray = as_gray_uint8(image)
    big = upsample(gray, upscale)
    detector = cv2.createLineSegmentDetector()
    segments = normalise_lsd_lines(detector.detect(big)[0])
    segments = (segments + 0.5) / upscale - 0.5  # pixel centres of the upsampled grid
    lengths = segment_lengths(segments)
    return segments[lengths >= max(min_length * max(gray.shape), 1e-9)]


def segment_lengths(segments: np.ndarray) -> np.ndarray:
    """Euclidean length of each (x1, y1, x2, y2) segment."""
    return np.hypot(segments[:, 2] - segments[:, 0], segments[:, 3] - segments[:, 1])


def segment_angles(segments: np.ndarray) -> np.ndarray:
    """Undirected orientation of each segment in [0, 180) degrees (image x axis, y down)."""
    angles = np.degrees(np.arctan2(segments[:, 3] - segments[:, 1], segments[:, 2] - segments[:, 0]))
    return np.mod(angles, 180.0)


def _segment_lines(segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Homogeneous line of each segment and the perpendicular line through its midpoint, (3, N) each."""
    dx, dy = segments[:, 2] - segments[:, 0], segments[:, 3] - segments[:, 1]
    mx, my = (segments[:, 0] + segments[:, 2]) / 2, (segments[:, 1] + segments[:, 3]) / 2
    along = np.stack([-dy, dx, dy * mx - dx * my])
    across = np.stack([dx, dy, -(dx * mx + dy * my)])
    return along, across


def consistency_angles(segments: np.ndarray, vps: np.ndarray) -> np.ndarray:
    """Consistency angle (degrees, N x M) of each segment with each homogeneous point ``vps`` (M x 3)."""
    along, across = _segment_lines(segments)
    vps = np.asarray(vps, dtype=np.float64).reshape(-1, 3)
    return np.degrees(np.arctan2(np.abs(vps @ along), np.abs(vps @ across))).T


# --------------------------------------------------------------------------- cameras


def camera_matrix(
    image_shape: tuple[int, int], focal_length: float | None = None, principal_point: tuple[float, float] | None = None
) -> np.ndarray:
    """3 x 3 intrinsics; without a focal length, a pseudo-calibration f = longer side (about 53 deg of view)."""
    height, width = image_shape[:2]
    focal = float(max(height, width)) if focal_length is None else float(focal_length)
    if not np.isfinite(focal) or focal <= 0:
        raise ValueError(f"focal_length must be a positive number of pixels; got {focal_length!r}")
    cx, cy = ((width - 1) / 2, (height - 1) / 2) if principal_point is None else principal_point
    return np.array([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]])


def interpretation_normals(segments: np.ndarray, camera: np.ndarray) -> np.ndarray:
    """Unit normals (N, 3) of the planes through the camera centre and each segment (Gaussian sphere)."""
    inverse = np.linalg.inv(camera)
    ones = np.ones(len(segments))
    start = inverse @ np.stack([segments[:, 0], segments[:, 1], ones])
    end = inverse @ np.stack([segments[:, 2], segments[:, 3], ones])
    return _unit(np.cross(start.T, end.T))


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def pixels_from_homogeneous(vps: np.ndarray) -> np.ndarray:
    """(M, 2) pixel positions of homogeneous points; points at infinity get the 1e-12 stand-in (module doc)."""
    vps = np.asarray(vps, dtype=np.float64).reshape(-1, 3)
    floor = 1e-12 * np.linalg.norm(vps, axis=1)
    w = np.where(np.abs(vps[:, 2]) >= floor, vps[:, 2], np.where(vps[:, 2] < 0, -floor, floor))
    return vps[:, :2] / w[:, None]


def directions_from_pixels(pixels: np.ndarray, camera: np.ndarray) -> np.ndarray:
    """Unit camera-frame directions (y down) of pixel points under intrinsics ``camera``."""
    pixels = np.asarray(pixels, dtype=np.float64).reshape(-1, 2)
    homogeneous = np.column_stack([pixels, np.ones(len(pixels))])
    return _unit(homogeneous @ np.linalg.inv(camera).T)


# --------------------------------------------------------------------------- vanishing points


@dataclass(frozen=True)
class VanishingPoints:
    """Vanishing points of one image, strongest first, and which segments support them."""

    homogeneous: np.ndarray  # (M, 3) pixel-homogeneous points
    directions: np.ndarray  # (M, 3) unit camera-frame directions (y down) under ``camera``
    support: np.ndarray  # (M,) summed length of the segments assigned to each point
    assignment: np.ndarray  # (N,) index of the point each segment is assigned to, -1 if none
    camera: np.ndarray  # intrinsics used (a pseudo-calibration when uncalibrated)

    @property
    def pixels(self) -> np.ndarray:
        """(M, 2) pixel coordinates (see the module doc for points at infinity)."""
        return pixels_from_homogeneous(self.homogeneous)


def detect_vanishing_points(
    image: np.ndarray,
    focal_length: float | None = None,
    principal_point: tuple[float, float] | None = None,
    max_vps: int = 3,
    upscale: int = 1,
    seed: int = 0,
) -> list[tuple[float, float]]:
    """Up to ``max_vps`` vanishing points as (x, y) pixels, strongest first; [] when too few segments.

    With ``focal_length`` the points are the axes of a Manhattan frame (mutually orthogonal
    directions); without it they are found independently. See :func:`find_vanishing_points`.
    """
    gray = as_gray_uint8(image)
    segments = detect_segments(gray, upscale=upscale)
    found = find_vanishing_points(segments, gray.shape, focal_length, principal_point, max_vps, seed=seed)
    return [tuple(map(float, point)) for point in found.pixels]


def find_vanishing_points(
    segments: np.ndarray,
    image_shape: tuple[int, int],
    focal_length: float | None = None,
    principal_point: tuple[float, float] | None = None,
    max_vps: int = 3,
    inlier_deg: float = 2.0,
    n_hypotheses: int = 3000,
    min_segments: int = 6,
    seed: int = 0,
) -> VanishingPoints:
    """Vanishing points from segments by seeded RANSAC on the Gaussian sphere, then least-squares refinement.

    Calibrated (``focal_length`` given): the best-scoring Manhattan frame from triples of segments
    (two meet at the first axis; the third fixes the rotation about it). Uncalibrated: sequential
    selection from shared segment-pair hypotheses. Score of a hypothesis set = sum over segments of
    ``length * max(0, 1 - (theta / inlier_deg)^2)`` for the nearest point.
    """
    if not isinstance(max_vps, (int, np.integer)) or max_vps < 0:
        raise ValueError(f"max_vps must be a non-negative integer; got {max_vps!r}")
    camera = camera_matrix(image_shape, focal_length, principal_point)
    segments = np.asarray(segments, dtype=np.float64).reshape(-1, 4)
    lengths = segment_lengths(segments)
    segments, lengths = segments[lengths > 0], lengths[lengths > 0]
    if len(segments) < min_segments or max_vps == 0:
        return _no_vanishing_points(len(segments), camera)
    normals = interpretation_normals(segments, camera)
    rng = np.random.default_rng(seed)
    if focal_length is None:
        directions = _independent_directions(segments, normals, lengths, camera, max_vps, inlier_deg, n_hypotheses, rng)
    else:
        directions = _manhattan_frame(segments, normals, lengths, camera, inlier_deg, n_hypotheses, rng)
    return _rank_by_support(segments, lengths, directions, camera, inlier_deg, max_vps)


def _no_vanishing_points(n_segments: int, camera: np.ndarray) -> VanishingPoints:
    """The empty result, for images with too few segments."""
    empty = np.zeros((0, 3))
    return VanishingPoints(empty, empty, np.zeros(0), np.full(n_segments, -1), camera)


def _soft_scores(segments: np.ndarray, lengths: np.ndarray, vps: np.ndarray, inlier_deg: float) -> np.ndarray:
    """Length-weighted soft inlier score (N x M) of each segment for each homogeneous point."""
    ratio = consistency_angles(segments, vps) / inlier_deg
    return lengths[:, None] * np.clip(1.0 - ratio**2, 0.0, None)


def _sample_pairs(lengths: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` pairs of distinct segment indices, drawn with probability proportional to length."""
    probabilities = lengths / lengths.sum()
    pairs = rng.choice(len(lengths), size=(count, 2), p=probabilities)
    return pairs[pairs[:, 0] != pairs[:, 1]]


def _pair_directions(normals: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Unit direction where the two segments of each pair meet; degenerate (near-collinear) pairs dropped."""
    crossed = np.cross(normals[pairs[:, 0]], normals[pairs[:, 1]])
    norms = np.linalg.norm(crossed, axis=1)
    return crossed[norms > 1e-6] / norms[norms > 1e-6, None]


def _manhattan_frame(
    segments: np.ndarray,
    normals: np.ndarray,
    lengths: np.ndarray,
    camera: np.ndarray,
    inlier_deg: float,
    n_hypotheses: int,
    rng: np.random.Generator,
    n_refined: int = 5,
) -> np.ndarray:
    """Rows of the best Manhattan frame (3 x 3, orthonormal): RANSAC triples, then refine the top few."""
    first = _pair_directions(normals, _sample_pairs(lengths, n_hypotheses, rng))
    third_segment = rng.choice(len(lengths), size=len(first), p=lengths / lengths.sum())
    second = np.cross(first, normals[third_segment])
    keep = np.linalg.norm(second, axis=1) > 1e-6
    first, second = first[keep], _unit(second[keep])
    frames = np.stack([first, second, np.cross(first, second)], axis=1)  # (M, 3, 3)
    if len(frames) == 0:
        return np.zeros((0, 3))
    scores = _frame_scores(segments, lengths, frames, camera, inlier_deg)
    candidates = [_refine_frame(frame, normals, segments, lengths, camera, inlier_deg) for frame in frames[np.argsort(-scores)[:n_refined]]]
    final = _frame_scores(segments, lengths, np.stack(candidates), camera, inlier_deg)
    return candidates[int(np.argmax(final))]


def _frame_scores(segments: np.ndarray, lengths: np.ndarray, frames: np.ndarray, camera: np.ndarray, inlier_deg: float) -> np.ndarray:
    """Soft score of each Manhattan frame (M x 3 x 3): each segment counts for its best axis."""
    soft = _soft_scores(segments, lengths, frames.reshape(-1, 3) @ camera.T, inlier_deg)
    return soft.reshape(len(segments), len(frames), 3).max(axis=2).sum(axis=0)


def _refine_frame(
    frame: np.ndarray, normals: np.ndarray, segments: np.ndarray, lengths: np.ndarray, camera: np.ndarray, inlier_deg: float, rounds: int = 3
) -> np.ndarray:
    """Least-squares rotation: minimise sum of length * (n_i . d_k(i))^2 over segments assigned to an axis."""
    for _ in range(rounds):
        angles = consistency_angles(segments, frame @ camera.T)
        nearest = angles.argmin(axis=1)
        inliers = angles[np.arange(len(segments)), nearest] < 2 * inlier_deg
        if inliers.sum() < 3:
            break
        weighted = normals[inliers] * np.sqrt(lengths[inliers])[:, None]
        axis_of = nearest[inliers]

        def residuals(rotvec: np.ndarray) -> np.ndarray:
            rotated = frame @ Rotation.from_rotvec(rotvec).as_matrix().T
            return np.einsum("ij,ij->i", weighted, rotated[axis_of])

        step = least_squares(residuals, np.zeros(3), loss="soft_l1", f_scale=np.sin(np.radians(inlier_deg)) * np.sqrt(lengths.mean()))
        frame = frame @ Rotation.from_rotvec(step.x).as_matrix().T
    return frame


def _independent_directions(
    segments: np.ndarray,
    normals: np.ndarray,
    lengths: np.ndarray,
    camera: np.ndarray,
    max_vps: int,
    inlier_deg: float,
    n_hypotheses: int,
    rng: np.random.Generator,
    min_share: float = 0.03,
) -> np.ndarray:
    """Greedy sequential choice among shared pair hypotheses: best point, refine, remove its segments, repeat."""
    hypotheses = _pair_directions(normals, _sample_pairs(lengths, n_hypotheses, rng))
    soft = _soft_scores(segments, lengths, hypotheses @ camera.T, inlier_deg)
    remaining = np.ones(len(segments), dtype=bool)
    chosen: list[np.ndarray] = []
    for _ in range(max_vps):
        if len(hypotheses) == 0:
            break
        best = hypotheses[np.argmax(remaining @ soft)]
        direction = _refine_direction(best, normals, segments, lengths, remaining, camera, inlier_deg)
        claimed = remaining & (consistency_angles(segments, camera @ direction)[:, 0] < 2 * inlier_deg)
        if lengths[claimed].sum() < min_share * lengths.sum() or claimed.sum() < 3:
            break
        chosen.append(direction)
        remaining &= ~claimed
    return np.array(chosen).reshape(-1, 3)


def _refine_direction(
    direction: np.ndarray,
    normals: np.ndarray,
    segments: np.ndarray,
    lengths: np.ndarray,
    allowed: np.ndarray,
    camera: np.ndarray,
    inlier_deg: float,
    rounds: int = 3,
) -> np.ndarray:
    """Re-estimate one direction as the least eigenvector of sum of length * n n^T over its inliers."""
    for _ in range(rounds):
        inliers = allowed & (consistency_angles(segments, camera @ direction)[:, 0] < 2 * inlier_deg)
        if inliers.sum() < 2:
            break
        scatter = (normals[inliers] * lengths[inliers, None]).T @ normals[inliers]
        direction = np.linalg.eigh(scatter)[1][:, 0]
    return direction


def _rank_by_support(
    segments: np.ndarray, lengths: np.ndarray, directions: np.ndarray, camera: np.ndarray, inlier_deg: float, max_vps: int
) -> VanishingPoints:
    """Assign each segment to its nearest point (within 2 x inlier_deg) and order points by summed length."""
    if len(directions) == 0:
        return _no_vanishing_points(len(segments), camera)
    angles = consistency_angles(segments, directions @ camera.T)
    nearest = angles.argmin(axis=1)
    assigned = np.where(angles[np.arange(len(segments)), nearest] < 2 * inlier_deg, nearest, -1)
    support = np.bincount(assigned[assigned >= 0], weights=lengths[assigned >= 0], minlength=len(directions))
    order = np.argsort(-support, kind="stable")[:max_vps]
    relabel = np.full(len(directions) + 1, -1)
    relabel[order] = np.arange(len(order))
    return VanishingPoints(
        homogeneous=directions[order] @ camera.T,
        directions=directions[order],
        support=support[order],
        assignment=relabel[assigned],
        camera=camera,
    )
