"""Datasets for the demo detector.

Three sources, one item format: ``dataset[i] -> (image, labels)`` with ``image`` a ``uint8``
tensor ``[3, H, W]`` (resized to the dataset's square ``img_size``) and ``labels`` a float32
tensor ``[n, 5]`` of rows (class, cx, cy, w, h) normalized to 0..1. :func:`collate` stacks a
batch into float images in 0..1 and YOLO target rows ``[N, 6]`` (image_index, class, cx, cy, w, h).

- :class:`SyntheticShapes`: circles, squares and triangles in several colours and sizes on
  textured backgrounds, several objects per image, exact boxes; image ``i`` depends only on
  ``(seed, i)``, so any item can be regenerated anywhere (every rank, every run).
- :class:`YoloTxtDataset`: a folder with ``images/`` and ``labels/`` (one ``class cx cy w h``
  line per object, YOLO txt format); optional ``classes.txt`` for class names.
- :class:`CocoJsonDataset`: a COCO instances json (``bbox`` = x, y, w, h in pixels) and its images.

Malformed inputs raise errors that name the file and, for labels, the line, when the dataset is
built: every image file is checked to exist and to be an image then, not when it is first read.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from ...boxes import read_yolo_labels

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

SHAPES = ("circle", "square", "triangle")
# Vivid object colours; backgrounds are drawn from muted tones so every shape stays visible.
PALETTE = (
    (230, 40, 40), (40, 200, 60), (50, 90, 235), (240, 210, 30),
    (230, 60, 220), (30, 210, 220), (250, 140, 20), (245, 245, 245),
)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class SyntheticShapes:
    """Synthetic images of simple shapes with exact boxes, deterministic by ``(seed, index)``.

    Each image has ``1..max_objects`` shapes (class = shape: circle, square, triangle), side
    ``min_size..max_size`` pixels (log-uniform), colours from a vivid palette, on a background of
    low-frequency colour blobs plus uniform pixel noise. Boxes do not overlap, so every object is fully
    visible and its box is exact: the shape touches all four sides of its box.

    Args:
        length: number of items (the demo's training stream uses a very large length).
        img_size: side of the square images in pixels.
        seed: the dataset seed; items of different seeds are independent.
        max_objects, min_size, max_size: object count and size range.
    """

    names: Tuple[str, ...] = SHAPES

    def __init__(self, length: int, img_size: int = 128, seed: int = 0, max_objects: int = 6,
                 min_size: int = 12, max_size: int = 56) -> None:
        if length < 1:
            raise ValueError(f"length: expected a positive number of images, got {length}")
        if img_size < 32:
            raise ValueError(f"img_size: expected at least 32 pixels, got {img_size}")
        if not 4 <= min_size <= max_size < img_size:
            raise ValueError(
                f"min_size, max_size: expected 4 <= min_size <= max_size < img_size ({img_size}), "
                f"got {min_size}, {max_size}")
        self.length, self.img_size, self.seed = int(length), int(img_size), int(seed)
        self.max_objects, self.min_size, self.max_size = int(max_objects), int(min_size), int(max_size)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return self.length

    def _background(self, rng: np.random.Generator) -> Image.Image:
        s = self.img_size
        base = rng.integers(40, 171, size=3, dtype=np.int16)
        blobs = rng.integers(128 - 45, 128 + 46, size=(4, 4, 3), dtype=np.uint8)
        low = np.asarray(Image.fromarray(blobs).resize((s, s), Image.BILINEAR)).astype(np.int16)
        noise = rng.integers(-16, 17, size=(s, s, 3), dtype=np.int16)
        return Image.fromarray(np.clip(low + noise + (base - 128), 0, 255).astype(np.uint8))

    def _place(self, rng: np.random.Generator) -> List[Tuple[int, int, int, int, int]]:
        """Non-overlapping boxes (class, x0, y0, x1, y1), pixel edges, x1/y1 exclusive."""
        s, placed = self.img_size, []
        n = int(rng.integers(1, self.max_objects + 1))
        lo, hi = math.log(self.min_size), math.log(self.max_size)
        for _ in range(n * 8):  # a bounded number of tries; crowded draws just get fewer objects
            if len(placed) == n:
                break
            side = int(round(math.exp(rng.uniform(lo, hi))))
            cls = int(rng.integers(0, len(SHAPES)))
            x0 = int(rng.integers(0, s - side + 1))
            y0 = int(rng.integers(0, s - side + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if all(box[2] + 1 <= b[1] or b[3] + 1 <= box[0] or box[3] + 1 <= b[2] or b[4] + 1 <= box[1]
                   for b in placed):
                placed.append((cls, *box))
        return placed

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index: expected 0 <= index < {self.length}, got {index}")
        rng = np.random.default_rng([self.seed, index])
        img = self._background(rng)
        draw = ImageDraw.Draw(img)
        rows = []
        for cls, x0, y0, x1, y1 in self._place(rng):
            colour = PALETTE[int(rng.integers(0, len(PALETTE)))]
            # PIL's shape coordinates are inclusive pixel indices: the last covered pixel is x1 - 1.
            if SHAPES[cls] == "circle":
                draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
            elif SHAPES[cls] == "square":
                draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
            else:
                draw.polygon(((x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)), fill=colour)
            s = self.img_size
            rows.append((cls, (x0 + x1) / 2 / s, (y0 + y1) / 2 / s, (x1 - x0) / s, (y1 - y0) / s))
        labels = torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)
        return _to_tensor(img), labels


def _list_images(folder: Path) -> List[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"data: expected an image folder at {folder}, found none")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"data: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def parse_yolo_label_file(path: Path, num_classes: Optional[int] = None) -> torch.Tensor:
    """Read one YOLO txt label file -> ``[n, 5]`` float32 rows (class, cx, cy, w, h); the rules and
    the errors (naming the file and line) are :func:`detloss.boxes.read_yolo_labels`'."""
    return read_yolo_labels(path, num_classes).to(torch.float32)


def check_image(path: Path, where: str = "") -> None:
    """Fail now, naming the file, when ``path`` is missing or is not an image PIL can read
    (the header and, where the format has them, the checksums are read; no pixels are decoded)."""
    if not path.is_file():
        raise FileNotFoundError(f"{where}image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises several types for a file that is not an image
        raise ValueError(f"{where}{path}: cannot read the image ({e})") from None


def _load_resized(path: Path, img_size: int) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            return _to_tensor(im.convert("RGB").resize((img_size, img_size), Image.BILINEAR))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None


class YoloTxtDataset:
    """A YOLO txt dataset on disk: ``root/images/*.{jpg,png,...}`` and ``root/labels/<stem>.txt``.

    Every label file is read and checked when the dataset is built (errors name file and line);
    an image without a label file has no objects. Class names come from ``root/classes.txt``
    (one per line) when present, else ``"0", "1", ...`` up to the largest class id. Images are
    loaded on access and resized to ``img_size`` x ``img_size`` (normalized boxes are unchanged).
    """

    def __init__(self, root: str, img_size: int = 128) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data: expected a folder with images/ and labels/, {self.root} does not exist")
        self.img_size = int(img_size)
        self.files = _list_images(self.root / "images")
        for f in self.files:
            check_image(f)
        label_dir = self.root / "labels"
        if not label_dir.is_dir():
            raise FileNotFoundError(f"data: expected a labels folder at {label_dir}, found none")
        names_file = self.root / "classes.txt"
        names = None
        if names_file.is_file():
            names = [n.strip() for n in names_file.read_text(encoding="utf-8").splitlines() if n.strip()]
        self.labels = []
        for f in self.files:
            lf = label_dir / (f.stem + ".txt")
            self.labels.append(parse_yolo_label_file(lf, len(names) if names else None)
                               if lf.is_file() else torch.zeros((0, 5)))
        if names is None:
            top = max((int(l[:, 0].max()) for l in self.labels if len(l)), default=0)
            names = [str(i) for i in range(top + 1)]
        self.names = tuple(names)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return _load_resized(self.files[index], self.img_size), self.labels[index].clone()


class CocoJsonDataset:
    """A COCO instances json and its images (``image_dir``, default: the json's folder).

    Categories are mapped to contiguous classes ``0..K-1`` in increasing category id;
    ``iscrowd`` annotations are skipped. Boxes (x, y, w, h pixels) are normalized by the
    image's ``width``/``height`` from the json and clipped to the image.
    """

    def __init__(self, json_path: str, image_dir: Optional[str] = None, img_size: int = 128) -> None:
        self.json_path = Path(json_path)
        if not self.json_path.is_file():
            raise FileNotFoundError(f"data: expected a COCO json file, {self.json_path} does not exist")
        self.image_dir = Path(image_dir) if image_dir else self.json_path.parent
        self.img_size = int(img_size)
        try:
            doc = json.loads(self.json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.json_path}: not valid json (line {e.lineno}: {e.msg})") from None
        for key in ("images", "annotations", "categories"):
            if not isinstance(doc.get(key) if isinstance(doc, dict) else None, list):
                raise ValueError(f"{self.json_path}: expected a list under {key!r}")
        try:
            cat_ids = sorted(int(c["id"]) for c in doc["categories"])
            by_id = {int(c["id"]): c.get("name", str(c["id"])) for c in doc["categories"]}
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{self.json_path}: every category needs an integer 'id'") from None
        if not cat_ids:
            raise ValueError(f"{self.json_path}: expected at least one category under 'categories', got none")
        self.names = tuple(by_id[i] for i in cat_ids)
        cat_index = {cid: k for k, cid in enumerate(cat_ids)}
        self.images: List[Dict] = []
        index_of = {}
        for k, im in enumerate(doc["images"]):
            try:
                entry = {"id": im["id"], "file": self.image_dir / im["file_name"],
                         "width": float(im["width"]), "height": float(im["height"])}
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.json_path}: images[{k}]: expected 'id', 'file_name', 'width', 'height', "
                                 f"got {im!r}") from None
            if entry["width"] <= 0 or entry["height"] <= 0:
                raise ValueError(f"{self.json_path}: images[{k}]: expected a positive width and height, got {im!r}")
            index_of[im["id"]] = len(self.images)
            self.images.append(entry)
        rows: List[List[List[float]]] = [[] for _ in self.images]
        for k, ann in enumerate(doc["annotations"]):
            where = f"{self.json_path}: annotations[{k}]"
            try:
                img, cat, (x, y, w, h) = ann["image_id"], int(ann["category_id"]), [float(v) for v in ann["bbox"]]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{where}: expected 'image_id', 'category_id' and 'bbox' [x, y, w, h], got {ann!r}") from None
            if img not in index_of:
                raise ValueError(f"{where}: image_id {img!r} is not among the images")
            if cat not in cat_index:
                raise ValueError(f"{where}: category_id {cat} is not among the categories {cat_ids}")
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
                raise ValueError(f"{where}: expected a finite bbox with positive width and height, got {ann['bbox']!r}")
            if ann.get("iscrowd", 0):
                continue
            im = self.images[index_of[img]]
            W, H = im["width"], im["height"]
            x0, y0 = min(max(x, 0.0), W), min(max(y, 0.0), H)
            x1, y1 = min(max(x + w, 0.0), W), min(max(y + h, 0.0), H)
            if x1 - x0 <= 0 or y1 - y0 <= 0:
                continue  # entirely outside the image
            rows[index_of[img]].append([cat_index[cat], (x0 + x1) / 2 / W, (y0 + y1) / 2 / H,
                                        (x1 - x0) / W, (y1 - y0) / H])
        self.labels = [torch.tensor(r, dtype=torch.float32).reshape(-1, 5) for r in rows]
        if not self.images:
            raise ValueError(f"{self.json_path}: no images listed")
        for k, im in enumerate(self.images):
            check_image(im["file"], f"{self.json_path}: images[{k}]: ")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        f = self.images[index]["file"]
        if not f.is_file():
            raise FileNotFoundError(f"{self.json_path}: image file {f} does not exist")
        return _load_resized(f, self.img_size), self.labels[index].clone()


def open_dataset(path: str, img_size: int, image_dir: Optional[str] = None):
    """``path`` a folder with images/ and labels/ (YOLO txt) or a ``.json`` file (COCO)."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        return CocoJsonDataset(str(p), image_dir=image_dir, img_size=img_size)
    if p.is_dir():
        return YoloTxtDataset(str(p), img_size=img_size)
    raise FileNotFoundError(
        f"data: expected a folder with images/ and labels/ or a COCO .json file, {p} "
        + ("is not a folder" if p.exists() else "does not exist"))


class Subset:
    """Items ``indices`` of ``dataset`` (keeps ``names``)."""

    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)
        self.names = dataset.names
        self.img_size = dataset.img_size

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def hflip(image: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mirror an item left-right (image ``[3, H, W]``, rows (class, cx, cy, w, h))."""
    labels = labels.clone()
    labels[:, 1] = 1.0 - labels[:, 1]
    return image.flip(-1), labels


def collate(items: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack items into float images ``[B, 3, H, W]`` in 0..1 and target rows ``[N, 6]``."""
    images = torch.stack([im for im, _ in items]).float().div_(255.0)
    rows = [torch.cat((torch.full((len(l), 1), float(i)), l), dim=1) for i, (_, l) in enumerate(items)]
    return images, torch.cat(rows, dim=0) if rows else torch.zeros((0, 6))
