"""Procedural captioned scenes for the embedded demo model.

A scene is a flat background with one to four simple shapes, each of a named color and size;
its caption comes from a small grammar, so a prompt typed from that grammar has a right answer
that code can check (`nunchaku.demo.checker`). Three kinds of scenes:

    single    a [size] COLOR SHAPE [POSITION-PHRASE] [on a COLOR background]
              "a large red circle at the top left on a blue background"
    relation  a [size] COLOR SHAPE RELATION a [size] COLOR SHAPE [on a COLOR background]
              "a red circle above a blue square on a yellow background"
    count     NUMBER [size] COLOR SHAPEs [on a COLOR background]
              "three small green stars on a white background"

Bracketed parts are optional in a caption; the scene always has them (a caption that does not
name the background still comes with some background), so the model learns to fill in what a
prompt leaves open. Geometry is in image fractions (x to the right, y down), so scenes render at
any size. Sampling uses `random.Random` seeded from strings, which gives the same scenes on every
platform and Python version: scene `index` of `seed` is a pure function of the two.

Held-out split: a caption is held out when a SHA-256 hash of its canonical text falls in the
lowest `HELD_OUT_FRACTION` of the range. Training never sees a held-out caption (it resamples
the scene); the evaluation prompts are drawn only from held-out captions, so they are prompts
the model has never been trained on, while their words and combinations of attributes are
familiar (compositional generalization, not new vocabulary).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

# Well separated in RGB (every pair >= 115 apart) so that color segmentation stays unambiguous
# after VAE decoding; no color is close to the midpoint of two others' edges except purple
# (red/blue), which is why the checker opens its masks before counting components.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (245, 215, 50),
    "purple": (150, 60, 190),
    "cyan": (50, 200, 220),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
                           "heart": "hearts", "cross": "crosses"}
SIZES: tuple[str, ...] = ("small", "large")
# Half-extent of a shape as a fraction of the image side.
SIZE_RADIUS: dict[str, float] = {"small": 0.10, "large": 0.17}
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of", "next to")
NUMBERS: dict[str, int] = {"two": 2, "three": 3, "four": 4}
KINDS: tuple[str, ...] = ("single", "relation", "count")
KIND_WEIGHTS: dict[str, float] = {"single": 0.5, "relation": 0.3, "count": 0.2}

# A 3x3 grid of cells: the name of each and its center (x, y) in image fractions. Centers sit at
# 0.22/0.5/0.78 rather than at the thirds' centers so that a large shape stays inside the image.
_COLS = (("left", 0.22), ("", 0.5), ("right", 0.78))
_ROWS = (("top", 0.22), ("", 0.5), ("bottom", 0.78))
CELL_CENTERS: dict[str, tuple[float, float]] = {
    (" ".join(p for p in (row, col) if p) or "center"): (x, y) for row, y in _ROWS for col, x in _COLS
}
POSITIONS: tuple[str, ...] = tuple(CELL_CENTERS)
# The caption's phrase for each position; the parser accepts any of in/at/on before "the".
POSITION_PHRASES: dict[str, str] = {
    p: ("in the center" if p == "center" else f"on the {p}" if p in ("left", "right") else f"at the {p}")
    for p in POSITIONS
}
# Boundaries of the grid's columns and rows (x or y below the first is left/top).
CELL_EDGES: tuple[float, float] = (0.36, 0.64)

_JITTER = 0.03
_STATE_PROBABILITY = 0.5
HELD_OUT_FRACTION = 0.1

VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(
    ["a", "an", *NUMBERS, *SIZES, *COLORS, *SHAPES, *PLURALS.values(), "above", "below", "left", "right", "of",
     "next", "to", "in", "at", "on", "the", "top", "bottom", "center", "background"]
))


@dataclass(frozen=True)
class SceneObject:
    """One shape: `center` (x, y) and `radius` (half-extent) in fractions of the image side."""

    shape: str
    color: str
    size: str
    center: tuple[float, float]
    radius: float

    @property
    def position(self) -> str:
        return position_of(*self.center)


@dataclass(frozen=True)
class ObjectQuery:
    """What a prompt says about one object (None: the prompt leaves it open)."""

    shape: str
    color: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Prompt:
    """A parsed prompt: the constraints an image must meet.

    single: one object; relation: objects[0] RELATION objects[1]; count: `count` copies of
    objects[0] (and nothing else).
    """

    kind: str
    objects: tuple[ObjectQuery, ...]
    background: str | None = None
    relation: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        expected = 2 if self.kind == "relation" else 1
        if self.kind not in KINDS or len(self.objects) != expected:
            raise ValueError(f"a {self.kind!r} prompt needs {expected} object(s), got {len(self.objects)}")
        if (self.kind == "relation") != (self.relation is not None):
            raise ValueError("a relation is given exactly for relation prompts")
        if self.kind == "count" and self.count not in NUMBERS.values():
            raise ValueError(f"count must be one of {sorted(NUMBERS.values())}, got {self.count}")
        for obj in self.objects:
            if obj.color == self.background:
                raise ValueError(f"a {obj.color} {obj.shape} on a {obj.color} background would be invisible")


@dataclass(frozen=True)
class SceneSpec:
    """A full scene, and which optional attributes its caption states ("size", "position",
    "background"); positions are only stated for single-object scenes."""

    kind: str
    objects: tuple[SceneObject, ...]
    background: str
    relation: str | None = None
    stated: frozenset[str] = field(default_factory=frozenset)

    def prompt(self) -> Prompt:
        """The constraints its caption states."""
        queries = tuple(
            ObjectQuery(o.shape, o.color, o.size if "size" in self.stated else None,
                        o.position if "position" in self.stated and self.kind == "single" else None)
            for o in (self.objects[:1] if self.kind == "count" else self.objects)
        )
        return Prompt(self.kind, queries, self.background if "background" in self.stated else None, self.relation,
                      len(self.objects) if self.kind == "count" else 1)


def position_of(x: float, y: float) -> str:
    """The grid cell's name for a point in image fractions."""
    col = "left" if x < CELL_EDGES[0] else "right" if x > CELL_EDGES[1] else ""
    row = "top" if y < CELL_EDGES[0] else "bottom" if y > CELL_EDGES[1] else ""
    return " ".join(p for p in (row, col) if p) or "center"


# ----------------------------------------------------------------------------- captions


def _object_phrase(obj: ObjectQuery, number: str = "a") -> str:
    noun = obj.shape if number == "a" else PLURALS[obj.shape]
    return " ".join(w for w in (number, obj.size, obj.color, noun) if w)


def caption(scene: SceneSpec | Prompt) -> str:
    """The caption of a scene (or the canonical text of a prompt)."""
    p = scene.prompt() if isinstance(scene, SceneSpec) else scene
    if p.kind == "count":
        number = next(word for word, n in NUMBERS.items() if n == p.count)
        text = _object_phrase(p.objects[0], number)
    elif p.kind == "relation":
        text = f"{_object_phrase(p.objects[0])} {p.relation} {_object_phrase(p.objects[1])}"
    else:
        obj = p.objects[0]
        text = _object_phrase(obj) + (f" {POSITION_PHRASES[obj.position]}" if obj.position else "")
    return text + (f" on a {p.background} background" if p.background else "")


class _Tokens:
    def __init__(self, text: str):
        self.text = text
        self.words = text.lower().replace(",", " ").strip().rstrip(".!").split()
        self.i = 0

    def peek(self, k: int = 0) -> str | None:
        return self.words[self.i + k] if self.i + k < len(self.words) else None

    def take(self, allowed: Sequence[str] | dict, what: str) -> str:
        word = self.peek()
        if word not in allowed:
            found = f"{word!r}" if word is not None else "the end"
            raise ValueError(f"cannot parse {self.text!r}: expected {what} at word {self.i + 1}, found {found}")
        self.i += 1
        return word


def _parse_object(tok: _Tokens, plural: bool) -> ObjectQuery:
    size = tok.take(SIZES, "a size") if tok.peek() in SIZES else None
    color = tok.take(COLORS, "a color (" + ", ".join(COLORS) + ")")
    if plural:
        noun = tok.take(PLURALS.values(), "a plural shape (" + ", ".join(PLURALS.values()) + ")")
        shape = next(s for s, p in PLURALS.items() if p == noun)
    else:
        shape = tok.take(SHAPES, "a shape (" + ", ".join(SHAPES) + ")")
    return ObjectQuery(shape, color, size)


def parse_prompt(text: str) -> Prompt:
    """Parse a prompt of the scene grammar (see the module docstring); case and a final period
    do not matter. Raises ValueError naming the first word that does not fit."""
    tok = _Tokens(text)
    relation = None
    count = 1
    if tok.peek() in NUMBERS:
        kind = "count"
        count = NUMBERS[tok.take(NUMBERS, "a number")]
        objects = [_parse_object(tok, plural=True)]
    else:
        tok.take(("a", "an"), "'a', 'an' or a number (" + ", ".join(NUMBERS) + ")")
        objects = [_parse_object(tok, plural=False)]
        kind = "single"
        if tok.peek() in ("above", "below", "left", "right", "next"):
            kind = "relation"
            first = tok.take(("above", "below", "left", "right", "next"), "a relation")
            if first in ("left", "right"):
                tok.take(("of",), "'of'")
                relation = f"{first} of"
            elif first == "next":
                tok.take(("to",), "'to'")
                relation = "next to"
            else:
                relation = first
            tok.take(("a", "an"), "'a'")
            objects.append(_parse_object(tok, plural=False))
        elif tok.peek() in ("in", "at", "on") and tok.peek(1) == "the":
            tok.i += 2
            name = tok.take(("top", "bottom", "left", "right", "center"), "a position")
            if name in ("top", "bottom") and tok.peek() in ("left", "right"):
                name = f"{name} {tok.take(('left', 'right'), 'left or right')}"
            objects[0] = replace(objects[0], position=name)
    background = None
    if tok.peek() is not None:
        tok.take(("on",), "'on a COLOR background' or the end")
        tok.take(("a",), "'a'")
        background = tok.take(COLORS, "a background color")
        tok.take(("background",), "'background'")
    if tok.peek() is not None:
        tok.take((), "the end")
    return Prompt(kind, tuple(objects), background, relation, count)


# ----------------------------------------------------------------------------- sampling


def _jittered(rng: random.Random, x: float, y: float) -> tuple[float, float]:
    return (x + rng.uniform(-_JITTER, _JITTER), y + rng.uniform(-_JITTER, _JITTER))


def _radius(rng: random.Random, size: str) -> float:
    return SIZE_RADIUS[size] * rng.uniform(0.92, 1.08)


def sample_scene(rng: random.Random, kind: str | None = None,
                 kind_weights: dict[str, float] = KIND_WEIGHTS) -> SceneSpec:
    """A random scene of `kind` (drawn from `kind_weights` when None)."""
    if kind is None:
        kind = rng.choices(list(kind_weights), weights=list(kind_weights.values()))[0]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    background = rng.choice(list(COLORS))
    others = [c for c in COLORS if c != background]
    stated = {a for a in ("size", "position", "background") if rng.random() < _STATE_PROBABILITY}
    relation = None
    if kind == "single":
        size = rng.choice(SIZES)
        center = _jittered(rng, *CELL_CENTERS[rng.choice(POSITIONS)])
        objects = (SceneObject(rng.choice(SHAPES), rng.choice(others), size, center, _radius(rng, size)),)
    elif kind == "count":
        shape, color = rng.choice(SHAPES), rng.choice(others)
        cells = rng.sample(POSITIONS, rng.choice(list(NUMBERS.values())))
        objects = tuple(SceneObject(shape, color, "small", _jittered(rng, *CELL_CENTERS[c]), _radius(rng, "small"))
                        for c in cells)
    else:
        relation = rng.choice(RELATIONS)
        first = (rng.choice(SHAPES), rng.choice(others))
        second = rng.choice([(s, c) for s in SHAPES for c in others if (s, c) != first])
        # The pair lies along one axis: the leading object's coordinate in [0.2, 0.3], the other's
        # in [0.7, 0.8] (two large shapes still do not touch), both near one common line across.
        near, far = rng.uniform(0.2, 0.3), rng.uniform(0.7, 0.8)
        line = rng.uniform(0.3, 0.7)
        across = (line + rng.uniform(-0.05, 0.05), line + rng.uniform(-0.05, 0.05))
        leads = relation in ("above", "left of") or (relation == "next to" and rng.random() < 0.5)
        along = (near, far) if leads else (far, near)
        vertical = relation in ("above", "below")
        centers = [(a, b) if not vertical else (b, a) for a, b in zip(along, across)]
        sizes = (rng.choice(SIZES), rng.choice(SIZES))
        objects = tuple(SceneObject(s, c, size, center, _radius(rng, size))
                        for (s, c), size, center in zip((first, second), sizes, centers))
    if kind != "single":
        stated.discard("position")
    return SceneSpec(kind, objects, background, relation, frozenset(stated))


def _caption_hash(text: str) -> float:
    digest = hashlib.sha256(caption(parse_prompt(text)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out(text: str) -> bool:
    """Whether a caption belongs to the evaluation-only split (decided by its canonical text)."""
    return _caption_hash(text) < HELD_OUT_FRACTION


def scene_at(seed: int, index: int, split: str = "train", kind: str | None = None,
             kind_weights: dict[str, float] = KIND_WEIGHTS) -> SceneSpec:
    """Scene `index` of the stream `seed` within a split ("train", "heldout" or "all")."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    for attempt in range(10_000):
        scene = sample_scene(random.Random(f"{seed}:{index}:{attempt}"), kind, kind_weights)
        if split == "all" or is_held_out(caption(scene)) == (split == "heldout"):
            return scene
    raise RuntimeError("no scene of the split found")  # unreachable at a 10% held-out fraction


def held_out_scenes(n: int, kinds: Sequence[str] = KINDS, seed: int = 0) -> list[SceneSpec]:
    """`n` scenes with distinct held-out captions, the kinds taken in turn (deterministic)."""
    scenes: list[SceneSpec] = []
    seen: set[str] = set()
    index = 0
    while len(scenes) < n:
        scene = scene_at(seed + 1_000_003, index, "heldout", kinds[index % len(kinds)])
        index += 1
        if caption(scene) not in seen:
            seen.add(caption(scene))
            scenes.append(scene)
    return scenes


def held_out_prompts(n: int, kinds: Sequence[str] = KINDS, seed: int = 0) -> list[str]:
    """`n` distinct held-out prompts (evaluation only; never in the training stream)."""
    return [caption(s) for s in held_out_scenes(n, kinds, seed)]


# ----------------------------------------------------------------------------- rendering


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """The outline in units of the radius (x right, y down), within [-1, 1]^2."""
    if shape == "square":
        return [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    if shape == "triangle":
        return [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]
    if shape == "star":
        return [((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        a, w = 0.95, 0.32
        return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w),
                (-w, -w)]
    if shape == "heart":
        ts = [2 * math.pi * k / 96 for k in range(96)]
        pts = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                         - math.cos(4 * t))) for t in ts]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
        half = max(max(xs) - min(xs), max(ys) - min(ys)) / 2
        return [((x - cx) / half, (y - cy) / half) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: SceneSpec, size: int = 128, supersample: int = 4) -> Image.Image:
    """The scene as a `size` x `size` RGB image, anti-aliased by drawing at `supersample` times
    the size and box-filtering down."""
    big = size * supersample
    image = Image.new("RGB", (big, big), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.center[0] * big, obj.center[1] * big, obj.radius * big
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx + x * r, cy + y * r) for x, y in _unit_polygon(obj.shape)], fill=fill)
    return image.resize((size, size), Image.Resampling.BOX) if supersample > 1 else image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float32 tensor [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class SceneDataset(torch.utils.data.Dataset):
    """`length` scenes of one split as (image [3, size, size] in [-1, 1], caption) pairs;
    item i is scene_at(seed, i, split), so any worker or resumed run sees the same items."""

    def __init__(self, length: int, size: int = 128, seed: int = 0, split: str = "train",
                 kind_weights: dict[str, float] = KIND_WEIGHTS):
        self.length, self.size, self.seed, self.split, self.kind_weights = length, size, seed, split, kind_weights

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> SceneSpec:
        return scene_at(self.seed, index, self.split, kind_weights=self.kind_weights)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        scene = self.scene(index)
        return to_tensor(render(scene, self.size)), caption(scene)
