"""The shapes dataset: 32x32 RGB images of one filled shape on a dark background, with captions.

Caption grammar (used for evaluation): ``a {size} {color} {shape} at the {position}`` with size in {small, large},
color in {red, green, blue, yellow}, shape in {circle, square, triangle}, position in {top left, top right,
bottom left, bottom right, center}. The shape is centred in its quadrant (or the image centre), with mild random
jitter in position, size and shade. Everything is deterministic from a seed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SIZES = ("small", "large")
COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
ATTRIBUTES = {"size": SIZES, "color": COLORS, "shape": SHAPES, "position": POSITIONS}
RGB = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
CENTERS = {"top left": (8, 8), "top right": (24, 8), "bottom left": (8, 24), "bottom right": (24, 24),
           "center": (16, 16)}
RADIUS = {"small": 3.5, "large": 6.5}
IMAGE = 32


@dataclass(frozen=True)
class Label:
    size: str
    color: str
    shape: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} at the {self.position}"

    def partial_caption(self, keep: dict[str, bool]) -> str:
        """The caption with some attributes left out (one caption then stands for many images)."""
        words = ["a"] + [getattr(self, k) for k in ("size", "color") if keep[k]] + [self.shape if keep["shape"]
                                                                                    else "shape"]
        if keep["position"]:
            words += ["at", "the", self.position]
        return " ".join(words)

    def index(self) -> dict[str, int]:
        return {k: ATTRIBUTES[k].index(getattr(self, k)) for k in ATTRIBUTES}


def all_labels() -> list[Label]:
    return [Label(*x) for x in itertools.product(SIZES, COLORS, SHAPES, POSITIONS)]


def all_captions() -> list[str]:
    """Every caption the recipe trains on: each label's full caption and each of its partial captions."""
    return sorted({lb.partial_caption(k) for lb in all_labels() for k in PARTIAL_KEEPS}
                  | {lb.caption for lb in all_labels()})


#: the ways a training caption leaves attributes out (``Label.partial_caption``'s ``keep``), every one but the full
#: caption: 15 patterns, from "a shape" (nothing fixed) to one attribute left free
PARTIAL_KEEPS = tuple(dict(zip(ATTRIBUTES, k)) for k in itertools.product((False, True), repeat=len(ATTRIBUTES))
                      if not all(k))


def matching_label(fixed: dict[str, str], rng: np.random.Generator) -> Label:
    """A label with the ``fixed`` attribute values and the others drawn uniformly: a real image that a partial
    caption fixing ``fixed`` describes."""
    return Label(**{k: fixed[k] if k in fixed else values[int(rng.integers(len(values)))]
                    for k, values in ATTRIBUTES.items()})


def longest_caption_tokens(tokenizer: object) -> int:
    """Tokens (with BOS/EOS) of the longest caption in :func:`all_captions` under ``tokenizer``."""
    return max(len(ids) for ids in tokenizer(all_captions())["input_ids"])  # type: ignore[operator]


def parse_caption(caption: str) -> Label:
    """Inverse of :attr:`Label.caption` (full captions only)."""
    for label in all_labels():
        if label.caption == caption:
            return label
    raise ValueError(f"not a shapes caption: {caption!r}")


def draw_shape(label: Label, rng: np.random.Generator) -> np.ndarray:
    """One 32x32x3 uint8 image of ``label`` with jitter drawn from ``rng``."""
    bg = rng.integers(0, 30)
    img = np.full((IMAGE, IMAGE, 3), bg, dtype=np.float32)
    cx, cy = np.array(CENTERS[label.position], dtype=np.float32) + rng.uniform(-1.5, 1.5, size=2)
    r = RADIUS[label.size] * rng.uniform(0.9, 1.1)
    color = np.clip(np.array(RGB[label.color], dtype=np.float32) * rng.uniform(0.85, 1.0), 0, 255)
    yy, xx = np.mgrid[0:IMAGE, 0:IMAGE].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if label.shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif label.shape == "square":
        s = r * 0.85
        mask = (np.abs(dx) <= s) & (np.abs(dy) <= s)
    else:  # upward triangle inscribed in the circle of radius r
        top, bottom = -r, r * 0.6
        half = (dy - top) / (bottom - top) * r * 0.95
        mask = (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half)
    img[mask] = color
    return img.astype(np.uint8)


def balanced_order(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices into ``k`` items drawn in balanced rounds: each round a permutation of all ``k``."""
    return np.concatenate([rng.permutation(k) for _ in range(-(-n // k))])[:n]


def make_dataset(n: int, seed: int) -> tuple[np.ndarray, list[Label]]:
    """``n`` images (uint8 NHWC) with balanced labels, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    labels_all = all_labels()
    labels = [labels_all[i] for i in balanced_order(n, len(labels_all), rng)]
    return np.stack([draw_shape(lb, rng) for lb in labels]), labels
