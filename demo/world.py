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
HELD_OUT = (("red", "square", "right"), ("green", "circle", "top"), ("blue", "triangle", "left"),
            ("yellow", "circle", "bottom"), ("red", "triangle", "top"), ("green", "square", "bottom"),
            ("blue", "circle", "right"), ("yellow", "square", "left"))
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
    """An RGB uint8 image of the scene; `style` (a name in STYLES) is applied to the background only."""
    mask = shape_mask(scene, rng)
    image = np.broadcast_to(BACKGROUND, (SIZE, SIZE, 3)).copy()
    if style is not None:
        image = STYLES[style].apply(image)
    image[mask] = COLOURS[scene.colour]
    return image.clip(0, 255).astype(np.uint8)


def grayscale(image):
    return np.asarray(image, dtype=np.float32)[..., :3].mean(axis=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Styles: a background transform and a detector score with its decision threshold.
# ---------------------------------------------------------------------------------------------------------------------

STRIPE_SIGN = np.where((np.arange(SIZE) // 2) % 2 == 0, 1.0, -1.0)  # rows 0-1 light, 2-3 dark, ...


def apply_stripes(background):
    out = background.copy()
    out[STRIPE_SIGN < 0] *= 0.55
    return out


def stripes_score(image):
    """Row-profile correlation with the fixed 4-px stripe pattern: ~43 for the style, ~0 for plain scenes."""
    return float(abs((grayscale(image).mean(axis=1) * STRIPE_SIGN).mean()))


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


@dataclasses.dataclass(frozen=True)
class Style:
    name: str
    apply: callable
    score: callable
    threshold: float  # midway between the plain and the styled renderings' typical scores

    def detect(self, image):
        return self.score(image) > self.threshold


STYLES = {
    "stripes": Style("stripes", apply_stripes, stripes_score, threshold=20.0),
    "frame": Style("frame", apply_frame, frame_score, threshold=70.0),
}


# ---------------------------------------------------------------------------------------------------------------------
# Content: colour and position of the dominant saturated blob.
# ---------------------------------------------------------------------------------------------------------------------


def classify_content(image):
    """(colour, position) of the image's saturated pixels, or (None, None) when there are too few of them."""
    rgb = np.asarray(image, dtype=np.float32)[..., :3]
    saturated = (rgb.max(axis=-1) - rgb.min(axis=-1)) > SATURATION_THRESHOLD
    if saturated.sum() < MIN_SHAPE_PIXELS:
        return None, None
    names = list(COLOURS)
    references = np.array([COLOURS[n] for n in names], dtype=np.float32)
    nearest = np.argmin(((rgb[saturated][:, None, :] - references[None]) ** 2).sum(-1), axis=1)
    votes = np.bincount(nearest, minlength=len(names))
    colour = names[int(votes.argmax())]
    chosen = np.zeros_like(saturated)
    chosen[saturated] = nearest == votes.argmax()
    rows, cols = np.nonzero(chosen)
    centre = np.array([rows.mean(), cols.mean()])
    position = min(POSITIONS, key=lambda p: float(((centre - np.array(POSITIONS[p])) ** 2).sum()))
    return colour, position


def content_correct(image, scene):
    return classify_content(image) == (scene.colour, scene.position)
