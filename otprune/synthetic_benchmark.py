"""A seeded visual benchmark whose answers are known by construction: coloured shapes on a
background of a chosen redundancy, with presence, attribute, counting, spatial and caption questions.

Everything is a pure function of a seed: ``scenes(seed, n)`` -> ``draw(scene, background)`` (a
336 px PIL image) and ``questions(scene, rng)``. A scene and its background are plain data
(JSON-serialisable), so a split is shipped as its scenes and questions and the images are drawn
when a task reads them.

The background is the benchmark's redundancy axis, ``LEVELS`` from most to least redundant:

- ``plain``: one flat grey; about 96 % of the patches show nothing but it.
- ``gradient``: a smooth linear blend of two muted colours in a random direction.
- ``texture``: noise, stripes or checks of a random scale, orientation and pair of muted colours.
- ``clutter``: a texture strewn with small distractor marks (crosses, bars, hooks) in colours
  outside ``COLOURS``; a mark never touches an object's box, so no answer changes.

Background colours are muted (low saturation) and distractor colours (``DISTRACTOR_COLOURS``) are
none of the question vocabulary's, so the objects stay the only things a question can name. How
redundant each level is for a model is measured, not assumed: ``otprune.measures.near_duplicate_share``
on the model's projected visual tokens.

Design **choices** (for a tiny model that must learn the task in minutes on a CPU):

- Objects sit on a 4 x 4 grid of 84 px cells, one per cell, their boxes aligned to the 14 px
  patches of a LLaVA-1.5 vision tower, so every patch shows one of a few fixed pieces of a shape.
- 1-4 objects, no two with the same (colour, shape), so "the red circle" always names one object.
- Spatial questions only compare objects in different columns (left/right) or rows (above/below).
- Train and held-out scenes never coincide: a scene belongs to the held-out split when a hash of
  its objects falls in one eighth of the range, whatever seed drew it.
- The held-out rows of every level are the same questions on the same scenes; only the background
  differs (its seed is a hash of the level, the kind and the row), so a change of score across
  levels is the background's doing.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "BACKGROUND",
    "CAPTION_PROMPT",
    "COLOURS",
    "DISTRACTOR_COLOURS",
    "HELD_OUT_SEED",
    "IMAGE_SIZE",
    "KINDS",
    "LEVELS",
    "PATCH",
    "SHAPES",
    "SHORT_ANSWER_PROMPT",
    "SIZES",
    "SPLITS",
    "TASK_KINDS",
    "Background",
    "Shape",
    "background_from_dict",
    "blind_chance",
    "caption",
    "draw",
    "in_split",
    "level_rows",
    "question_rows",
    "question_template",
    "questions",
    "random_background",
    "random_scene",
    "scene_from_dict",
    "scenes",
    "task_benchmark",
    "task_level",
    "task_name",
    "vocabulary",
]

IMAGE_SIZE = 336
PATCH = 14
GRID = 4
CELL = IMAGE_SIZE // GRID
BACKGROUND = (235, 235, 235)
COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
SHAPES = ("circle", "square", "triangle")
# size name -> side in patches
SIZES = {"small": 2, "large": 4}
MAX_OBJECTS = 4
KINDS = ("presence", "attribute", "count", "spatial", "caption")
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
NUMBERS = ("0", "1", "2", "3", "4")
SPLITS = ("train", "held_out")
HELD_OUT_SEED = 1_000_003
LEVELS = ("plain", "gradient", "texture", "clutter")
# Per question kind: its lmms-eval task's suffix and its report column (configs/tasks.yaml).
TASK_KINDS = {
    "presence": ("yesno", "SynYesNo"),
    "attribute": ("attribute", "SynAttr"),
    "count": ("count", "SynCount"),
    "spatial": ("spatial", "SynSpatial"),
    "caption": ("caption", "SynCap"),
}
TEXTURES = ("noise", "stripes", "checks")
DISTRACTOR_COLOURS = {"purple": (120, 50, 150), "cyan": (20, 180, 190), "brown": (110, 70, 30), "black": (20, 20, 20), "white": (255, 255, 255)}
DISTRACTOR_MARKS = ("plus", "cross", "bar", "hook")
# Distractor marks per clutter image, and their side in pixels (under a patch).
DISTRACTORS = (350, 500)
MARK_SIDE = (5, 11)
# Pixels kept free around every object's box, so that no mark touches an object.
MARK_MARGIN = 3


@dataclass(frozen=True)
class Shape:
    """One object: its kind, colour, size name and box corner in patches (column, row)."""

    shape: str
    colour: str
    size: str
    x: int
    y: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Pixel box ``(x0, y0, x1, y1)``, end exclusive."""
        side = SIZES[self.size] * PATCH
        return self.x * PATCH, self.y * PATCH, self.x * PATCH + side, self.y * PATCH + side

    @property
    def cell(self) -> tuple[int, int]:
        """``(column, row)`` of the grid cell that holds it."""
        return self.x * PATCH // CELL, self.y * PATCH // CELL


@dataclass(frozen=True)
class Background:
    """What the objects are drawn on: a level of ``LEVELS`` and the seed of its random pattern."""

    level: str
    seed: int

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"background level={self.level!r} is not allowed; allowed: {', '.join(LEVELS)}")
        _check_seed(self.seed)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} is not allowed; it must be an integer")
    return seed


PLAIN = Background("plain", 0)


def in_split(scene: tuple[Shape, ...]) -> str:
    """``"held_out"`` for one eighth of all scenes (by a hash of their objects), else ``"train"``."""
    digest = hashlib.sha256(repr(scene).encode()).digest()
    return "held_out" if digest[0] % 8 == 0 else "train"


def random_scene(rng: random.Random, split: str = "train") -> tuple[Shape, ...]:
    """A scene of ``split``: 1-4 objects in distinct cells with distinct (colour, shape), sorted in
    reading order (scenes of the other split are drawn and discarded)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed; allowed: {', '.join(SPLITS)}")
    while True:
        scene = _any_scene(rng)
        if in_split(scene) == split:
            return scene


def _any_scene(rng: random.Random) -> tuple[Shape, ...]:
    count = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample([(c, r) for r in range(GRID) for c in range(GRID)], count)
    kinds = rng.sample([(s, c) for s in SHAPES for c in COLOURS], count)
    objects = []
    for (column, row), (shape, colour) in zip(cells, kinds):
        size = rng.choice(tuple(SIZES))
        slack = CELL // PATCH - SIZES[size]
        x = column * CELL // PATCH + rng.randint(0, slack)
        y = row * CELL // PATCH + rng.randint(0, slack)
        objects.append(Shape(shape, colour, size, x, y))
    return tuple(sorted(objects, key=lambda o: (o.cell[1], o.cell[0])))


def scenes(seed: int, n: int, split: str = "train") -> list[tuple[Shape, ...]]:
    """``n`` scenes of ``split`` drawn from ``seed``; the same arguments give the same scenes."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} is not allowed; it must be an integer >= 0")
    rng = random.Random(_check_seed(seed))
    return [random_scene(rng, split) for _ in range(n)]


def scene_from_dict(objects: list[dict]) -> tuple[Shape, ...]:
    return tuple(Shape(**o) for o in objects)


def scene_to_dict(scene: tuple[Shape, ...]) -> list[dict]:
    return [asdict(o) for o in scene]


def random_background(rng: random.Random, level: str) -> Background:
    """A ``level`` background with a seed drawn from ``rng``."""
    return Background(level, rng.getrandbits(32))


def background_from_dict(data: dict | None) -> Background:
    """``{"level", "seed"}`` as a ``Background``; ``None`` (a row without one) is the plain one."""
    return PLAIN if data is None else Background(**data)


def _muted(rng) -> np.ndarray:
    """A light, low-saturation colour: a grey with each channel nudged a little."""
    grey = rng.uniform(150, 240)
    return np.clip(grey + rng.uniform(-25, 25, size=3), 0, 255)


def _pattern(rng, kind: str) -> np.ndarray:
    """(336, 336) weights in [0, 1] of a texture's second colour."""
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64)
    scale = rng.uniform(4, 42)
    if kind == "noise":
        cells = int(np.ceil(IMAGE_SIZE / scale))
        coarse = rng.random((cells, cells))
        index = (np.arange(IMAGE_SIZE) / scale).astype(int)
        return coarse[index[:, None], index[None, :]]
    angle = rng.choice([0.0, np.pi / 2, np.pi / 4, -np.pi / 4])
    if kind == "stripes":
        return (np.floor((x * np.cos(angle) + y * np.sin(angle)) / scale) % 2).astype(np.float64)
    return ((np.floor(x / scale) + np.floor(y / scale)) % 2).astype(np.float64)


def _canvas(background: Background) -> np.ndarray:
    """(336, 336, 3) uint8 pixels of the background before any object is drawn."""
    if background.level == "plain":
        return np.broadcast_to(np.asarray(BACKGROUND, dtype=np.uint8), (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    rng = np.random.default_rng(background.seed)
    first, second = _muted(rng), _muted(rng)
    if background.level == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / (IMAGE_SIZE - 1)
        along = x * np.cos(angle) + y * np.sin(angle)
        weight = (along - along.min()) / (along.max() - along.min())
    else:
        weight = _pattern(rng, TEXTURES[rng.integers(len(TEXTURES))])
    return np.round(first + weight[..., None] * (second - first)).astype(np.uint8)


def _draw_object(pen, o: Shape) -> None:
    x0, y0, x1, y1 = o.box
    fill = COLOURS[o.colour]
    if o.shape == "circle":
        pen.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif o.shape == "square":
        pen.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        pen.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)


def _draw_distractors(pen, scene: tuple[Shape, ...], seed: int) -> None:
    """Small marks in ``DISTRACTOR_COLOURS`` anywhere at least ``MARK_MARGIN`` px from every object's box."""
    rng = random.Random(seed ^ 0x5EED)
    boxes = [(x0 - MARK_MARGIN, y0 - MARK_MARGIN, x1 + MARK_MARGIN, y1 + MARK_MARGIN) for x0, y0, x1, y1 in (o.box for o in scene)]
    for _ in range(rng.randint(*DISTRACTORS)):
        side = rng.randint(*MARK_SIDE)
        x0, y0 = rng.randrange(IMAGE_SIZE - side), rng.randrange(IMAGE_SIZE - side)
        x1, y1 = x0 + side, y0 + side
        # A line of width 2 may paint a pixel beyond its end points.
        if any(x0 - 2 < bx1 and bx0 < x1 + 2 and y0 - 2 < by1 and by0 < y1 + 2 for bx0, by0, bx1, by1 in boxes):
            continue
        fill = DISTRACTOR_COLOURS[rng.choice(tuple(DISTRACTOR_COLOURS))]
        mark, width = rng.choice(DISTRACTOR_MARKS), 2
        xm, ym = (x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2
        if mark == "plus":
            lines = [((x0, ym), (x1 - 1, ym)), ((xm, y0), (xm, y1 - 1))]
        elif mark == "cross":
            lines = [((x0, y0), (x1 - 1, y1 - 1)), ((x0, y1 - 1), (x1 - 1, y0))]
        elif mark == "bar":
            lines = [((x0, y0), (x1 - 1, y1 - 1))] if rng.random() < 0.5 else [((x0, y1 - 1), (x1 - 1, y0))]
        else:
            lines = [((x0, y0), (x0, y1 - 1)), ((x0, y1 - 1), (x1 - 1, y1 - 1))]
        for start, end in lines:
            pen.line((start, end), fill=fill, width=width)


def draw(scene: tuple[Shape, ...], background: Background = PLAIN):
    """The scene on ``background`` (default: plain) as a 336 x 336 RGB PIL image."""
    from PIL import Image, ImageDraw

    if not isinstance(background, Background):
        raise ValueError(f"background={background!r} is not allowed; it must be a Background (level in {', '.join(LEVELS)})")
    image = Image.fromarray(_canvas(background), "RGB")
    pen = ImageDraw.Draw(image)
    if background.level == "clutter":
        _draw_distractors(pen, scene, background.seed)
    for o in scene:
        _draw_object(pen, o)
    return image


def caption(scene: tuple[Shape, ...]) -> str:
    """Every object as "a <size> <colour> <shape>" in reading order, joined by commas and "and"."""
    parts = [f"a {o.size} {o.colour} {o.shape}" for o in scene]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _presence(scene, rng):
    present = {(o.colour, o.shape) for o in scene}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
        return f"Is there a {colour} {shape} in the image?", "yes"
    # POPE's adversarial negatives: an absent pair that shares a colour or a shape with the scene.
    near = sorted((c, s) for c in COLOURS for s in SHAPES if (c, s) not in present and any(c == pc or s == ps for pc, ps in present))
    colour, shape = rng.choice(near)
    return f"Is there a {colour} {shape} in the image?", "no"


def _attribute(scene, rng):
    target = rng.choice(scene)
    asks = ["size"]
    if sum(o.shape == target.shape for o in scene) == 1:
        asks.append("colour")
    if sum(o.colour == target.colour for o in scene) == 1:
        asks.append("shape")
    ask = rng.choice(asks)
    if ask == "colour":
        return f"What color is the {target.shape}?", target.colour
    if ask == "shape":
        return f"What shape is the {target.colour} object?", target.shape
    return f"What size is the {target.name}?", target.size


def _count(scene, rng):
    if rng.random() < 0.5:
        return "How many objects are there?", NUMBERS[len(scene)]
    shape = rng.choice(SHAPES)
    return f"How many {shape}s are there?", NUMBERS[sum(o.shape == shape for o in scene)]


def _spatial(scene, rng):
    pairs = [(a, b) for a in scene for b in scene if a is not b]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    axes = [axis for axis in (0, 1) if a.cell[axis] != b.cell[axis]]
    if rng.choice(axes) == 0:
        return f"Is the {a.name} to the left or to the right of the {b.name}?", "left" if a.cell[0] < b.cell[0] else "right"
    return f"Is the {a.name} above or below the {b.name}?", "above" if a.cell[1] < b.cell[1] else "below"


def questions(scene: tuple[Shape, ...], rng: random.Random) -> dict[str, tuple[str, str]]:
    """One ``(question, answer)`` per kind in ``KINDS`` (no spatial one for a one-object scene).

    The question is the whole prompt text after the image: short-answer questions carry
    ``SHORT_ANSWER_PROMPT``, the caption question is ``CAPTION_PROMPT``.
    """
    asked = {"presence": _presence(scene, rng), "attribute": _attribute(scene, rng), "count": _count(scene, rng)}
    spatial = _spatial(scene, rng)
    if spatial is not None:
        asked["spatial"] = spatial
    asked = {kind: (q + SHORT_ANSWER_PROMPT, a) for kind, (q, a) in asked.items()}
    asked["caption"] = (CAPTION_PROMPT, caption(scene))
    return asked


def question_rows(per_kind: int, seed: int = HELD_OUT_SEED, split: str = "held_out") -> dict[str, list[dict]]:
    """Questions on scenes of ``split``: ``{kind: rows}`` with ``per_kind`` rows per kind, each row
    ``{question_id, scene, question, answer}``; yes/no rows are balanced (half "yes")."""
    if isinstance(per_kind, bool) or not isinstance(per_kind, int) or per_kind < 1:
        raise ValueError(f"per_kind={per_kind!r} is not allowed; it must be an integer >= 1")
    rng = random.Random(_check_seed(seed))
    rows = {kind: [] for kind in KINDS}
    want = {"yes": (per_kind + 1) // 2, "no": per_kind // 2}
    while any(len(r) < per_kind for r in rows.values()):
        scene = random_scene(rng, split)
        for kind, (question, answer) in questions(scene, rng).items():
            if len(rows[kind]) >= per_kind:
                continue
            if kind == "presence":
                if want[answer] == 0:
                    continue
                want[answer] -= 1
            rows[kind].append(dict(question_id=len(rows[kind]), scene=scene_to_dict(scene), question=question, answer=answer))
    return rows


def level_rows(rows: dict[str, list[dict]], level: str) -> dict[str, list[dict]]:
    """``rows`` (``question_rows``' form) on ``level`` backgrounds: each row gains
    ``background: {level, seed}``, its seed a hash of the level, the kind and the row's id, so every
    level asks the same questions of the same scenes. Plain rows are returned as they are."""
    if level not in LEVELS:
        raise ValueError(f"level={level!r} is not allowed; allowed: {', '.join(LEVELS)}")
    if level == "plain":
        return rows

    def seed(kind, question_id):
        return int.from_bytes(hashlib.sha256(f"{level}/{kind}/{question_id}".encode()).digest()[:4], "big")

    return {kind: [{**r, "background": asdict(Background(level, seed(kind, r["question_id"])))} for r in items] for kind, items in rows.items()}


def task_name(kind: str, level: str) -> str:
    """The lmms-eval task asking ``kind`` questions on ``level`` backgrounds (plain: the original
    task names, ``otprune_synth_yesno``; else ``otprune_synth_clutter_yesno``)."""
    if kind not in TASK_KINDS or level not in LEVELS:
        raise ValueError(f"kind={kind!r}, level={level!r} is not allowed; kinds: {', '.join(TASK_KINDS)}; levels: {', '.join(LEVELS)}")
    return "otprune_synth_" + ("" if level == "plain" else level + "_") + TASK_KINDS[kind][0]


def task_benchmark(kind: str, level: str) -> str:
    """The report's column for ``task_name(kind, level)``: ``SynYesNo`` on plain, ``SynYesNo-clutter``."""
    task_name(kind, level)
    return TASK_KINDS[kind][1] + ("" if level == "plain" else "-" + level)


def task_level(benchmark: str) -> tuple[str, str] | None:
    """``(kind, level)`` of a ``task_benchmark`` column; ``None`` for any other column."""
    for kind in TASK_KINDS:
        for level in LEVELS:
            if task_benchmark(kind, level) == benchmark:
                return kind, level
    return None


def vocabulary() -> list[str]:
    """Sentences that hold every word the benchmark's prompts and answers use (for a tokenizer)."""
    words = [*COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *SIZES, *NUMBERS, "yes", "no", "left", "right", "above", "below"]
    return [
        "Is there a in the image? What color is the shape object? What size is the How many objects are there?",
        "Is the to the left or to the right of the above or below the and , a",
        SHORT_ANSWER_PROMPT.strip(),
        CAPTION_PROMPT,
        " ".join(words),
    ]


def question_template(question: str) -> str:
    """``question`` with its object words (colours, shapes, sizes) blanked: what a model that
    cannot see the image knows of it."""
    words = {*COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *SIZES}
    return " ".join("_" + w[len(w.rstrip("?")) :] if w.rstrip("?") in words else w for w in question.split())


def blind_chance(rows: dict[str, list[dict]]) -> dict[str, float]:
    """The best score a model blind to the image can reach on ``rows`` (``question_rows``' form):
    per kind, every question template answered with its most frequent answer (``<kind>_em``);
    for presence, that accuracy (``presence_acc``) and the F1 of always answering "yes"
    (``presence_f1``). Answers compare as ``otprune.benchmark_metrics.normalise`` leaves them."""
    from otprune.benchmark_metrics import normalise, yes_no_f1

    scores = {}
    for kind, items in rows.items():
        if not items:
            raise ValueError(f"rows[{kind!r}] is empty; every kind needs at least one question")
        by_template: dict[str, list[str]] = {}
        for r in items:
            by_template.setdefault(question_template(r["question"]), []).append(normalise(r["answer"]))
        best = sum(max(answers.count(a) for a in set(answers)) for answers in by_template.values()) / len(items)
        if kind == "presence":
            scores["presence_f1"] = yes_no_f1([{"prediction": "yes", "answer": normalise(r["answer"])} for r in items])
            scores["presence_acc"] = best
        else:
            scores[f"{kind}_em"] = best
    return scores
