"""``detloss assign``: on known boxes the table lists the cells / anchors / points that the rules
of each scheme give when worked out independently here (plain Python, one box at a time), the
PNG is written, and bad paths or malformed label lines are reported with the file and line."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from detloss.tools.cli import main
from detloss.tools.viz import (
    COCO_ANCHORS,
    DARKNET_MASKS,
    PALETTE,
    assignment_picture,
    assignment_table,
    read_yolo_labels,
)


def run_cli(capsys, *argv):
    rc = main(["assign", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def write_labels(tmp_path, text, name="labels.txt"):
    p = tmp_path / name
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------- yolov5
def yolov5_cells_by_hand(cx, cy, w, h, size, anchor_t=4.0):
    """build_targets for one box, scalar by scalar: anchors whose side ratios are all < anchor_t,
    the centre cell and the nearest horizontal and vertical neighbours (centre within half a cell
    of that border, not in the outermost cell)."""
    out = set()
    for lvl, (stride, mask) in enumerate(zip((8, 16, 32), DARKNET_MASKS)):
        ny, nx = math.ceil(size[0] / stride), math.ceil(size[1] / stride)
        gx, gy, gw, gh = cx * nx, cy * ny, w * nx, h * ny
        for a, k in enumerate(mask):
            aw, ah = COCO_ANCHORS[k][0] / stride, COCO_ANCHORS[k][1] / stride
            if max(gw / aw, aw / gw, gh / ah, ah / gh) >= anchor_t:
                continue
            # a neighbour is the cell holding the centre moved half a cell towards it
            cells = {(int(gy), int(gx))}
            if gx % 1 < 0.5 and gx > 1:
                cells.add((int(gy), math.floor(gx - 0.5)))
            if (nx - gx) % 1 < 0.5 and nx - gx > 1:
                cells.add((int(gy), math.floor(gx + 0.5)))
            if gy % 1 < 0.5 and gy > 1:
                cells.add((math.floor(gy - 0.5), int(gx)))
            if (ny - gy) % 1 < 0.5 and ny - gy > 1:
                cells.add((math.floor(gy + 0.5), int(gx)))
            out |= {(lvl, a, c[0], c[1]) for c in cells}
    return out


@pytest.mark.parametrize("box", [(0.3123, 0.5571, 0.1, 0.15), (0.81, 0.22, 0.4, 0.3), (0.05, 0.95, 0.02, 0.03)])
def test_yolov5_known_cells(box):
    size = (640, 640)
    recs = assignment_table("yolov5", [[0, *box]], size=size)
    got = {(r["level"], r["anchor"], r["gy"], r["gx"]) for r in recs}
    assert got == yolov5_cells_by_hand(*box, size)
    assert got  # every case has positives
    assert all(r["status"] == "positive" and r["gt"] == 0 for r in recs)


def test_yolov5_a_specific_box_by_hand():
    # 64 x 96 px box centred at (201.6, 357) on 640 x 640: on P4 (stride 16, 40 x 40) the centre is at
    # grid (12.6, 22.3125): own cell (22, 12), the right neighbour (22, 13) and the upper (21, 12);
    # anchors (30,61) (62,45) (59,119) in grid units all have side ratios below 4.
    recs = assignment_table("yolov5", [[0, 201.6 / 640, 357 / 640, 64 / 640, 96 / 640]], size=(640, 640))
    p4 = {(r["anchor"], r["gy"], r["gx"]) for r in recs if r["stride"] == 16}
    assert p4 == {(a, gy, gx) for a in (0, 1, 2) for gy, gx in ((22, 12), (22, 13), (21, 12))}


# ----------------------------------------------------------------------------- yolov3 (darknet)
def _iou_cxcywh(a, b):
    ix = min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2)
    iy = min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2)
    inter = ix * iy if ix > 0 and iy > 0 else 0.0
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def darknet_by_hand(box, size, ignore_thresh):
    cx, cy, w, h = box
    H, W = size
    shape_iou = [_iou_cxcywh((0, 0, w, h), (0, 0, aw / W, ah / H)) for aw, ah in COCO_ANCHORS]
    best = max(range(9), key=lambda k: (shape_iou[k], -k))
    pos, ign = set(), set()
    for lvl, (stride, mask) in enumerate(zip((8, 16, 32), DARKNET_MASKS)):
        ny, nx = H // stride, W // stride
        if best in mask:
            pos.add((lvl, mask.index(best), int(cy * ny), int(cx * nx)))
        for a, k in enumerate(mask):
            for gy in range(ny):
                for gx in range(nx):
                    prior = ((gx + 0.5) / nx, (gy + 0.5) / ny, COCO_ANCHORS[k][0] / W, COCO_ANCHORS[k][1] / H)
                    if _iou_cxcywh(prior, box) > ignore_thresh:
                        ign.add((lvl, a, gy, gx))
    return pos, ign - pos


@pytest.mark.parametrize("box,thresh", [((0.3734, 0.2812, 0.19, 0.14), 0.5), ((0.52, 0.61, 0.06, 0.09), 0.7)])
def test_yolov3_known_cells_and_ignored(box, thresh):
    size = (320, 320)
    recs = assignment_table("yolov3", [[1, *box]], size=size, ignore_thresh=thresh)
    pos = {(r["level"], r["anchor"], r["gy"], r["gx"]) for r in recs if r["status"] == "positive"}
    ign = {(r["level"], r["anchor"], r["gy"], r["gx"]) for r in recs if r["status"] == "ignored"}
    want_pos, want_ign = darknet_by_hand(box, size, thresh)
    assert len(pos) == 1 and pos == want_pos
    assert ign == want_ign
    if thresh == 0.5:
        assert ign  # the case is chosen so that some priors are ignored


# ----------------------------------------------------------------------------- fcos (torchvision)
def fcos_points_by_hand(box_px, size, strides=(8, 16, 32, 64, 128), radius=1.5):
    x1, y1, x2, y2 = box_px
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    out = set()
    for lvl, s in enumerate(strides):
        lo = 0.0 if lvl == 0 else 4 * s
        hi = math.inf if lvl == len(strides) - 1 else 8 * s
        ny, nx = math.ceil(size[0] / s), math.ceil(size[1] / s)
        sy, sx = size[0] // ny, size[1] // nx
        for gy in range(ny):
            for gx in range(nx):
                px, py = gx * sx, gy * sy
                l, t, r, b = px - x1, py - y1, x2 - px, y2 - py
                if min(l, t, r, b) <= 0 or max(abs(px - cx), abs(py - cy)) >= radius * s:
                    continue
                if lo < max(l, t, r, b) < hi:
                    out.add((lvl, gy, gx))
    return out


@pytest.mark.parametrize("box", [(100.0, 60.0, 180.0, 150.0), (20.0, 20.0, 52.0, 40.0), (10.0, 5.0, 250.0, 240.0)])
def test_fcos_known_points(box):
    size = (256, 256)
    H, W = size
    row = [0, (box[0] + box[2]) / 2 / W, (box[1] + box[3]) / 2 / H, (box[2] - box[0]) / W, (box[3] - box[1]) / H]
    recs = assignment_table("fcos", [row], size=size)
    got = {(r["level"], r["gy"], r["gx"]) for r in recs}
    assert got == fcos_points_by_hand(box, size)
    assert got
    for r in recs:  # the drawn point is where torchvision puts it
        assert (r["x"], r["y"]) == (r["gx"] * r["stride"], r["gy"] * r["stride"])


# ----------------------------------------------------------------------------- yolov8 (TAL, prior mode)
def test_yolov8_prior_mode_topk_inside_box():
    import detloss.functional as DF

    size = (256, 256)
    box = (0.4, 0.55, 0.3, 0.2)
    recs = assignment_table("yolov8", [[0, *box]], size=size)
    H, W = size
    x1, y1 = (box[0] - box[2] / 2) * W, (box[1] - box[3] / 2) * H
    x2, y2 = (box[0] + box[2] / 2) * W, (box[1] + box[3] / 2) * H
    # every anchor point strictly inside the box, with its prior box (15 strides square) and metric
    cands = []
    for lvl, s in enumerate((8, 16, 32)):
        for gy in range(H // s):
            for gx in range(W // s):
                px, py = (gx + 0.5) * s, (gy + 0.5) * s
                if min(px - x1, py - y1, x2 - px, y2 - py) > 1e-9:
                    prior = torch.tensor([px - 7.5 * s, py - 7.5 * s, px + 7.5 * s, py + 7.5 * s], dtype=torch.float64)
                    ciou = DF.aligned_box_iou(torch.tensor([x1, y1, x2, y2], dtype=torch.float64), prior, kind="ciou", convention="yolov5")
                    cands.append(((lvl, gy, gx), 0.5 ** 0.5 * float(ciou.clamp(min=0)) ** 6))
    got = {(r["level"], r["gy"], r["gx"]) for r in recs}
    assert len(got) == min(10, len(cands))
    metric = dict(cands)
    assert got <= set(metric)
    worst_in = min(metric[k] for k in got)
    best_out = max((m for k, m in cands if k not in got), default=-1.0)
    assert worst_in >= best_out * (1 - 1e-9)


# ----------------------------------------------------------------------------- the command and pictures
def test_cli_png_table_and_json(tmp_path, capsys):
    labels = write_labels(tmp_path, "0 0.3123 0.5571 0.1 0.15\n# a comment\n\n2 0.7 0.3 0.2 0.2\n")
    png = tmp_path / "out.png"
    rc, out, err = run_cli(capsys, "yolov5", "--labels", str(labels), "--png", str(png), "--size", "320", "480")
    assert rc == 0, err
    assert png.exists()
    im = Image.open(png)
    assert im.format == "PNG" and im.width > im.height
    assert "own cell" in out and "box 0" in out and "box 1" in out
    rc, out, _ = run_cli(capsys, "yolov5", "--labels", str(labels), "--size", "320", "480", "--json")
    d = json.loads(out)
    assert d["size"] == [320, 480] and {r["gt"] for r in d["records"]} == {0, 1}
    want = yolov5_cells_by_hand(0.3123, 0.5571, 0.1, 0.15, (320, 480))
    assert {(r["level"], r["anchor"], r["gy"], r["gx"]) for r in d["records"] if r["gt"] == 0} == want


@pytest.mark.parametrize("scheme", ["yolov3", "yolov5", "fcos", "yolov8"])
def test_picture_colours_assigned_cell(scheme):
    size = (256, 256)
    rows = [[0, 0.43, 0.41, 0.3, 0.35]]
    recs = assignment_table(scheme, rows, size=size)
    pic = assignment_picture(scheme, rows, size=size, panel=256)
    n_levels = {"yolov3": 3, "yolov5": 3, "fcos": 5, "yolov8": 3}[scheme]
    assert pic.size == (n_levels * 256 + (n_levels - 1) * 6, 256 + 16)
    r = next(r for r in recs if r["status"] == "positive")
    px = int(r["level"] * (256 + 6) + r["x"]) if scheme in ("fcos", "yolov8") else int(r["level"] * 262 + (r["gx"] + 0.5) * r["stride"])
    py = 16 + int(r["y"] if scheme in ("fcos", "yolov8") else (r["gy"] + 0.5) * r["stride"])
    red, green, blue = pic.getpixel((px, py))
    assert red > green + 40 and red > blue + 40  # box 0's colour (230, 25, 75) over the grey canvas
    assert PALETTE[0] == (230, 25, 75)


def test_cli_with_image_uses_its_size(tmp_path, capsys):
    img = tmp_path / "img.png"
    Image.new("RGB", (200, 120), (0, 90, 0)).save(img)
    labels = write_labels(tmp_path, "0 0.5 0.5 0.4 0.5\n")
    png = tmp_path / "a.png"
    rc, out, err = run_cli(capsys, "fcos", "--image", str(img), "--labels", str(labels), "--png", str(png))
    assert rc == 0, err
    assert "input 200x120" in out
    assert Image.open(png).getpixel((3, 16 + 100)) == (0, 90, 0)  # the image shows through


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "text,line,what",
    [
        ("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n", 2, "expected 5 values"),
        ("0 0.5 0.5 0.2 0.2\n\n1 0.5 abc 0.2 0.2\n", 3, "expected numbers"),
        ("1.5 0.5 0.5 0.2 0.2\n", 1, "integer class"),
        ("0 1.2 0.5 0.2 0.2\n", 1, "[0, 1]"),
        ("0 0.5 0.5 0 0.2\n", 1, "(0, 1]"),
    ],
)
def test_malformed_label_lines(tmp_path, capsys, text, line, what):
    labels = write_labels(tmp_path, text)
    with pytest.raises(ValueError) as exc:
        read_yolo_labels(labels)
    assert f"{labels}:{line}:" in str(exc.value) and what in str(exc.value)
    rc, _, err = run_cli(capsys, "yolov5", "--labels", str(labels))
    assert rc == 2 and f"{labels}:{line}" in err


def test_bad_paths(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    rc, _, err = run_cli(capsys, "fcos", "--labels", str(missing))
    assert rc == 2 and str(missing) in err and "labels" in err
    labels = write_labels(tmp_path, "0 0.5 0.5 0.2 0.2\n")
    rc, _, err = run_cli(capsys, "fcos", "--labels", str(labels), "--image", str(tmp_path / "no.jpg"))
    assert rc == 2 and "no.jpg" in err and "image" in err
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    rc, _, err = run_cli(capsys, "fcos", "--labels", str(labels), "--image", str(junk))
    assert rc == 2 and "junk.jpg" in err
    rc, _, err = run_cli(capsys, "fcos", "--labels", str(labels), "--png", str(tmp_path / "no_dir" / "x.png"))
    assert rc == 2 and "no_dir" in err
    rc, _, err = run_cli(capsys, "fcos", "--labels", str(labels), "--anchor-t", "3")
    assert rc == 2 and "--anchor-t" in err
    with pytest.raises(ValueError, match="scheme"):
        assignment_table("no-such-scheme", [[0, 0.5, 0.5, 0.1, 0.1]])
    with pytest.raises(ValueError, match="rows"):
        assignment_table("yolov5", [[0, 0.5, 0.5, 0.1]])


def test_empty_labels(tmp_path, capsys):
    labels = write_labels(tmp_path, "\n# nothing here\n")
    for scheme in ("yolov3", "yolov5", "fcos", "yolov8"):
        rc, out, err = run_cli(capsys, scheme, "--labels", str(labels), "--png", str(tmp_path / f"{scheme}.png"))
        assert rc == 0, err
        assert (tmp_path / f"{scheme}.png").exists()


# ----------------------------------------------------------------------------- hostile input
def _one_line_error(capsys, *argv):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2, (rc, out, err)
    assert out == "" and len(err.strip().splitlines()) == 1, err
    return err


def test_png_that_is_a_folder(tmp_path, capsys):
    labels = write_labels(tmp_path, "0 0.5 0.5 0.2 0.2\n")
    err = _one_line_error(capsys, "yolov5", "--labels", str(labels), "--png", str(tmp_path))
    assert "--png: expected the name of a PNG file" in err and str(tmp_path) in err


@pytest.mark.parametrize("value", ["nan", "inf", "1.5", "-0.1"])
def test_ignore_thresh_outside_0_1(tmp_path, capsys, value):
    labels = write_labels(tmp_path, "0 0.5 0.5 0.2 0.2\n")
    err = _one_line_error(capsys, "yolov3", "--labels", str(labels), f"--ignore-thresh={value}")
    assert "--ignore-thresh: expected an IoU threshold in [0, 1]" in err
    with pytest.raises(ValueError, match="ignore_thresh"):
        assignment_table("yolov3", [[0, 0.5, 0.5, 0.2, 0.2]], ignore_thresh=float(value))


@pytest.mark.parametrize("value", ["nan", "inf", "0"])
def test_anchor_t_not_a_positive_finite_ratio(tmp_path, capsys, value):
    labels = write_labels(tmp_path, "0 0.5 0.5 0.2 0.2\n")
    err = _one_line_error(capsys, "yolov5", "--labels", str(labels), f"--anchor-t={value}")
    assert "--anchor-t: expected a positive ratio threshold" in err


@pytest.mark.parametrize("size", [("100000", "100000"), ("640", "8193"), ("4", "640")])
def test_size_out_of_range(tmp_path, capsys, size):
    labels = write_labels(tmp_path, "0 0.5 0.5 0.2 0.2\n")
    err = _one_line_error(capsys, "yolov8", "--labels", str(labels), "--size", *size, "--png", str(tmp_path / "x.png"))
    assert "--size: expected 8 to 8192 pixels per side" in err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match="size: expected 8 to 8192"):
        assignment_table("yolov8", [[0, 0.5, 0.5, 0.2, 0.2]], size=tuple(int(s) for s in size))
