"""Class prompts for Stable Diffusion generation from templates and class synonyms (their defaults are
parameters: `params.CLIP_TEMPLATES`, `params.CLASS_SYNONYMS`), and captions files.

A prompt is a template (`"a blurry photo of a {}."`) filled with a name of the class (`"sedan"` for
`automobile`); which template and which name an image gets is drawn with that image's own seed, so a
prompt depends only on the run seed and the image id.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from synthgap_helpers.errors import DataError


def class_prompt(class_name: str, seed: int, templates: Sequence[str],
                 synonyms: Mapping[str, Sequence[str]] | None = None) -> str:
    """The prompt of one image: template and class name drawn with the image's seed."""
    names = list((synonyms or {}).get(class_name) or [class_name])
    rng = np.random.default_rng([seed, 1])  # stream 1 of the image seed: prompt choices
    template = templates[int(rng.integers(len(templates)))]
    return template.format(names[int(rng.integers(len(names)))])


def draw_guidance(seed: int, guidance: float, guidance_range: Sequence[float] | None) -> float:
    """Classifier-free guidance of one image: `guidance`, or uniform in `guidance_range` with the image's seed."""
    if guidance_range is None:
        return float(guidance)
    low, high = guidance_range
    rng = np.random.default_rng([seed, 2])  # stream 2 of the image seed: guidance
    return round(float(rng.uniform(low, high)), 4)


def read_captions(path: str | Path) -> dict[str, str]:
    """Captions of real images, id -> caption, from JSON (`{id: caption}` or `[{id, caption}]`) or JSONL.

    JSONL lines are `{"id": ..., "caption": ...}` records; ids are those of the real images
    (`cat/0000` for class folders, `train/00042` for the official batches).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"sd.captions: file {path} does not exist (JSON id -> caption, or JSONL with id and caption)")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"sd.captions: {path} is not valid JSON/JSONL ({exc.msg}, line {exc.lineno})") from None
    if isinstance(entries, dict):
        captions = entries
    elif isinstance(entries, list) and all(isinstance(e, dict) and {"id", "caption"} <= set(e) for e in entries):
        captions = {e["id"]: e["caption"] for e in entries}
    else:
        raise DataError(f"sd.captions: {path} must map image id -> caption, or list records with 'id' and 'caption'")
    bad = [key for key, value in captions.items() if not isinstance(value, str) or not value.strip()]
    if bad:
        raise DataError(f"sd.captions: {path} has {len(bad)} empty or non-text caption(s), e.g. ids {bad[:3]}")
    return {str(key): value for key, value in captions.items()}
