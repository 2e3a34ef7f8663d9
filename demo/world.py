"""A procedural 32 x 32 text-to-image world where content and style are exactly measurable.

A scene is a saturated shape (circle, square, triangle) of one of four colours at one of four positions on a light
gray background, with a small seeded jitter of position and size; its caption reads "a red circle on the left".
A style is a function applied to the background of any scene and a deterministic detector that scores an image; each
style lives in one `Style` entry of `STYLES`, so a new one is one entry. Content is read back by `classify_content`
(dominant saturated colour, centroid position), which needs no training.
"""

import dataclasses
import itertools

import numpy as np


SIZE = 32
BACKGROUND = np.array([190, 190, 190], dtype=np.float32)
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (225, 205, 30)}
POSITIONS = {"left": (16, 9), "right": (16, 23), "top": (9, 16), "bottom": (23, 16)}  # (row, column) centres
POSITION_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
# Held-out combinations: every colour, shape and position still appears in training, never these together.
HELD_OUT = (
    ("red", "square", "right"),
    ("green", "circle", "top"),
    ("blue", "triangle", "left"),
    ("yellow", "circle", "bottom"),
    ("red", "triangle", "top"),
    ("green", "square", "bottom"),
    ("blue", "circle", "right"),
    ("yellow", "square", "left"),
)
MIN_SHAPE_PIXELS = 12
SATURATION_THRESHOLD = 70


@dataclasses.dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str

    @property
    def caption(self):
        return f"a {self.colour} {self.shape} {POSITION_WORDS[self.position]}"


def all_scenes():
    return [Scene(c, s, p) for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS)]


def split_scenes():
    """(training scenes, held-out scenes): 40 and 8."""
    held = {Scene(*combo) for combo in HELD_OUT}
    return [s for s in all_scenes() if s not in held], [s for s in all_scenes() if s in held]


def shape_mask(scene, rng):
    """Boolean (SIZE, SIZE) mask of the shape, with a jitter of +-2 px in position and +-1 px in size."""
    row, col = POSITIONS[scene.position]
    row, col = row + rng.integers(-2, 3), col + rng.integers(-2, 3)
    radius = 6 + rng.integers(-1, 2)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    if scene.shape == "circle":
        return (y - row) ** 2 + (x - col) ** 2 <= radius**2
    if scene.shape == "square":
        return (abs(y - row) <= radius - 1) & (abs(x - col) <= radius - 1)
    # An upward triangle: apex at the top, base at the bottom.
    top, bottom = row - radius, row + radius
    half_width = (y - top) * radius / (2 * radius)
    return (y >= top) & (y <= bottom) & (abs(x - col) <= half_width)


def render(scene, rng, style=None):
    """An RGB uint8 image of the scene; `style` (a name in STYLES, or a `Texture`) is applied to the background only."""
    mask = shape_mask(scene, rng)
    image = np.broadcast_to(BACKGROUND, (SIZE, SIZE, 3)).copy()
    if style is not None:
        image = (STYLES[style] if isinstance(style, str) else style).apply(image)
    image[mask] = COLOURS[scene.colour]
    return image.clip(0, 255).astype(np.uint8)


def grayscale(image):
    return np.asarray(image, dtype=np.float32)[..., :3].mean(axis=-1)


def saturated(image):
    """Boolean (SIZE, SIZE): the shape's pixels (background and styles are gray)."""
    rgb = np.asarray(image, dtype=np.float32)[..., :3]
    return (rgb.max(axis=-1) - rgb.min(axis=-1)) > SATURATION_THRESHOLD


# ---------------------------------------------------------------------------------------------------------------------
# Styles: a background transform and a detector score with its decision threshold.
# ---------------------------------------------------------------------------------------------------------------------


def apply_frame(background):
    out = background.copy()
    out[:3, :] = out[-3:, :] = out[:, :3] = out[:, -3:] = 40.0
    return out


def frame_score(image):
    """Brightness just inside the frame minus brightness of the outer 2 px ring: ~150 for the style, ~0 plain."""
    gray = grayscale(image)
    ring = np.zeros((SIZE, SIZE), dtype=bool)
    ring[:2, :] = ring[-2:, :] = ring[:, :2] = ring[:, -2:] = True
    inner = np.zeros((SIZE, SIZE), dtype=bool)
    inner[4:-4, 4:-4] = True
    inner[6:-6, 6:-6] = False
    return float(gray[inner].mean() - gray[ring].mean())


# The texture family: a periodic two-tone pattern (orientation, period, phase) darkening part of the background
# (placement) by a contrast factor. `stripes` and the evaluated new styles are members; the autoencoder and the CLIP
# are trained on random members (`random_texture`), never on preference data.
ORIENTATIONS = ("horizontal", "vertical", "diagonal", "checker")
PERIODS = (4, 6, 8, 10, 12, 16)
PLACEMENTS = ("full", "top", "bottom", "left", "right", "border")
CONTRAST_RANGE = (0.4, 0.75)
BORDER_WIDTH = 7


def placement_mask(placement):
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    half = SIZE // 2
    masks = {
        "full": np.ones((SIZE, SIZE), dtype=bool),
        "top": y < half,
        "bottom": y >= half,
        "left": x < half,
        "right": x >= half,
        "border": np.minimum(np.minimum(y, x), np.minimum(SIZE - 1 - y, SIZE - 1 - x)) < BORDER_WIDTH,
    }
    return masks[placement]


@dataclasses.dataclass(frozen=True)
class Texture:
    orientation: str
    period: int  # pixels; half of it light, half dark
    placement: str
    contrast: float  # the dark half is the background times this
    phase: int = 0

    @property
    def dark(self):
        """Boolean (SIZE, SIZE): where the pattern is dark (before placement)."""
        y, x = np.mgrid[0:SIZE, 0:SIZE] + self.phase
        half = self.period // 2
        bands = {
            "horizontal": y // half,
            "vertical": x // half,
            "diagonal": (x + y) // half,
            "checker": y // half + x // half,
        }[self.orientation]
        return bands % 2 == 1

    def apply(self, background):
        out = background.copy()
        out[self.dark & placement_mask(self.placement)] *= self.contrast
        return out

    def score(self, image):
        """Correlation of the background with the pattern inside the placement minus the same outside it.

        Saturated (shape) pixels are left out, so the shape does not mask the pattern; the template is zero-mean
        within each region, so a uniform background scores 0 whatever the pattern's light/dark balance; and the
        pattern in the wrong place (or everywhere) is not this style.
        """
        gray = grayscale(image)
        sign = np.where(self.dark, -1.0, 1.0)
        background = ~saturated(image)
        placed = placement_mask(self.placement)
        inside, outside = placed & background, ~placed & background

        def correlation(region):
            if not region.any():
                return 0.0
            template = sign[region] - sign[region].mean()
            return abs(float((gray[region] * template).mean()))

        return correlation(inside) - correlation(outside)


def random_texture(rng):
    """A random member of the texture family (for training the autoencoder and the CLIP)."""
    period = int(rng.choice(PERIODS))
    return Texture(
        orientation=str(rng.choice(ORIENTATIONS)),
        period=period,
        placement=str(rng.choice(PLACEMENTS)),
        contrast=float(rng.uniform(*CONTRAST_RANGE)),
        phase=int(rng.integers(period)),
    )


@dataclasses.dataclass(frozen=True)
class Style:
    name: str
    apply: callable
    score: callable
    threshold: float  # midway between the plain and the styled renderings' typical scores

    def detect(self, image):
        return self.score(image) > self.threshold


def texture_style(name, texture):
    """A texture as a named style; its threshold is half the score of its own empty styled background."""
    styled = texture.apply(np.broadcast_to(BACKGROUND, (SIZE, SIZE, 3)).copy())
    return Style(name, texture.apply, texture.score, threshold=0.5 * texture.score(styled))


# Evaluated styles: different frequencies, orientations, placements and contrasts. "bars" is held out of every
# sweep that chose a setting (the CI alignment check runs on it).
STYLE_TEXTURES = {
    "stripes": Texture("horizontal", 4, "full", 0.55),
    "checks": Texture("checker", 8, "full", 0.6),
    "diagonal": Texture("diagonal", 6, "left", 0.5),
    "bands": Texture("vertical", 12, "bottom", 0.55),
    "bars": Texture("vertical", 6, "top", 0.5),
}
STYLES = {
    **{name: texture_style(name, texture) for name, texture in STYLE_TEXTURES.items()},
    "frame": Style("frame", apply_frame, frame_score, threshold=70.0),
}
TUNING_STYLES = ("stripes", "frame", "checks", "diagonal", "bands")
HELD_OUT_STYLE = "bars"


# ---------------------------------------------------------------------------------------------------------------------
# Content: colour and position of the dominant saturated blob.
# ---------------------------------------------------------------------------------------------------------------------


def dominant_colour(image):
    """(name, boolean mask of its pixels) of the most frequent shape colour, or None when there are too few saturated
    pixels for a shape."""
    rgb = np.asarray(image, dtype=np.float32)[..., :3]
    shape = saturated(image)
    if shape.sum() < MIN_SHAPE_PIXELS:
        return None
    names = list(COLOURS)
    references = np.array([COLOURS[n] for n in names], dtype=np.float32)
    nearest = np.argmin(((rgb[shape][:, None, :] - references[None]) ** 2).sum(-1), axis=1)
    winner = int(np.bincount(nearest, minlength=len(names)).argmax())
    mask = np.zeros_like(shape)
    mask[shape] = nearest == winner
    return names[winner], mask


def classify_content(image):
    """(colour, position) of the image's saturated pixels, or (None, None) when there are too few of them."""
    found = dominant_colour(image)
    if found is None:
        return None, None
    colour, mask = found
    rows, cols = np.nonzero(mask)
    centre = np.array([rows.mean(), cols.mean()])
    position = min(POSITIONS, key=lambda p: float(((centre - np.array(POSITIONS[p])) ** 2).sum()))
    return colour, position


def content_correct(image, scene):
    return classify_content(image) == (scene.colour, scene.position)


# ---------------------------------------------------------------------------------------------------------------------
# A hidden reward for the relative-preference world (demo/relative.py): prompt faithfulness plus a visual attribute the
# base varies on (the shape's area), as a rater with a taste for big, correct shapes would judge.
# ---------------------------------------------------------------------------------------------------------------------

AREA_SCALE = 100.0  # pixels; a radius-6 circle covers ~113


def shape_area(image):
    """Pixels of the dominant saturated colour (0 when there is no shape)."""
    found = dominant_colour(image)
    return 0 if found is None else int(found[1].sum())


def hidden_reward(image, scene):
    """1 for the right colour and position, plus the shape's area in units of AREA_SCALE pixels."""
    return float(content_correct(image, scene)) + shape_area(image) / AREA_SCALE
