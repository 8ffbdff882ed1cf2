"""``detloss assign retinanet|ssd``: the tables and pictures of the IoU matchers (matched anchors,
the ignored band between RetinaNet's thresholds, SSD's forced matches and mined negatives).

The decisions come from the losses' own assign() (checked against torchvision's matchers in
tests/assign/test_iou_matcher.py and the reference tests); here: that the table shows them."""
from __future__ import annotations

import json

import torch

from detloss.anchor_generators import AnchorGenerator, feature_sizes_for
from detloss.assign.iou_matcher import assign_iou
from detloss.tools.cli import main
from detloss.tools.viz import assign_view, assignment_picture

ROWS = [[0, 0.3, 0.4, 0.2, 0.3], [1, 0.7, 0.6, 0.05, 0.05], [2, 0.5, 0.5, 0.6, 0.1]]
SIZE = (256, 256)


def rows_pixels(size):
    h, w = size
    out = []
    for _, cx, cy, bw, bh in ROWS:
        out.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
    return torch.tensor(out, dtype=torch.float64)


def test_retinanet_table_is_the_matcher():
    v = assign_view("retinanet", ROWS, SIZE)
    assert [lv.name for lv in v.levels] == ["P3", "P4", "P5", "P6", "P7"]
    anchors = AnchorGenerator()(feature_sizes_for(SIZE, (8, 16, 32, 64, 128)), SIZE, dtype=torch.float64)
    asg = assign_iou([{"boxes": rows_pixels(SIZE), "labels": torch.tensor([0, 1, 2])}], anchors)
    positives = [r for r in v.records if r["status"] == "positive"]
    ignored = [r for r in v.records if r["status"] == "ignored"]
    assert len(positives) == asg.num_pos and len(ignored) == int(asg.ignore.sum())
    # every record's anchor box is the anchor at its place
    for r in positives[:20]:
        k = [i for i, lv in enumerate(v.levels) if lv.name == r["level_name"]][0]
        aw, ah = r["anchor_wh"]
        assert any(
            abs((a[0] + a[2]) / 2 - r["x"]) < 1e-9 and abs((a[1] + a[3]) / 2 - r["y"]) < 1e-9
            and abs(a[2] - a[0] - aw) < 1e-9 and abs(a[3] - a[1] - ah) < 1e-9
            for a in anchors.tolist()
        ), (k, r)
    # the small box 1 only gets low-quality matches
    small = [r for r in positives if r["gt"] == 1]
    assert small and all(r["note"].startswith("low-quality") for r in small)
    assert all(r["note"].startswith("IoU") for r in positives if r["gt"] == 0)


def test_ssd_table_shows_forced_matches_and_mined_negatives():
    v = assign_view("ssd", ROWS, (300, 300))
    pos = [r for r in v.records if r["status"] == "positive"]
    mined = [r for r in v.records if r["status"] == "mined"]
    assert len(mined) == 3 * len(pos)  # neg_to_pos_ratio 3
    assert all(r["gt"] == -1 and "hard negative" in r["note"] for r in mined)
    assert any(r["note"].startswith("forced") for r in pos)
    assert {r["class"] for r in pos} == {0, 1, 2}  # the rows' classes (labels 1..3 in the loss)


def test_command_prints_the_table_and_writes_the_picture(tmp_path, capsys):
    labels = tmp_path / "img.txt"
    labels.write_text("".join(" ".join(str(v) for v in r) + "\n" for r in ROWS))
    png = tmp_path / "r.png"
    assert main(["assign", "retinanet", "--labels", str(labels), "--size", "256", "256", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "retinanet assignment" in out and "ignored" in out and "low-quality" in out
    assert png.stat().st_size > 0
    assert main(["assign", "ssd", "--labels", str(labels), "--size", "300", "300", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["status"] for r in data["records"]} == {"positive", "mined"}


def test_pictures_have_one_panel_per_level():
    pic = assignment_picture("retinanet", ROWS, size=SIZE, panel=100)
    assert pic.size[0] > 5 * 100
    pic = assignment_picture("ssd", ROWS, size=(300, 300), panel=100)
    assert pic.size[0] > 6 * 100
