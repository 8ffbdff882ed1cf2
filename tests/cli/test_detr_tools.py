"""``detloss assign detr`` and ``detloss explain matching-cost``: the pairs and the cost numbers
are those worked out here by hand (plain Python: the L1 and GIoU of each query-box pair, the
class cost, and a brute force over every one-to-one assignment), the PNG is written, and bad
input is reported."""
from __future__ import annotations

import itertools
import json
import math

import pytest
from PIL import Image

from detloss.tools.assign_detr import detr_matching, grid_queries
from detloss.tools.cli import main


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def giou(a, b):
    """GIoU of two cxcywh boxes, by the formula."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw, ih = max(0.0, min(ax2, bx2) - max(ax1, bx1)), max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    c = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (c - union) / c


def by_hand(queries, logits, targets, w_class=1.0, w_bbox=5.0, w_giou=2.0):
    """DETR's cost matrix (softmax class cost) and its least-cost assignment, brute force."""
    cost = []
    for qb, lg in zip(queries, logits):
        z = sum(math.exp(v) for v in lg)
        row = []
        for t in targets:
            label, box = int(t[0]), t[1:]
            l1 = sum(abs(u - v) for u, v in zip(qb, box))
            row.append(w_bbox * l1 - w_class * math.exp(lg[label]) / z - w_giou * giou(qb, box))
        cost.append(row)
    n = len(targets)
    best = min(itertools.permutations(range(len(queries)), n), key=lambda qs: sum(cost[q][j] for j, q in enumerate(qs)))
    return cost, {j: q for j, q in enumerate(best)}


LABELS = "0 0.3 0.3 0.2 0.25\n2 0.7 0.6 0.3 0.4\n1 0.52 0.5 0.05 0.05\n"


def test_assign_detr_pairs_and_costs_by_hand(tmp_path, capsys):
    labels = tmp_path / "l.txt"
    labels.write_text(LABELS)
    png = tmp_path / "m.png"
    rc, out, err = run_cli(capsys, "assign", "detr", "--labels", str(labels), "--queries", "9", "--png", str(png),
                           "--json")
    assert rc == 0, err
    data = json.loads(out)
    targets = [[float(v) for v in line.split()] for line in LABELS.strip().splitlines()]
    k = 3  # a 3 x 3 grid of boxes 1/3 wide
    queries = [[(i % k + 0.5) / k, (i // k + 0.5) / k, 1 / k, 1 / k] for i in range(9)]
    logits = [[0.0] * 4 for _ in queries]  # 3 classes + no-object, all equal
    cost, pairs = by_hand(queries, logits, targets)
    got = {r["gt"]: r for r in data["records"]}
    assert {j: r["query"] for j, r in got.items()} == pairs
    for j, r in got.items():
        assert r["cost"] == pytest.approx(cost[r["query"]][j], rel=1e-9)
        assert r["c_class"] == pytest.approx(-0.25)
    assert Image.open(png).size[0] > 100
    rc, text, _ = run_cli(capsys, "assign", "detr", "--labels", str(labels), "--queries", "9")
    assert rc == 0 and "query box" in text and f"{got[0]['cost']:.4f}" in text and "6 queries learn no-object" in text


def test_assign_detr_with_predictions_and_more_boxes_than_queries(tmp_path, capsys):
    labels = tmp_path / "l.txt"
    labels.write_text(LABELS)
    preds = tmp_path / "p.txt"
    preds.write_text("0.7 0.6 0.3 0.4 0 0 5\n0.3 0.3 0.2 0.2 4 0 0\n")  # two queries, 3 class logits each
    rc, out, err = run_cli(capsys, "assign", "detr", "--labels", str(labels), "--predictions", str(preds), "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert {r["gt"]: r["query"] for r in data["records"]} == {0: 1, 1: 0}
    assert any("1 boxes unmatched" in n for n in data["notes"])


def test_assign_detr_bad_input(tmp_path, capsys):
    labels = tmp_path / "l.txt"
    labels.write_text(LABELS)
    preds = tmp_path / "p.txt"
    preds.write_text("0.5 0.5 0.2 0.2\n0.5 0.5 0.2\n")
    rc, _, err = run_cli(capsys, "assign", "detr", "--labels", str(labels), "--predictions", str(preds))
    assert rc == 2 and str(preds) in err and "row 2" in err and "same number of values" in err
    rc, _, err = run_cli(capsys, "assign", "detr", "--labels", str(labels), "--queries", "4", "--predictions", str(preds))
    assert rc == 2 and "either --queries" in err
    rc, _, err = run_cli(capsys, "assign", "detr", "--labels", str(labels), "--anchor-t", "3")
    assert rc == 2 and "--anchor-t" in err and "detr" in err
    rc, _, err = run_cli(capsys, "assign", "yolov5", "--labels", str(labels), "--queries", "4")
    assert rc == 2 and "--queries" in err and "set-prediction losses" in err and "yolov5" in err
    with pytest.raises(ValueError, match="queries: expected an int >= 1"):
        grid_queries(0, 3)


def test_assign_rtdetr_uses_the_focal_costs(tmp_path, capsys):
    labels = tmp_path / "l.txt"
    labels.write_text(LABELS)
    rc, out, err = run_cli(capsys, "assign", "rtdetr", "--labels", str(labels), "--queries", "9", "--json")
    assert rc == 0, err
    assert "class 2 (focal)" in json.loads(out)["notes"][0]


def test_focal_matching_uses_rtdetr_costs():
    v = detr_matching([[0, 0.3, 0.3, 0.2, 0.25]], (100, 100), num_queries=4, focal=True)
    assert v.records[0]["c_class"] == pytest.approx(0.25 * 0.25 * math.log(2) - 0.75 * 0.25 * math.log(2), rel=1e-6)


def test_explain_matching_cost_worked_by_hand(capsys):
    queries = [[2.0, -1.0, 0.0, 0.3, 0.3, 0.2, 0.2], [0.0, 1.0, 0.0, 0.7, 0.6, 0.3, 0.4]]
    targets = [[1, 0.68, 0.62, 0.3, 0.35], [0, 0.3, 0.28, 0.2, 0.25]]
    q_text = "; ".join(",".join(str(v) for v in q) for q in queries)
    t_text = "; ".join(",".join(str(v) for v in t) for t in targets)
    rc, out, err = run_cli(capsys, "explain", "detr-matching", "--input", q_text, "--target", t_text)
    assert rc == 0, err
    cost, pairs = by_hand([q[3:] for q in queries], [q[:3] for q in queries], targets)
    for row in cost:
        for v in row:
            assert f"{v:.4f}" in out
    assert pairs == {0: 1, 1: 0}
    assert "query 1 -> box 0" in out and "query 0 -> box 1" in out
    # a claim made with ultralytics' 1 - GIoU cost is recognised
    claim = ",".join(f"{v + 2.0:.4f}" for row in cost for v in row)
    rc, out, _ = run_cli(capsys, "explain", "detr-matching", "--input", q_text, "--target", t_text, "--expect", claim)
    assert rc == 1 and "convention='ultralytics'" in out
