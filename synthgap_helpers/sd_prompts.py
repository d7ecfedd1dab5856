"""Class prompts for Stable Diffusion generation: CLIP-style templates, class synonyms, captions files.

A prompt is a template (`"a blurry photo of a {}."`) filled with a name of the class (`"sedan"` for
`automobile`); which template and which name an image gets is drawn with that image's own seed, so a
prompt depends only on the run seed and the image id.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# The 18 CIFAR-10 prompt templates of CLIP (Radford et al. 2021, notebooks/Prompt_Engineering_for_ImageNet.ipynb).
CLIP_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
    "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
    "a photo of the small {}.", "a photo of the big {}.",
)

# Names a prompt may use for each class. CIFAR-10's own definitions: "automobile" covers sedans, SUVs and
# the like but not pickup trucks; "truck" covers only big trucks.
CLASS_SYNONYMS: dict[str, tuple[str, ...]] = {
    "airplane": ("airplane", "aeroplane", "jet", "airliner", "propeller plane"),
    "automobile": ("car", "automobile", "sedan", "SUV", "hatchback", "station wagon"),
    "bird": ("bird", "sparrow", "finch", "ostrich", "eagle", "songbird"),
    "cat": ("cat", "kitten", "tabby cat", "house cat"),
    "deer": ("deer", "stag", "doe", "fawn", "elk"),
    "dog": ("dog", "puppy", "terrier", "retriever"),
    "frog": ("frog", "toad", "tree frog", "bullfrog"),
    "horse": ("horse", "pony", "foal", "stallion"),
    "ship": ("ship", "boat", "cargo ship", "ferry", "sailing ship"),
    "truck": ("truck", "lorry", "dump truck", "fire truck", "semi truck"),
}


def check_templates(templates: Sequence[str]) -> list[str]:
    """The templates as a list; an empty list or a template without exactly one `{}` is an error."""
    templates = list(templates)
    if not templates:
        raise ValueError("sd.templates is empty; give at least one prompt template such as 'a photo of a {}.'")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1 or "{" in template.replace("{}", ""):
            raise ValueError(f"sd.templates: {template!r} must hold exactly one '{{}}' where the class name goes "
                             "(e.g. 'a photo of a {}.') and no other braces")
    return templates


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
        raise ValueError(f"sd.captions: file {path} does not exist (JSON id -> caption, or JSONL with id and caption)")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"sd.captions: {path} is not valid JSON/JSONL ({exc.msg}, line {exc.lineno})") from None
    if isinstance(entries, dict):
        captions = entries
    elif isinstance(entries, list) and all(isinstance(e, dict) and {"id", "caption"} <= set(e) for e in entries):
        captions = {e["id"]: e["caption"] for e in entries}
    else:
        raise ValueError(f"sd.captions: {path} must map image id -> caption, or list records with 'id' and 'caption'")
    bad = [key for key, value in captions.items() if not isinstance(value, str) or not value.strip()]
    if bad:
        raise ValueError(f"sd.captions: {path} has {len(bad)} empty or non-text caption(s), e.g. ids {bad[:3]}")
    return {str(key): value for key, value in captions.items()}
