"""Demo datasets: synthetic shapes (deterministic, exact boxes), YOLO txt and COCO json loaders,
and the errors they give for bad paths and malformed labels (naming the file and the line)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from detloss.tools.demo.data import (
    CocoJsonDataset,
    SyntheticShapes,
    YoloTxtDataset,
    collate,
    hflip,
    open_dataset,
    parse_yolo_label_file,
)


def test_synthetic_is_deterministic_by_seed_and_index():
    a, b = SyntheticShapes(50, 96, seed=3), SyntheticShapes(50, 96, seed=3)
    for i in (0, 7, 49):
        (ia, la), (ib, lb) = a[i], b[i]
        assert torch.equal(ia, ib) and torch.equal(la, lb)
    other = SyntheticShapes(50, 96, seed=4)
    assert not torch.equal(a[0][0], other[0][0])
    assert not torch.equal(a[0][0], a[1][0])


def test_synthetic_boxes_are_exact():
    """Each shape touches all four sides of its box (the colour of the shape's centre pixel is on
    the box's first/last row and column) and does not reach past it."""
    ds = SyntheticShapes(20, 128, seed=11)
    checked = 0
    for i in range(len(ds)):
        img, labels = ds[i]
        arr = img.permute(1, 2, 0).numpy().astype(np.int32)
        assert labels.shape[1] == 5 and len(labels) >= 1
        assert ((labels[:, 0] >= 0) & (labels[:, 0] < 3)).all()
        for cls, cx, cy, w, h in labels.tolist():
            x0, y0 = round((cx - w / 2) * 128), round((cy - h / 2) * 128)
            x1, y1 = round((cx + w / 2) * 128), round((cy + h / 2) * 128)
            colour = arr[(y0 + y1) // 2, (x0 + x1) // 2]
            same = (arr == colour).all(-1)
            assert same[y0, x0:x1].any() and same[y1 - 1, x0:x1].any()
            assert same[y0:y1, x0].any() and same[y0:y1, x1 - 1].any()
            if y0 > 0:
                assert not same[y0 - 1, x0:x1].any()
            if y1 < 128:
                assert not same[y1, x0:x1].any()
            if x0 > 0:
                assert not same[y0:y1, x0 - 1].any()
            if x1 < 128:
                assert not same[y0:y1, x1].any()
            checked += 1
    assert checked > 20


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="img_size"):
        SyntheticShapes(10, 16)
    with pytest.raises(ValueError, match="min_size, max_size"):
        SyntheticShapes(10, 64, min_size=30, max_size=20)
    with pytest.raises(IndexError, match="index"):
        SyntheticShapes(3, 64)[3]


def test_collate_and_hflip():
    ds = SyntheticShapes(4, 64, seed=0)
    items = [ds[i] for i in range(4)]
    images, rows = collate(items)
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert rows.shape == (sum(len(l) for _, l in items), 6)
    assert rows[:, 0].tolist() == [float(i) for i, (_, l) in enumerate(items) for _ in range(len(l))]
    im, lab = items[0]
    fim, flab = hflip(im, lab)
    assert torch.equal(fim[..., 0], im[..., -1])
    assert torch.allclose(flab[:, 1], 1 - lab[:, 1]) and torch.equal(flab[:, 2:], lab[:, 2:])


def _write_yolo(root, labels, size=(40, 60), classes=None):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for name, text in labels.items():
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        if text is not None:
            (root / "labels" / f"{name}.txt").write_text(text)
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_yolo_txt_loader_reads_a_tiny_dataset(tmp_path):
    root = _write_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.4\n2 0.25 0.75 0.1 0.1\n", "b": "\n1 0.1 0.2 0.1 0.2\n",
                                         "c": None}, classes=["cat", "dog", "bird"])
    ds = YoloTxtDataset(str(root), img_size=64)
    assert len(ds) == 3 and ds.names == ("cat", "dog", "bird") and ds.num_classes == 3
    img, lab = ds[0]
    assert img.shape == (3, 64, 64) and img.dtype == torch.uint8
    assert torch.allclose(lab, torch.tensor([[0, 0.5, 0.5, 0.2, 0.4], [2, 0.25, 0.75, 0.1, 0.1]]))
    assert torch.allclose(ds[1][1], torch.tensor([[1, 0.1, 0.2, 0.1, 0.2]]))
    assert ds[2][1].shape == (0, 5)  # no label file: an image without objects
    assert isinstance(open_dataset(str(root), 64), YoloTxtDataset)


def test_yolo_txt_loader_names_without_classes_file(tmp_path):
    root = _write_yolo(tmp_path / "ds", {"a": "4 0.5 0.5 0.2 0.4\n"})
    assert YoloTxtDataset(str(root)).names == ("0", "1", "2", "3", "4")


@pytest.mark.parametrize(
    "line, message",
    [
        ("0 0.5 0.5 0.2", "expected 5 values"),
        ("0 0.5 0.5 0.2 0.1 0.3", "expected 5 values"),
        ("0 0.5 x 0.2 0.1", "expected numbers"),
        ("-1 0.5 0.5 0.2 0.1", "non-negative integer class"),
        ("1.5 0.5 0.5 0.2 0.1", "non-negative integer class"),
        ("0 1.5 0.5 0.2 0.1", "normalized to 0..1"),
        ("0 0.5 0.5 0.0 0.1", "positive width and height"),
        ("0 nan 0.5 0.2 0.1", "finite"),
    ],
)
def test_malformed_label_line_names_file_and_line(tmp_path, line, message):
    root = _write_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2\n", "b": "1 0.5 0.5 0.2 0.2\n\n" + line + "\n"})
    with pytest.raises(ValueError, match=message) as e:
        YoloTxtDataset(str(root))
    assert f"{root / 'labels' / 'b.txt'}:3:" in str(e.value)


def test_label_class_beyond_classes_file(tmp_path):
    root = _write_yolo(tmp_path / "ds", {"a": "2 0.5 0.5 0.2 0.2\n"}, classes=["x", "y"])
    with pytest.raises(ValueError, match=r"a\.txt:1: expected a non-negative integer class below 2"):
        YoloTxtDataset(str(root))


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        YoloTxtDataset(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty" / "images")):
        YoloTxtDataset(str(tmp_path / "empty"))
    root = _write_yolo(tmp_path / "nolabels", {"a": None})
    (root / "labels").rmdir()
    with pytest.raises(FileNotFoundError, match="labels folder"):
        YoloTxtDataset(str(root))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(str(tmp_path / "nothing_here"), 64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CocoJsonDataset(str(tmp_path / "x.json"))
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        parse_yolo_label_file(tmp_path / "missing.txt")


def test_unreadable_image_names_the_file(tmp_path):
    root = _write_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2\n"})
    (root / "images" / "broken.jpg").write_bytes(b"not an image")
    # when the dataset is built, not when the image is first read during training
    with pytest.raises(ValueError, match="broken.jpg: cannot read the image"):
        YoloTxtDataset(str(root))


def test_image_spoilt_after_the_dataset_was_built_names_the_file(tmp_path):
    root = _write_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2\n", "b": None})
    ds = YoloTxtDataset(str(root))
    (root / "images" / "b.png").write_bytes(b"not an image any more")
    with pytest.raises(ValueError, match="b.png: cannot read the image"):
        ds[1]


def _coco_doc():
    return {
        "images": [{"id": 10, "file_name": "p.png", "width": 60, "height": 40},
                   {"id": 11, "file_name": "q.png", "width": 60, "height": 40}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 9, "bbox": [6, 4, 12, 8], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 5, "bbox": [30, 20, 30, 20]},
            {"id": 3, "image_id": 11, "category_id": 5, "bbox": [0, 0, 60, 40], "iscrowd": 1},
            {"id": 4, "image_id": 11, "category_id": 9, "bbox": [-10, 30, 20, 20]},
        ],
        "categories": [{"id": 9, "name": "nine"}, {"id": 5, "name": "five"}],
    }


def test_coco_loader_reads_a_tiny_dataset(tmp_path):
    rng = np.random.default_rng(1)
    for n in ("p", "q"):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / f"{n}.png")
    (tmp_path / "ann.json").write_text(json.dumps(_coco_doc()))
    ds = open_dataset(str(tmp_path / "ann.json"), 32)
    assert isinstance(ds, CocoJsonDataset)
    assert ds.names == ("five", "nine") and len(ds) == 2
    img, lab = ds[0]
    assert img.shape == (3, 32, 32)
    # bbox [6, 4, 12, 8] of a 60 x 40 image -> centre (12, 8) -> (0.2, 0.2), size (0.2, 0.2); id 9 -> class 1
    expected = torch.tensor([[1, 0.2, 0.2, 0.2, 0.2], [0, 0.75, 0.75, 0.5, 0.5]])
    assert torch.allclose(lab, expected)
    # crowd skipped; the box sticking out on the left clipped to x 0..10, y 30..40
    assert torch.allclose(ds[1][1], torch.tensor([[1, 5 / 60, 35 / 40, 10 / 60, 10 / 40]]))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["annotations"][2].pop("bbox"), r"annotations\[2\]: expected 'image_id'"),
        (lambda d: d["annotations"][1].update(image_id=99), r"annotations\[1\]: image_id 99"),
        (lambda d: d["annotations"][3].update(category_id=7), r"annotations\[3\]: category_id 7"),
        (lambda d: d["annotations"][0].update(bbox=[1, 1, 0, 5]), r"annotations\[0\]: expected a finite bbox"),
        (lambda d: d["images"][1].pop("width"), r"images\[1\]: expected 'id'"),
        (lambda d: d.pop("categories"), "expected a list under 'categories'"),
    ],
)
def test_coco_malformed_names_file_and_entry(tmp_path, edit, message):
    doc = _coco_doc()
    edit(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message) as e:
        CocoJsonDataset(str(path))
    assert str(path) in str(e.value)


def test_coco_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{ not json")
    with pytest.raises(ValueError, match=r"bad\.json: not valid json \(line 1"):
        CocoJsonDataset(str(path))


def test_coco_missing_image_file(tmp_path):
    # q.png is listed but absent: an error when the dataset is built, naming the entry and the file
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    (tmp_path / "ann.json").write_text(json.dumps(_coco_doc()))
    with pytest.raises(FileNotFoundError, match=r"images\[1\]: image file .*q\.png does not exist"):
        CocoJsonDataset(str(tmp_path / "ann.json"))


def test_coco_image_that_is_not_an_image(tmp_path):
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    (tmp_path / "q.png").write_text("a text file named like an image")
    (tmp_path / "ann.json").write_text(json.dumps(_coco_doc()))
    with pytest.raises(ValueError, match=r"images\[1\]: .*q\.png: cannot read the image"):
        CocoJsonDataset(str(tmp_path / "ann.json"))


def test_coco_without_categories(tmp_path):
    doc = _coco_doc()
    doc["categories"], doc["annotations"] = [], []
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="expected at least one category under 'categories'"):
        CocoJsonDataset(str(tmp_path / "ann.json"))
