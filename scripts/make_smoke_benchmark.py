"""Write the embedded benchmark's data: a handful of real and drawn images with known answers.

    python scripts/make_smoke_benchmark.py [OUT_DIR]   # default: configs/otprune_smoke/data

Real photos come from matplotlib's sample data (shipped with matplotlib, no download), resized to
at most 336 px; the drawn scenes are coloured shapes whose answers are known by construction.
The output is committed; re-running rewrites the same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MAX_SIDE = 336
REAL_IMAGES = {
    "hopper": "grace_hopper.jpg",
    "gift": "Minduka_Present_Blue_Pack.png",
    "logo": "logo2.png",
}
# name -> (canvas size, [(shape, colour, (x0, y0, x1, y1)), ...])
SCENES = {
    "red_circle": ((320, 240), [("circle", "red", (110, 70, 210, 170))]),
    "three_squares": ((360, 200), [("square", "black", (30 + 110 * i, 60, 110 + 110 * i, 140)) for i in range(3)]),
    "green_triangle": ((240, 320), [("triangle", "green", (40, 60, 200, 260))]),
    "circle_and_square": ((400, 240), [("circle", "blue", (40, 60, 160, 180)), ("square", "yellow", (240, 60, 360, 180))]),
    "two_circles": ((300, 300), [("circle", "purple", (30, 100, 130, 200)), ("circle", "orange", (170, 100, 270, 200))]),
}
VQA = [
    ("hopper", "Is the person in the photo a man or a woman?", "woman"),
    ("gift", "What colour is the box?", "blue"),
    ("logo", "What word is written in the image?", "matplotlib"),
    ("red_circle", "What colour is the circle?", "red"),
    ("three_squares", "How many squares are there?", "3"),
    ("green_triangle", "What shape is shown?", "triangle"),
    ("circle_and_square", "What colour is the square?", "yellow"),
    ("two_circles", "How many circles are there?", "2"),
]
POPE = [
    ("hopper", "Is there a person in the image?", "yes"),
    ("hopper", "Is there a dog in the image?", "no"),
    ("gift", "Is there a gift box in the image?", "yes"),
    ("gift", "Is there a car in the image?", "no"),
    ("red_circle", "Is there a red circle in the image?", "yes"),
    ("three_squares", "Is there a triangle in the image?", "no"),
    ("logo", "Is there text in the image?", "yes"),
    ("green_triangle", "Is there a blue circle in the image?", "no"),
]
CAPTIONS = [
    ("hopper", ["a woman in a navy uniform posing for a portrait", "a portrait of a woman wearing a uniform"]),
    ("gift", ["a blue gift box tied with a silver ribbon", "a blue present with a white bow"]),
    ("logo", ["the word matplotlib in black letters", "a logo with the text matplotlib"]),
    ("red_circle", ["a red circle on a white background", "a single red circle"]),
    ("three_squares", ["three black squares in a row", "three squares on a white background"]),
    ("circle_and_square", ["a blue circle next to a yellow square", "a blue circle and a yellow square"]),
]


def real_image(name: str):
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / REAL_IMAGES[name]
    image = Image.open(path)
    # Transparent PNGs: paint onto white so the picture, not the alpha channel, is what is seen.
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, "white")
        background.paste(image, mask=image.getchannel("A"))
        image = background
    image = image.convert("RGB")
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    return image


def scene_image(name: str):
    from PIL import Image, ImageDraw

    size, shapes = SCENES[name]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for shape, colour, (x0, y0, x1, y1) in shapes:
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)
    return image


def write(out_dir: Path) -> None:
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in REAL_IMAGES:
        real_image(name).save(images / f"{name}.jpg", quality=85)
    for name in SCENES:
        scene_image(name).save(images / f"{name}.png")

    def file_of(name: str) -> str:
        return f"images/{name}.jpg" if name in REAL_IMAGES else f"images/{name}.png"

    rows = {
        "vqa": [dict(question_id=i, image=file_of(n), question=q, answer=a) for i, (n, q, a) in enumerate(VQA)],
        "pope": [dict(question_id=i, image=file_of(n), question=q, answer=a) for i, (n, q, a) in enumerate(POPE)],
        "caption": [dict(question_id=i, image=file_of(n), answer=refs) for i, (n, refs) in enumerate(CAPTIONS)],
    }
    for split, records in rows.items():
        with open(out_dir / f"{split}.jsonl", "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parent.parent / "configs" / "otprune_smoke" / "data"
    parser.add_argument("out_dir", nargs="?", default=str(default))
    write(Path(parser.parse_args(argv).out_dir))


if __name__ == "__main__":
    main()
