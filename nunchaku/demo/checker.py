"""Does an image show a prompt of the scene grammar? A faithfulness checker for the demo model.

The scenes are flat colors, so plain image analysis is enough (no learned model):

1. **Color segmentation.** Each pixel takes the nearest palette color (RGB distance) when it is
   within `tolerance` of it, else it stays unlabeled. The background is the most common label on
   the image border (objects never touch the border).
2. **Objects.** For every other color, its mask is split into 8-connected components. A
   component counts only by its part that survives an opening with a 3x3 square (erode, then
   dilate): that removes the thin rims that anti-aliasing, blur or a VAE leave where two colors
   meet (a red shape on blue has a purple-ish rim), while the component is measured whole, so
   star tips stay sharp. Components whose opened part is under `min_area` of the image are noise.
3. **Shape.** Seven scale-free features of a component: extent (area / bounding box area),
   solidity (area / convex hull area), aspect (box width / height), the centroid's vertical
   offset within the box (a triangle is bottom-heavy, a heart top-heavy), and the 3rd, 4th and
   5th angular harmonics of the outline's distance from the centroid (triangle, square or cross,
   star; blur makes a star's extent and solidity drift towards a cross's, not its harmonics). The
   shape is that of the nearest prototype, the same features measured on the renderer's own
   shapes at both sizes through the same segmentation; a component farther than
   `max_shape_distance` (in units of `_FEATURE_SCALE`) from every prototype is "unknown" and
   matches no shape. Prototypes at 128 px (extent / solidity / strongest harmonic): circle
   0.78 / 0.95-0.97 / none, square 1.0 / 1.0 / h4 0.075, triangle 0.52-0.55 / 0.92-0.94 / h3 0.15,
   star 0.39-0.41 / 0.56-0.57 / h5 0.17-0.18, cross 0.56 / 0.71 / h4 0.17, heart 0.62-0.65 /
   0.89-0.91 / h3 0.10 with offset -0.1.
4. **Attributes.** Size: the radius implied by the box (its longer side over the shape's extent in
   radii) against the midpoint of the two sizes. Position: the box center's cell of the 3x3 grid.
   Relation: between box centers, "above"/"below" when the vertical offset dominates, "left
   of"/"right of"/"next to" when the horizontal one does.
5. **Scene.** The image must hold exactly the prompt's objects (one, two, or `count` of them) and
   no other object of a palette color; a stated background must be the detected one.

`check_image` returns every check with its details, so a failure says why.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageFilter

from nunchaku.demo.scenes import (
    COLORS, NUMBERS, POSITIONS, SHAPES, SIZE_RADIUS, ObjectQuery, Prompt, SceneObject, SceneSpec, parse_prompt,
    position_of, render,
)

_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)
# Half of a shape's longer bounding-box side in units of its radius (see scenes._unit_polygon).
_EXTENT_IN_RADII = {"circle": 1.0, "square": 0.85, "triangle": 1.0, "star": 0.951, "heart": 1.0, "cross": 0.95}
# Feature scales for the prototype distance: roughly the spread seen on degraded renders.
_FEATURE_SCALE = np.array([0.08, 0.08, 0.15, 0.05, 0.025, 0.025, 0.025], dtype=np.float32)
_ANGLE_BINS = 48


@dataclass(frozen=True)
class CheckerConfig:
    """Thresholds; the defaults are tuned on renders with blur, noise and JPEG degradation."""

    tolerance: float = 90.0  # RGB distance to the nearest palette color (palette pairs are >= 115 apart)
    min_area: float = 0.004  # of the image; a small star covers ~0.011
    border: int = 2  # pixels of the border ring that decides the background
    min_background_share: float = 0.5  # of the border ring
    max_shape_distance: float = 4.0  # from the nearest prototype, in units of _FEATURE_SCALE

    def __post_init__(self) -> None:
        if self.tolerance <= 0 or not 0 < self.min_area < 1 or self.border < 1:
            raise ValueError(f"invalid checker config {self}")


@dataclass(frozen=True)
class Blob:
    """One detected object: box center (x, y) and implied radius in image fractions."""

    color: str
    shape: str
    size: str
    center: tuple[float, float]
    radius: float
    area: float
    features: tuple[float, ...]
    shape_distance: float

    @property
    def position(self) -> str:
        return position_of(*self.center)


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class CheckResult:
    """`passed` is True when every check passed; `reason` names the first failure."""

    passed: bool
    reason: str
    checks: tuple[Check, ...]
    background: str | None
    objects: tuple[Blob, ...]


def _as_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """HxWx3 float32 in 0..255 from a PIL image, a uint8/float HWC array or a [-1, 1] CHW tensor."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"a tensor image must be [3, H, W] in [-1, 1], got shape {tuple(t.shape)}")
        return ((t.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"an array image must be HxWx3, got shape {arr.shape}")
    return arr.astype(np.float32) if arr.dtype == np.uint8 else arr.astype(np.float32) * 255.0


def _shift_and(mask: np.ndarray, combine_all: bool) -> np.ndarray:
    """3x3 erosion (combine_all) or dilation of a boolean mask, zero outside the image."""
    h, w = mask.shape
    p = np.pad(mask, 1)
    out = np.ones_like(mask) if combine_all else np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            if combine_all:
                out &= p[dy:dy + h, dx:dx + w]
            else:
                out |= p[dy:dy + h, dx:dx + w]
    return out


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True: (row, start, end exclusive), ordered by row then start."""
    d = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)
    return rows, starts, ends


def _components(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """8-connected components as lists of runs, by union-find over runs of adjacent rows (a few
    hundred runs per mask, where a per-pixel flood fill in Python would visit thousands)."""
    rows, starts, ends = _runs(mask)
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(mask.shape[0] + 2))
    for r in range(mask.shape[0] - 1):
        i, i_end, j, j_end = first[r], first[r + 1], first[r + 1], first[r + 2]
        while i < i_end and j < j_end:
            if starts[i] <= ends[j] and starts[j] <= ends[i]:  # overlap or diagonal touch
                parent[root(i)] = root(j)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    labels = np.array([root(i) for i in range(len(rows))], dtype=np.int64)
    return [(rows[labels == lab], starts[labels == lab], ends[labels == lab]) for lab in np.unique(labels)]


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq: list) -> list:
        out: list = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    xs, ys = np.array([p[0] for p in hull], float), np.array([p[1] for p in hull], float)
    return float(abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))) / 2)


def _radial_harmonics(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, cy: float) -> tuple[float, ...]:
    """Magnitudes of the 3rd, 4th and 5th angular harmonics of the outline's distance from the
    centroid, over the mean distance: a triangle rings at 3, a square or cross at 4, a star at 5.
    They survive blur that makes a star's extent and solidity look like a cross's."""
    lengths = ends - starts
    ys = np.repeat(rows, lengths) + 0.5
    xs = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) + 0.5
    cx = xs.mean()
    angle = np.arctan2(ys - cy, xs - cx)
    bins = ((angle + np.pi) / (2 * np.pi) * _ANGLE_BINS).astype(np.int64) % _ANGLE_BINS
    profile = np.zeros(_ANGLE_BINS)
    np.maximum.at(profile, bins, np.hypot(ys - cy, xs - cx) + 0.5)
    spectrum = np.abs(np.fft.rfft(profile)) / max(profile.sum(), 1e-9)
    return tuple(float(spectrum[k]) for k in (3, 4, 5))


def _measure(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> dict:
    lengths = (ends - starts).astype(np.float64)
    area = lengths.sum()
    x0, x1, y0, y1 = starts.min(), ends.max(), rows.min(), rows.max() + 1
    w, h = float(x1 - x0), float(y1 - y0)
    cy = float(((rows + 0.5) * lengths).sum() / area)
    # The hull of the pixel squares is that of the outer corners of each row's first and last run.
    urows, first = np.unique(rows, return_index=True)
    left, right = np.minimum.reduceat(starts, first), np.maximum.reduceat(ends, first)
    corners = np.concatenate([np.stack([left, urows], 1), np.stack([right, urows], 1),
                              np.stack([left, urows + 1], 1), np.stack([right, urows + 1], 1)])
    hull = _hull_area(corners)
    features = (area / (w * h), area / hull if hull > 0 else 1.0, w / h, (cy - (y0 + y1) / 2) / h,
                *_radial_harmonics(rows, starts, ends, cy))
    return {"area": area, "box": (x0, y0, w, h), "features": np.array(features, dtype=np.float32)}


def _segment(arr: np.ndarray, config: CheckerConfig) -> tuple[str | None, float, list[tuple[str, dict]]]:
    """(background, its share of the border, [(color, measurements) per component])."""
    h, w, _ = arr.shape
    pixels = arr.reshape(-1, 3)
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2: one small matrix product instead of an [H, W, 8, 3] array.
    sq = (pixels ** 2).sum(1, keepdims=True) - 2 * pixels @ _PALETTE.T + (_PALETTE ** 2).sum(1)
    nearest = sq.argmin(1)
    close = np.take_along_axis(sq, nearest[:, None], 1)[:, 0] <= config.tolerance ** 2
    labels = np.where(close, nearest, -1).reshape(h, w)
    b = config.border
    ring = np.concatenate([labels[:b].ravel(), labels[-b:].ravel(), labels[b:-b, :b].ravel(),
                           labels[b:-b, -b:].ravel()])
    known = ring[ring >= 0]
    if known.size == 0:
        return None, 0.0, []
    bg = int(np.bincount(known, minlength=len(_PALETTE)).argmax())
    share = float((ring == bg).mean())
    found = []
    for idx, name in enumerate(_PALETTE_NAMES):
        if idx == bg:
            continue
        mask = labels == idx
        if mask.sum() < config.min_area * h * w:
            continue
        # Opening by reconstruction: a component counts by its area that survives a 3x3 opening
        # (thin rims have none), but is measured whole (the opening would blunt star tips).
        opened = _shift_and(_shift_and(mask, True), False) & mask
        # Opened pixels of a run [s, e) of row r: cum[r, e] - cum[r, s].
        cum = np.pad(np.cumsum(opened, axis=1), ((0, 0), (1, 0)))
        for rows, starts, ends in _components(mask):
            thick = int((cum[rows, ends] - cum[rows, starts]).sum())
            if thick >= config.min_area * h * w:
                found.append((name, _measure(rows, starts, ends)))
    return _PALETTE_NAMES[bg], share, found


@lru_cache(maxsize=8)
def _prototypes(size: int) -> tuple[tuple[str, ...], np.ndarray]:
    """Features of each shape at both sizes, measured on renders at this image size."""
    names, feats = [], []
    config = CheckerConfig()
    for shape in SHAPES:
        for size_name, radius in SIZE_RADIUS.items():
            scene = SceneSpec("single", (SceneObject(shape, "red", size_name, (0.5, 0.5), radius),), "white")
            _, _, found = _segment(_as_array(render(scene, size)), config)
            names.append(shape)
            feats.append(found[0][1]["features"])
    return tuple(names), np.stack(feats)


def analyze(image: Image.Image | np.ndarray | torch.Tensor,
            config: CheckerConfig = CheckerConfig()) -> tuple[str | None, float, list[Blob]]:
    """The detected background, its share of the border ring, and the objects."""
    arr = _as_array(image)
    h, w, _ = arr.shape
    background, share, found = _segment(arr, config)
    names, protos = _prototypes(min(h, w))
    blobs = []
    for color, m in found:
        d = np.sqrt((((protos - m["features"]) / _FEATURE_SCALE) ** 2).sum(-1))
        k = int(d.argmin())
        shape = names[k] if d[k] <= config.max_shape_distance else "unknown"
        x0, y0, bw, bh = m["box"]
        radius = max(bw / w, bh / h) / 2 / _EXTENT_IN_RADII.get(shape, 1.0)
        size = "small" if radius < math.sqrt(SIZE_RADIUS["small"] * SIZE_RADIUS["large"]) else "large"
        blobs.append(Blob(color, shape, size, ((x0 + bw / 2) / w, (y0 + bh / 2) / h), radius,
                          m["area"] / (h * w), tuple(float(f) for f in m["features"]), float(d[k])))
    return background, share, blobs


def _relation_holds(relation: str, a: Blob, b: Blob) -> bool:
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    vertical = abs(dy) > abs(dx)
    return {"above": vertical and dy > 0, "below": vertical and dy < 0, "left of": not vertical and dx > 0,
            "right of": not vertical and dx < 0, "next to": not vertical}[relation]


def _describe(blob: Blob) -> str:
    return f"{blob.size} {blob.color} {blob.shape} at {blob.position}"


def _object_checks(prompt: Prompt, blobs: tuple[Blob, ...]) -> list[Check]:
    checks = []
    for i, (query, blob) in enumerate(zip(prompt.objects * len(blobs) if prompt.kind == "count" else prompt.objects,
                                          blobs)):
        tag = f"object {i + 1}"
        checks.append(Check(f"{tag} color", blob.color == query.color, f"want {query.color}, found {_describe(blob)}"))
        checks.append(Check(f"{tag} shape", blob.shape == query.shape, f"want {query.shape}, found {_describe(blob)}"))
        if query.size is not None:
            checks.append(Check(f"{tag} size", blob.size == query.size,
                                f"want {query.size}, found radius {blob.radius:.3f} ({blob.size})"))
        if query.position is not None:
            checks.append(Check(f"{tag} position", blob.position == query.position,
                                f"want {query.position}, found box center ({blob.center[0]:.2f}, "
                                f"{blob.center[1]:.2f}) = {blob.position}"))
    if prompt.kind == "relation":
        a, b = blobs
        checks.append(Check("relation", _relation_holds(prompt.relation, a, b),
                            f"want {prompt.relation}: {_describe(a)} vs {_describe(b)}"))
    return checks


def check_image(prompt: str | Prompt, image: Image.Image | np.ndarray | torch.Tensor,
                config: CheckerConfig = CheckerConfig()) -> CheckResult:
    """Whether `image` (PIL, HxWx3 array, or [3, H, W] tensor in [-1, 1]) shows `prompt`."""
    if isinstance(prompt, str):
        prompt = parse_prompt(prompt)
    background, share, blobs = analyze(image, config)
    checks = [Check("background found", background is not None and share >= config.min_background_share,
                    f"{background} covers {share:.0%} of the border")]
    if prompt.background is not None:
        checks.append(Check("background", background == prompt.background,
                            f"want {prompt.background}, found {background}"))
    expected = prompt.count if prompt.kind == "count" else len(prompt.objects)
    checks.append(Check("object count", len(blobs) == expected,
                        f"want {expected}, found {len(blobs)}: " + ", ".join(map(_describe, blobs))))
    if len(blobs) == expected:
        # The objects may appear in any order: keep the assignment with the fewest failures.
        best = min((_object_checks(prompt, order) for order in itertools.permutations(blobs)),
                   key=lambda cs: sum(not c.passed for c in cs))
        checks.extend(best)
    failed = [c for c in checks if not c.passed]
    reason = "ok" if not failed else f"{failed[0].name}: {failed[0].detail}"
    return CheckResult(not failed, reason, tuple(checks), background, tuple(blobs))


def pass_rates(prompts: Sequence[str],
               images: Sequence[Image.Image | np.ndarray | torch.Tensor]) -> dict[str, float]:
    """The fraction of images check_image accepts, per prompt kind (sorted) and over all ("all")."""
    if len(prompts) != len(images) or not prompts:
        raise ValueError(f"need as many images as prompts (at least one), got {len(images)} and {len(prompts)}")
    by_kind: dict[str, list[bool]] = {}
    for prompt, image in zip(prompts, images):
        by_kind.setdefault(parse_prompt(prompt).kind, []).append(check_image(prompt, image).passed)
    rates = {kind: sum(v) / len(v) for kind, v in sorted(by_kind.items())}
    rates["all"] = sum(sum(v) for v in by_kind.values()) / len(prompts)
    return rates


# ----------------------------------------------------------------------------- evaluation helpers


def degrade(image: Image.Image, rng: random.Random) -> Image.Image:
    """A mildly degraded copy, as a generator's output might be: Gaussian blur (radius 0.3-1.0),
    Gaussian noise (sigma 2-8 of 255) and JPEG at quality 50-90, each with probability 1/2."""
    out = image
    if rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    if rng.random() < 0.5:
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(2, 8), (*out.size[::-1], 3))
        out = Image.fromarray(np.clip(np.asarray(out, np.float32) + noise, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=rng.randint(50, 90))
        out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return out


def mismatched_prompt(scene: SceneSpec, rng: random.Random) -> tuple[str, Prompt]:
    """A prompt that `scene` does NOT show, differing from its own prompt in one attribute:
    (the attribute changed, the prompt). Used to measure the checker's false-accept rate."""
    p = scene.prompt()
    used = {o.color for o in scene.objects} | {scene.background}
    i = rng.randrange(len(p.objects))
    obj, real = p.objects[i], scene.objects[i]
    options = ["color", "shape", "size", "background", "count"]
    if p.kind == "single":
        options.append("position")
    if p.kind == "relation":
        options.append("relation")
    what = rng.choice(options)

    def with_object(new: ObjectQuery) -> Prompt:
        return replace(p, objects=p.objects[:i] + (new,) + p.objects[i + 1:])

    if what == "color":
        return what, with_object(replace(obj, color=rng.choice([c for c in COLORS if c not in used])))
    if what == "shape":
        return what, with_object(replace(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape])))
    if what == "size":
        return what, with_object(replace(obj, size="large" if real.size == "small" else "small"))
    if what == "position":
        return what, with_object(replace(obj, position=rng.choice([q for q in POSITIONS if q != real.position])))
    if what == "background":
        return what, replace(p, background=rng.choice([c for c in COLORS if c not in used]))
    if what == "relation":
        false = {"above": ("below", "left of", "right of", "next to"),
                 "below": ("above", "left of", "right of", "next to"),
                 "left of": ("right of", "above", "below"), "right of": ("left of", "above", "below"),
                 "next to": ("above", "below")}[p.relation]
        return what, replace(p, relation=rng.choice(false))
    if p.kind == "count":
        return what, replace(p, count=rng.choice([n for n in NUMBERS.values() if n != p.count]))
    return what, Prompt("count", (replace(p.objects[0], position=None),), p.background, None, 2)
