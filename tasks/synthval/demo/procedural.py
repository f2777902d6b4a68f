"""Procedural "synthetic groceries" scenes drawn with numpy and PIL: NOT real data.

Public datasets cannot be downloaded where synthval is developed and tested, so the demo and the
tests use pictures drawn here: flat-coloured boxes, cans, bottles, jars, cartons and bars on
procedural backgrounds. They stand in for Unity's SynthDet renders ("synthetic" domain) and for the
UnityGroceries-RealWorld photographs ("real-proxy" domain), but nothing in them is a photograph and
no number measured on them says anything about real data.

The two domains share the ten object classes and differ the way renders and photographs differ:

- synthetic: flat, noise or random-primitive backgrounds, one directional light of random colour
  (near white) and direction, crisp edges, lossless PNG, objects fully inside the frame, small rotations.
- real-proxy: shelf, wood, countertop or cluttered backgrounds, colour cast, light gradients and
  vignetting, gamma, drop shadows, specular highlights, shear and squash (a tilted camera), objects cut
  by the frame edge, foreground occluders, defocus blur, sensor noise and JPEG artefacts.

Every class differs from the others in colour *and* silhouette (aspect ratio, neck, lid, gable top),
so the classes stay separable under a colour cast and a small detector learns them in minutes.

Everything is a pure function of a `numpy.random.Generator`, so one seed gives the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SYNTHETIC = "synthetic"
REAL_PROXY = "real-proxy"
DOMAINS = (SYNTHETIC, REAL_PROXY)

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class ObjectClass:
    """One grocery-like class: a silhouette (`shape`), its height / width, and three colours."""

    name: str
    shape: str
    aspect: float
    body: RGB
    accent: RGB
    detail: RGB


CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("cereal_box_red", "cereal", 1.45, (200, 32, 36), (250, 206, 40), (255, 255, 255)),
    ObjectClass("cracker_box_yellow", "cracker", 0.62, (238, 198, 42), (40, 62, 160), (196, 40, 40)),
    ObjectClass("tea_box_green", "tea", 1.0, (30, 138, 62), (246, 240, 222), (140, 40, 30)),
    ObjectClass("soda_can_blue", "can", 1.75, (28, 70, 200), (236, 236, 246), (172, 174, 184)),
    ObjectClass("tuna_tin_silver", "tin", 0.5, (176, 180, 188), (240, 118, 30), (120, 122, 130)),
    ObjectClass("water_bottle_cyan", "bottle", 2.7, (140, 212, 236), (255, 255, 255), (20, 60, 190)),
    ObjectClass("sauce_bottle_orange", "sauce", 2.0, (236, 108, 20), (250, 240, 200), (28, 28, 28)),
    ObjectClass("jam_jar_purple", "jar", 1.15, (112, 30, 122), (236, 220, 178), (204, 162, 52)),
    ObjectClass("milk_carton_white", "carton", 1.9, (240, 240, 234), (40, 110, 212), (200, 200, 196)),
    ObjectClass("chocolate_bar_brown", "bar", 0.33, (102, 56, 26), (206, 206, 216), (232, 190, 60)),
)
LABEL_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)


@dataclass(frozen=True)
class Placement:
    """One object as it was placed, what a Unity randomizer and RenderedObjectInfo would report of it.

    `rotation_deg` is its in-plane rotation, `center` its centre in image pixels (x right, y down),
    `scale` its long side over the image side, `layer` its drawing order (0: furthest back), and
    `visible_pixels` how many of its pixels are left in the final image (after occlusion and the frame).
    """

    instance_id: int
    class_index: int
    rotation_deg: float
    center: tuple[float, float]
    scale: float
    layer: int
    visible_pixels: int


@dataclass(frozen=True)
class Light:
    """The synthetic domain's directional light: an intensity, an RGB colour in [0, 1], and a rotation in
    degrees about the image's x axis (tilted down: brighter at the top) and y axis (turned: brighter on one side)."""

    intensity: float
    color: tuple[float, float, float]
    x_rotation: float
    y_rotation: float


@dataclass
class Scene:
    """One drawn image: `image` uint8 (H, W, 3); `boxes` int (N, 4) xyxy of visible pixels, end-exclusive;
    `classes` (N,) indices into CLASSES; `instance_ids` (N,) name each box's object among `placements`
    (every object placed, boxed or not); `light` is the synthetic domain's light (None for real-proxy);
    `jpeg_quality` is set for the real-proxy domain only."""

    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    jpeg_quality: int | None = None
    instance_ids: list[int] = field(default_factory=list)
    placements: list[Placement] = field(default_factory=list)
    light: Light | None = None


@dataclass(frozen=True)
class _Style:
    """How a domain draws: every knob that differs between the renders and the photographs."""

    scale: tuple[float, float]  # object's long side as a fraction of the image side
    rotation_deg: float
    shear: float
    squash: tuple[float, float]
    colour_jitter: float
    max_overlap: float  # largest share of either box that another box may cover
    truncation: float  # share of an object that may lie outside the frame
    real: bool


_STYLES = {
    SYNTHETIC: _Style(scale=(0.26, 0.52), rotation_deg=7.0, shear=0.0, squash=(0.96, 1.04),
                      colour_jitter=8.0, max_overlap=0.2, truncation=0.0, real=False),
    REAL_PROXY: _Style(scale=(0.24, 0.46), rotation_deg=12.0, shear=0.16, squash=(0.82, 1.08),
                       colour_jitter=18.0, max_overlap=0.32, truncation=0.22, real=True),
}


# ----------------------------------------------------------------------------------------------
# Objects
# ----------------------------------------------------------------------------------------------

def _jitter(colours: tuple[RGB, ...], rng: np.random.Generator, amount: float) -> list[RGB]:
    c = np.asarray(colours, dtype=np.float32) + rng.uniform(-amount, amount, (len(colours), 3))
    return [tuple(v) for v in np.clip(c, 0, 255).astype(np.uint8).tolist()]  # type: ignore[misc]


def _scale(colour: RGB, factor: float) -> RGB:
    return tuple(int(min(255, max(0, v * factor))) for v in colour)  # type: ignore[return-value]


def _text_bars(d: ImageDraw.ImageDraw, rng: np.random.Generator, box: tuple[float, float, float, float],
               colour: RGB, lines: int) -> None:
    """Short bars of 'print': reads as text at a glance, costs a few rectangles."""
    x0, y0, x1, y1 = box
    step = (y1 - y0) / max(lines, 1)
    for i in range(lines):
        ya = y0 + i * step + step * 0.2
        yb = ya + max(1.0, step * 0.5)
        length = (x1 - x0) * rng.uniform(0.55, 1.0)
        d.rectangle([x0, ya, x0 + length, yb], fill=colour + (255,))


def _draw_object(cls: ObjectClass, w: int, h: int, rng: np.random.Generator, style: _Style) -> Image.Image:
    """Return an RGBA sprite of `cls`, `w` x `h` pixels, alpha 255 on the object."""
    body, accent, detail = _jitter((cls.body, cls.accent, cls.detail), rng, style.colour_jitter)
    # transparent pixels carry the body colour, so resampling at the edge does not blend in black
    im = Image.new("RGBA", (w, h), body + (0,))
    d = ImageDraw.Draw(im)
    W, H = w - 1, h - 1
    s = cls.shape
    if s == "cereal":
        d.rectangle([0, 0, W, H], fill=body + (255,))
        d.rectangle([0, H * 0.58, W, H * 0.76], fill=accent + (255,))
        _text_bars(d, rng, (W * 0.12, H * 0.1, W * 0.88, H * 0.42), detail, 3)
        d.ellipse([W * 0.3, H * 0.8, W * 0.7, H * 0.96], fill=detail + (255,))
    elif s == "cracker":
        d.rectangle([0, 0, W, H], fill=body + (255,))
        d.polygon([(0, H * 0.62), (W * 0.62, 0), (W * 0.9, 0), (0, H * 0.98)], fill=accent + (255,))
        d.ellipse([W * 0.58, H * 0.35, W * 0.92, H * 0.85], fill=detail + (255,))
        _text_bars(d, rng, (W * 0.63, H * 0.48, W * 0.86, H * 0.72), body, 2)
    elif s == "tea":
        d.rectangle([0, 0, W, H], fill=body + (255,))
        d.rectangle([0, 0, W, H * 0.12], fill=_scale(body, 0.7) + (255,))
        d.ellipse([W * 0.22, H * 0.2, W * 0.78, H * 0.76], fill=accent + (255,))
        d.ellipse([W * 0.38, H * 0.36, W * 0.62, H * 0.6], fill=detail + (255,))
        _text_bars(d, rng, (W * 0.15, H * 0.8, W * 0.85, H * 0.96), accent, 2)
    elif s == "can":
        r = max(1, int(min(w, h) * 0.14))
        d.rounded_rectangle([0, 0, W, H], radius=r, fill=body + (255,))
        d.rounded_rectangle([0, 0, W, H * 0.08], radius=r, fill=detail + (255,))
        d.rectangle([0, H * 0.93, W, H], fill=detail + (255,))
        xs = np.linspace(0, W, 9)
        top = [(x, H * (0.42 + 0.06 * math.sin(i * 1.3))) for i, x in enumerate(xs)]
        bottom = [(x, H * (0.6 + 0.06 * math.sin(i * 1.3 + 1))) for i, x in reversed(list(enumerate(xs)))]
        d.polygon(top + bottom, fill=accent + (255,))
    elif s == "tin":
        d.rounded_rectangle([0, H * 0.12, W, H], radius=max(1, int(h * 0.2)), fill=body + (255,))
        d.ellipse([0, 0, W, H * 0.42], fill=_scale(body, 1.15) + (255,))
        d.ellipse([W * 0.08, H * 0.05, W * 0.92, H * 0.37], outline=detail + (255,), width=max(1, h // 16))
        d.rectangle([0, H * 0.5, W, H * 0.86], fill=accent + (255,))
    elif s == "bottle":
        d.rectangle([W * 0.33, 0, W * 0.67, H * 0.09], fill=detail + (255,))
        d.rectangle([W * 0.37, H * 0.09, W * 0.63, H * 0.24], fill=body + (255,))
        d.polygon([(W * 0.37, H * 0.24), (W * 0.63, H * 0.24), (W, H * 0.38), (0, H * 0.38)], fill=body + (255,))
        d.rounded_rectangle([0, H * 0.37, W, H], radius=max(1, int(w * 0.16)), fill=body + (255,))
        d.rectangle([0, H * 0.55, W, H * 0.74], fill=accent + (255,))
        d.rectangle([0, H * 0.62, W, H * 0.66], fill=detail + (255,))
    elif s == "sauce":
        d.rectangle([W * 0.3, 0, W * 0.7, H * 0.13], fill=detail + (255,))
        d.rectangle([W * 0.33, H * 0.13, W * 0.67, H * 0.22], fill=body + (255,))
        d.polygon([(W * 0.33, H * 0.22), (W * 0.67, H * 0.22), (W, H * 0.4), (0, H * 0.4)], fill=body + (255,))
        d.rounded_rectangle([0, H * 0.36, W, H], radius=max(1, int(w * 0.3)), fill=body + (255,))
        d.ellipse([W * 0.14, H * 0.5, W * 0.86, H * 0.82], fill=accent + (255,))
    elif s == "jar":
        d.rounded_rectangle([W * 0.03, H * 0.16, W * 0.97, H], radius=max(1, int(w * 0.16)), fill=body + (255,))
        d.rectangle([0, 0, W, H * 0.2], fill=detail + (255,))
        ridge = _scale(detail, 0.7) + (255,)
        for i in range(1, 6):
            d.line([(W * i / 6, 0), (W * i / 6, H * 0.2)], fill=ridge, width=1)
        d.rectangle([W * 0.12, H * 0.4, W * 0.88, H * 0.8], fill=accent + (255,))
        d.ellipse([W * 0.36, H * 0.48, W * 0.64, H * 0.72], fill=body + (255,))
    elif s == "carton":
        d.rectangle([W * 0.1, 0, W * 0.9, H * 0.07], fill=body + (255,))
        d.polygon([(0, H * 0.22), (W * 0.5, H * 0.06), (W, H * 0.22)], fill=_scale(body, 0.9) + (255,))
        d.rectangle([0, H * 0.22, W, H], fill=body + (255,))
        d.rectangle([0, H * 0.56, W, H * 0.8], fill=accent + (255,))
        d.ellipse([W * 0.35, H * 0.3, W * 0.65, H * 0.46], fill=accent + (255,))
        d.rectangle([W * 0.62, H * 0.22, W, H], fill=_scale(body, 0.78) + (255,))
        d.rectangle([W * 0.62, H * 0.56, W, H * 0.8], fill=_scale(accent, 0.78) + (255,))
    elif s == "bar":
        d.rectangle([0, 0, W, H], fill=body + (255,))
        for x0, x1 in ((0, W * 0.12), (W * 0.88, W)):
            d.rectangle([x0, 0, x1, H], fill=accent + (255,))
        d.rectangle([W * 0.26, H * 0.3, W * 0.74, H * 0.7], fill=detail + (255,))
        _text_bars(d, rng, (W * 0.32, H * 0.38, W * 0.68, H * 0.64), body, 2)
    else:  # pragma: no cover - CLASSES is fixed
        raise ValueError(f"unknown shape {s!r}")
    return _shade(im, cylinder=s in ("can", "tin", "bottle", "sauce", "jar"), rng=rng, style=style)


def _shade(im: Image.Image, cylinder: bool, rng: np.random.Generator, style: _Style) -> Image.Image:
    """Light the flat drawing: a round profile for cylinders, a slight fall-off for boxes."""
    a = np.asarray(im, dtype=np.float32)  # a new, writable array
    w = a.shape[1]
    t = (np.arange(w, dtype=np.float32) + 0.5) / w
    if cylinder:
        shade = 0.58 + 0.47 * np.sqrt(np.sin(np.pi * t))
        if style.real:  # a specular streak, the way a lamp shows on a real can
            c = rng.uniform(0.22, 0.4)
            shade = shade + 0.55 * np.exp(-(((t - c) / 0.05) ** 2))
    else:
        shade = 1.04 - 0.14 * t
        if style.real:
            shade = shade * rng.uniform(0.88, 1.08)
    a[..., :3] *= shade[None, :, None]
    np.clip(a, 0, 255, out=a)
    return Image.fromarray(a.astype(np.uint8), "RGBA")


Matrix = tuple[float, float, float, float]  # a 2x2 map (a, b, c, d): x' = a x + b y, y' = c x + d y


def _warp_matrix(rng: np.random.Generator, style: _Style) -> tuple[Matrix, float]:
    """A random 2x2 map: rotation after shear and squash (a tilted camera, roughly); and its rotation in degrees."""
    degrees = rng.uniform(-style.rotation_deg, style.rotation_deg)
    angle = math.radians(degrees)
    shear = rng.uniform(-style.shear, style.shear) if style.shear else 0.0
    squash = rng.uniform(*style.squash)
    c, s = math.cos(angle), math.sin(angle)
    return (c, c * shear - s * squash, s, s * shear + c * squash), float(degrees)


def _warped_size(m: Matrix, w: int, h: int) -> tuple[int, int]:
    a, b, c, d = m
    out_w = max(1, math.ceil(abs(a) * w + abs(b) * h))  # extent of the map of a centred w x h box
    out_h = max(1, math.ceil(abs(c) * w + abs(d) * h))
    return out_w, out_h


def _warp(im: Image.Image, m: Matrix) -> Image.Image:
    """Apply the 2x2 map `m` about the sprite's centre, on a canvas grown to fit (`_warped_size`)."""
    w, h = im.size
    out_w, out_h = _warped_size(m, w, h)
    a, b, c, d = m
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    # PIL maps each output pixel (x, y) to the input pixel inv @ ((x, y) - out_centre) + in_centre
    ox, oy = out_w / 2, out_h / 2
    data = (ia, ib, w / 2 - ia * ox - ib * oy, ic, id_, h / 2 - ic * ox - id_ * oy)
    return im.transform((out_w, out_h), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR)


# ----------------------------------------------------------------------------------------------
# Backgrounds
# ----------------------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 3) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a few random cells upsampled bilinearly."""
    small = rng.random((cells, cells, channels), dtype=np.float32)
    out = [np.asarray(Image.fromarray(small[..., i], "F").resize((size, size), Image.Resampling.BILINEAR))
           for i in range(channels)]
    return np.stack(out, axis=-1)


def _random_colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> RGB:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))  # type: ignore[return-value]


def _primitives(img: Image.Image, rng: np.random.Generator, count: int, size: int, muted: bool) -> None:
    """Random rectangles, ellipses and triangles: render-style background clutter."""
    d = ImageDraw.Draw(img)
    for _ in range(count):
        cx, cy = rng.uniform(0, size, 2)
        rw, rh = rng.uniform(0.04, 0.3, 2) * size
        colour = _random_colour(rng, 60, 200) if muted else _random_colour(rng)
        kind = rng.integers(0, 3)
        box = [cx - rw / 2, cy - rh / 2, cx + rw / 2, cy + rh / 2]
        if kind == 0:
            d.rectangle(box, fill=colour)
        elif kind == 1:
            d.ellipse(box, fill=colour)
        else:
            pts = rng.uniform(-0.5, 0.5, (3, 2)) * np.array([rw, rh]) * 2 + np.array([cx, cy])
            d.polygon([tuple(p) for p in pts], fill=colour)


def _synthetic_background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(0, 3)
    if kind == 0:  # flat colour
        return np.broadcast_to(np.asarray(_random_colour(rng), np.float32), (size, size, 3)).copy()
    if kind == 1:  # coloured noise
        base = _smooth_noise(rng, size, int(rng.integers(3, 9))) * 255.0
        return base * rng.uniform(0.5, 1.0) + rng.uniform(0, 80)
    img = Image.new("RGB", (size, size), _random_colour(rng))  # random primitives
    _primitives(img, rng, int(rng.integers(6, 18)), size, muted=False)
    return np.asarray(img, dtype=np.float32)


def _real_background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(0, 4)
    y = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    if kind == 0:  # a shelf: wall with boards
        wall = np.asarray(_random_colour(rng, 120, 230), np.float32)
        img = np.broadcast_to(wall, (size, size, 3)) * (0.85 + 0.25 * y)
        img = img * (0.9 + 0.2 * _smooth_noise(rng, size, 4, 1))
        board = np.asarray(rng.choice([[150, 110, 70], [170, 170, 168], [95, 70, 50], [225, 225, 220]]), np.float32)
        board = board + rng.uniform(-15, 15, 3)
        n_boards = int(rng.integers(1, 4))
        for yb in np.sort(rng.uniform(0.15, 0.95, n_boards)):
            y0, th = int(yb * size), max(2, int(size * rng.uniform(0.04, 0.08)))
            img[y0:y0 + th] = board
            img[y0:y0 + max(1, th // 4)] = np.minimum(board * 1.25, 255)
            img[y0 + th:y0 + th + max(1, th // 2)] *= 0.6  # the board's shadow on the wall below
    elif kind == 1:  # wood grain
        x = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :, None]
        warp = _smooth_noise(rng, size, 5, 1)
        freq = rng.uniform(10, 26)
        if rng.random() < 0.5:
            grain = np.sin(2 * np.pi * (freq * y + 2.5 * warp + 0.3 * x))
        else:
            grain = np.sin(2 * np.pi * (freq * x + 2.5 * warp + 0.3 * y))
        light = np.asarray([196, 150, 100], np.float32) + rng.uniform(-25, 25, 3)
        dark = light * rng.uniform(0.5, 0.7)
        t = 0.5 + 0.5 * grain
        img = dark + (light - dark) * t ** 1.5
    elif kind == 2:  # countertop and wall, strong light
        top = np.asarray(_random_colour(rng, 200, 250), np.float32)
        wall = np.asarray(_random_colour(rng, 150, 240), np.float32)
        split = rng.uniform(0.15, 0.5)
        img = np.where(y < split, wall, top) * np.ones((1, size, 1), np.float32)
        img = img * (0.9 + 0.15 * _smooth_noise(rng, size, 3, 1))
    else:  # cluttered: fabric or carpet with non-grocery things lying about
        base = np.asarray(_random_colour(rng, 40, 200), np.float32)
        img = base * (0.7 + 0.5 * _smooth_noise(rng, size, int(rng.integers(6, 14))))
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        _primitives(pil, rng, int(rng.integers(8, 22)), size, muted=True)
        img = np.asarray(pil, dtype=np.float32)
    return np.array(np.broadcast_to(img, (size, size, 3)), dtype=np.float32)  # writable copy


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------

def _overlap_ok(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]], limit: float) -> bool:
    x0, y0, x1, y1 = box
    area = (x1 - x0) * (y1 - y0)
    for a0, b0, a1, b1 in placed:
        iw, ih = min(x1, a1) - max(x0, a0), min(y1, b1) - max(y0, b0)
        if iw > 0 and ih > 0:
            inter = iw * ih
            if inter > limit * area or inter > limit * (a1 - a0) * (b1 - b0):
                return False
    return True


def _composite(img: np.ndarray, inst: np.ndarray, sprite: np.ndarray, x0: int, y0: int, instance: int) -> None:
    """Alpha-blend `sprite` (h, w, 4) at (x0, y0), clipped to the image; mark its solid pixels in `inst`."""
    size = img.shape[0]
    h, w = sprite.shape[:2]
    ax0, ay0 = max(0, x0), max(0, y0)
    ax1, ay1 = min(size, x0 + w), min(size, y0 + h)
    if ax1 <= ax0 or ay1 <= ay0:
        return
    part = sprite[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0]
    alpha = part[..., 3:4] * (1.0 / 255.0)
    region = img[ay0:ay1, ax0:ax1]
    region += (part[..., :3] - region) * alpha
    solid = alpha[..., 0] > 0.5
    inst[ay0:ay1, ax0:ax1][solid] = instance


def _drop_shadow(img: np.ndarray, sprite_alpha: Image.Image, x0: int, y0: int, offset: tuple[int, int],
                 strength: float) -> None:
    """Darken the image under the object's silhouette, shifted and softened: a lamp's shadow."""
    blur = max(1.0, sprite_alpha.size[0] * 0.06)
    shadow = np.asarray(sprite_alpha.filter(ImageFilter.BoxBlur(blur)), dtype=np.float32)
    shadow *= strength / 255.0
    sx, sy = x0 + offset[0], y0 + offset[1]
    size = img.shape[0]
    ax0, ay0 = max(0, sx), max(0, sy)
    ax1, ay1 = min(size, sx + shadow.shape[1]), min(size, sy + shadow.shape[0])
    if ax1 > ax0 and ay1 > ay0:
        img[ay0:ay1, ax0:ax1] *= 1.0 - shadow[ay0 - sy:ay1 - sy, ax0 - sx:ax1 - sx, None]


def _occluder(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A foreground thing that is not a grocery: a price strip, a hand-like blob, a cable."""
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    kind = rng.integers(0, 3)
    if kind == 0:
        y = rng.uniform(0.2, 0.9) * size
        d.rectangle([0, y, size, y + rng.uniform(0.04, 0.08) * size], fill=255)
        colour = _random_colour(rng, 150, 256)
    elif kind == 1:
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.1, 0.18) * size
        d.ellipse([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], fill=255)
        colour = tuple(int(v) for v in np.asarray([224, 172, 140]) * rng.uniform(0.6, 1.1))
    else:
        pts = [tuple(p) for p in rng.uniform(0, size, (3, 2))]
        d.line(pts, fill=255, width=max(2, int(size * 0.03)))
        colour = _random_colour(rng, 0, 80)
    m = np.asarray(mask.filter(ImageFilter.BoxBlur(0.7)), dtype=np.float32) / 255.0
    return m, np.asarray(colour, np.float32)


# The synthetic light, as SynthDet's lighting randomizer draws it: each colour channel in [min, 1],
# rotations within +-max degrees. The brightness across the image changes by LIGHT_FALLOFF * sin(rotation).
LIGHT_COLOR_MIN = 0.8
LIGHT_ROTATION_MAX = 40.0
LIGHT_FALLOFF = 0.35


def _synthetic_light(rng: np.random.Generator) -> Light:
    intensity = rng.uniform(0.92, 1.08)
    r, g, b = (round(float(v), 4) for v in rng.uniform(LIGHT_COLOR_MIN, 1.0, 3))
    x_rotation, y_rotation = (round(float(v), 3) for v in rng.uniform(-LIGHT_ROTATION_MAX, LIGHT_ROTATION_MAX, 2))
    return Light(round(float(intensity), 4), (r, g, b), x_rotation, y_rotation)


def _apply_light(img: np.ndarray, light: Light) -> np.ndarray:
    """Tint by the light's colour and intensity, brighter towards where it comes from (a linear falloff)."""
    t = np.linspace(-0.5, 0.5, img.shape[0], dtype=np.float32)
    along = (LIGHT_FALLOFF * math.sin(math.radians(light.y_rotation)) * t[None, :]
             - LIGHT_FALLOFF * math.sin(math.radians(light.x_rotation)) * t[:, None])
    gain = light.intensity * (1.0 + along)
    return img * gain[..., None] * np.asarray(light.color, np.float32)


def _photo_effects(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lighting, optics and sensor: what separates a photograph from a clean render."""
    size = img.shape[0]
    temp = rng.uniform(-1.0, 1.0)  # warm lamp <-> cold daylight
    gains = np.array([1 + 0.16 * temp, 1.0, 1 - 0.2 * temp], np.float32) * rng.uniform(0.9, 1.1, 3)
    gains *= rng.uniform(0.7, 1.15)
    # a light gradient in a random direction times a vignette: separable, so built from two vectors
    theta = rng.uniform(0, 2 * np.pi)
    strength, falloff = rng.uniform(0.15, 0.45), rng.uniform(0.2, 0.9)
    t = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    light = (1.0 + strength * (t[:, None] * math.sin(theta) + t[None, :] * math.cos(theta))
             - falloff * (t[:, None] ** 2 + t[None, :] ** 2))
    img *= light[..., None]
    np.clip(img, 0, 255, out=img)
    # colour cast, exposure and gamma in one 8-bit table per channel (PIL applies it in C)
    gamma = rng.uniform(0.75, 1.35)
    levels = np.arange(256, dtype=np.float64)[None, :] * gains[:, None].astype(np.float64)
    lut = np.clip(255.0 * (np.minimum(levels, 255.0) / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)
    pil = Image.fromarray(img.astype(np.uint8)).point(lut.ravel().tolist())
    pil = pil.filter(ImageFilter.BoxBlur(rng.uniform(0.3, 1.0) * size / 256))
    out = np.asarray(pil, dtype=np.float32)
    out += _sensor_noise(rng, size) * np.float32(rng.uniform(2.0, 8.0))
    return out


_NOISE_BANK: np.ndarray | None = None


def _sensor_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Unit Gaussian noise (size, size, 3): a random window of a fixed bank, ~50x cheaper than drawing it.

    The bank comes from its own fixed seed, so the pixels still depend only on the scene's generator.
    """
    global _NOISE_BANK
    side = max(512, 2 * size)
    if _NOISE_BANK is None or _NOISE_BANK.shape[0] < side:
        _NOISE_BANK = np.random.default_rng(20240601).standard_normal((side, side, 3), dtype=np.float32)
    oy, ox = rng.integers(0, _NOISE_BANK.shape[0] - size + 1, 2)
    return _NOISE_BANK[oy:oy + size, ox:ox + size]


def render_scene(rng: np.random.Generator, size: int, domain: str) -> Scene:
    """Draw one `size` x `size` scene of 2-6 objects in `domain` ("synthetic" or "real-proxy").

    Boxes are the extent of each object's visible pixels (as Unity's 2D box labeler reports them), so
    an occluded or cut-off object gets the box of what is left of it.
    """
    style = _STYLES[domain]
    if style.real:
        # drawn at half size and upscaled: a background out of focus, as behind objects in a photo
        half = _real_background(rng, (size + 1) // 2)
        small = Image.fromarray(np.clip(half, 0, 255).astype(np.uint8))
        img = np.asarray(small.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    else:
        img = _synthetic_background(rng, size)
    inst = np.zeros((size, size), np.uint8)
    n_objects = int(rng.integers(2, 7))
    shadow_offset = tuple(int(v) for v in rng.uniform(-0.035, 0.035, 2) * size)
    placed: list[tuple[int, int, int, int]] = []
    classes: list[int] = []
    areas: list[int] = []
    poses: list[tuple[float, float]] = []  # (rotation in degrees, long side / image side)
    crowd = 1.0 if n_objects <= 3 else 0.85
    for _ in range(n_objects):
        k = int(rng.integers(0, len(CLASSES)))
        cls = CLASSES[k]
        for _attempt in range(12):
            long_side = size * rng.uniform(*style.scale) * crowd
            aspect = cls.aspect * rng.uniform(0.92, 1.08)
            w, h = (long_side / aspect, long_side) if aspect >= 1 else (long_side, long_side * aspect)
            w, h = max(6, int(w)), max(6, int(h))
            m, degrees = _warp_matrix(rng, style)
            sw, sh = _warped_size(m, w, h)
            tx, ty = int(sw * style.truncation), int(sh * style.truncation)
            if sw - 2 * tx > size or sh - 2 * ty > size:
                continue
            x0 = int(rng.integers(-tx, size - sw + tx + 1))
            y0 = int(rng.integers(-ty, size - sh + ty + 1))
            box = (x0, y0, x0 + sw, y0 + sh)
            if _overlap_ok(box, placed, style.max_overlap):
                break
        else:
            continue
        sprite_im = _warp(_draw_object(cls, w, h, rng, style), m)
        if style.real:
            _drop_shadow(img, sprite_im.getchannel("A"), x0, y0, shadow_offset, rng.uniform(0.3, 0.6))
        sprite = np.asarray(sprite_im, dtype=np.float32)
        full = int((sprite[..., 3] > 127).sum())
        _composite(img, inst, sprite, x0, y0, len(placed) + 1)
        placed.append(box)
        classes.append(k)
        areas.append(full)
        poses.append((degrees, long_side / size))
    if style.real and rng.random() < 0.35:
        mask, colour = _occluder(rng, size)
        solid = mask > 0.5
        before = np.bincount(inst.ravel(), minlength=len(placed) + 1)
        after = np.bincount(inst[~solid], minlength=len(placed) + 1)
        # keep an occluder that hides at most 60% of any object; otherwise it would swallow a label
        if np.all(after[1:] >= 0.4 * before[1:]):
            img += (colour - img) * mask[..., None]
            inst[solid] = 0
    light = None
    if style.real:
        img = _photo_effects(img, rng)
    else:
        light = _synthetic_light(rng)
        img = _apply_light(img, light)
    image = np.clip(img, 0, 255).astype(np.uint8)
    visible_pixels = np.bincount(inst.ravel(), minlength=len(placed) + 1)
    placements = [Placement(instance_id=i + 1, class_index=k, rotation_deg=round(poses[i][0], 3),
                            center=((placed[i][0] + placed[i][2]) / 2, (placed[i][1] + placed[i][3]) / 2),
                            scale=round(poses[i][1], 4), layer=i, visible_pixels=int(visible_pixels[i + 1]))
                  for i, k in enumerate(classes)]

    boxes, kept, ids = [], [], []
    for i, k in enumerate(classes):
        x0, y0, x1, y1 = placed[i]
        cx0, cy0 = max(0, x0), max(0, y0)
        sub = inst[cy0:max(cy0, y1), cx0:max(cx0, x1)] == i + 1
        visible = int(sub.sum())
        if visible < max(16, 0.3 * areas[i]):
            continue  # hidden or cut off too much: an annotator would not box it either
        rows, cols = np.flatnonzero(sub.any(1)), np.flatnonzero(sub.any(0))
        bx0, by0 = cx0 + int(cols[0]), cy0 + int(rows[0])
        bx1, by1 = cx0 + int(cols[-1]) + 1, cy0 + int(rows[-1]) + 1
        if bx1 - bx0 < 3 or by1 - by0 < 3:
            continue
        boxes.append((bx0, by0, bx1, by1))
        kept.append(k)
        ids.append(i + 1)
    quality = int(rng.integers(30, 72)) if style.real else None
    return Scene(image=image, boxes=np.asarray(boxes, np.int64).reshape(-1, 4),
                 classes=np.asarray(kept, np.int64), jpeg_quality=quality, instance_ids=ids,
                 placements=placements, light=light)
