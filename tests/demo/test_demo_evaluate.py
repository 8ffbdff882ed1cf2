"""Demo evaluation: NMS against the sequential greedy loop, decoding of each head, COCO mAP."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from detloss.tools.demo.evaluate import batched_nms, coco_map, decode, nms, postprocess
from detloss.tools.demo.models import Detector


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _greedy_reference(boxes, scores, thr):
    """The textbook loop: best remaining box, drop what overlaps it by more than thr."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = []
    removed = set()
    for i in order:
        if i in removed:
            continue
        keep.append(i)
        for j in order:
            if j not in removed and j != i and _iou(boxes[i], boxes[j]) > thr:
                removed.add(j)
    return keep


def _random_boxes(n, seed, spread=60.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * spread
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 30 + 1
    return torch.cat((xy, xy + wh), 1), torch.rand(n, generator=g, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), seed=st.integers(0, 10_000), thr=st.sampled_from([0.1, 0.3, 0.5, 0.7]))
def test_nms_equals_the_greedy_loop(n, seed, thr):
    boxes, scores = _random_boxes(n, seed)
    keep = nms(boxes, scores, thr)
    assert keep.tolist() == _greedy_reference(boxes.tolist(), scores.tolist(), thr)


def test_nms_long_suppression_chain():
    # a chain where each box overlaps only its neighbours: kept, dropped, kept, dropped, ...
    boxes = torch.tensor([[i * 6.0, 0.0, i * 6.0 + 10.0, 10.0] for i in range(12)])
    scores = torch.linspace(1.0, 0.1, 12)
    assert nms(boxes, scores, 0.2).tolist() == list(range(0, 12, 2))
    assert nms(boxes, scores, 0.2).tolist() == _greedy_reference(boxes.tolist(), scores.tolist(), 0.2)


def test_nms_edge_cases():
    empty = torch.zeros((0, 4))
    assert nms(empty, torch.zeros(0), 0.5).tolist() == []
    same = torch.tensor([[0.0, 0, 10, 10]] * 3)
    assert nms(same, torch.tensor([0.2, 0.9, 0.5]), 0.5).tolist() == [1]
    with pytest.raises(ValueError, match="boxes: expected shape"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="scores: expected shape"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)


def test_batched_nms_keeps_other_labels():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([0, 0, 1]), 0.5).tolist() == [0, 2]
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 2]), 0.5).tolist() == [0, 1, 2]


def _zero_outputs(model, batch=1):
    out = model(torch.zeros(batch, 3, model.img_size, model.img_size))
    if model.loss == "fcos":
        c, r, z, sizes = out
        return (torch.zeros_like(c), torch.zeros_like(r), torch.zeros_like(z), sizes)
    return [torch.zeros_like(o) for o in out]


def test_decode_yolov5_prior_box():
    m = Detector("yolov5", 2, 64).eval()
    out = _zero_outputs(m)
    out[1][0, 2, 3, 1, :4] = torch.tensor([math.log(3.0), 0.0, 0.0, math.log(3.0)])  # sigmoid 0.75, 0.5
    boxes, scores = decode("yolov5", out, m.config)
    # level 1 (stride 16, 4x4 grid), anchor 2, cell (y 3, x 1): flat index 64 + 2*16 + 3*4 + 1
    k = 8 * 8 * 3 + 2 * 16 + 3 * 4 + 1
    aw, ah = m.config["anchors"][1][4:6]
    cx, cy = (0.75 * 2 - 0.5 + 1) * 16, (0.5 * 2 - 0.5 + 3) * 16
    w, h = aw, (1.5 ** 2) * ah
    assert torch.allclose(boxes[0, k], torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    assert torch.allclose(scores[0, k], torch.tensor([0.25, 0.25]))  # obj 0.5 * cls 0.5
    assert boxes.shape == (1, 3 * (64 + 16 + 4), 4)


def test_decode_yolov3_darknet_layout():
    m = Detector("yolov3", 2, 64).eval()
    out = _zero_outputs(m)
    no = 7
    out[0][0, 1 * no + 2, 1, 0] = math.log(2.0)  # layer 0 (stride 32, 2x2), anchor slot 1, tw, cell (1, 0)
    out[0][0, 1 * no + 5, 1, 0] = 20.0  # class 0 certain
    boxes, scores = decode("yolov3", out, m.config)
    k = 1 * 4 + 1 * 2 + 0
    aw, ah = m.config["anchors"][m.config["masks"][0][1]]
    cx, cy = 0.5 * 32, 1.5 * 32
    assert torch.allclose(boxes[0, k], torch.tensor([cx - aw, cy - ah / 2, cx + aw, cy + ah / 2]))
    assert torch.allclose(scores[0, k], torch.tensor([0.5, 0.25]))


def test_decode_fcos_points():
    m = Detector("fcos", 3, 64).eval()
    c, r, z, sizes = _zero_outputs(m)
    r[0, 8 * 2 + 5] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # level 0 (stride 8), point (y 2, x 5)
    c[0, 8 * 2 + 5, 1] = 20.0
    z[0, 8 * 2 + 5, 0] = 20.0
    boxes, scores = decode("fcos", (c, r, z, sizes), m.config)
    px, py = 5 * 8, 2 * 8
    assert torch.allclose(boxes[0, 8 * 2 + 5], torch.tensor([px - 8.0, py - 16.0, px + 24.0, py + 32.0]))
    assert torch.allclose(scores[0, 8 * 2 + 5], torch.tensor([0.5 ** 0.5 * 1, 1.0, 0.5 ** 0.5]), atol=1e-6)


def test_decode_yolov8_dfl_expectation():
    m = Detector("yolov8", 2, 64, reg_max=4).eval()
    out = _zero_outputs(m)
    # level 2 (stride 32, 2x2), cell (0, 1): left side all mass on bin 3, others uniform (expectation 1.5)
    out[2][0, 0:4, 0, 1] = torch.tensor([-50.0, -50.0, -50.0, 50.0])
    out[2][0, 16 + 1, 0, 1] = 50.0
    boxes, scores = decode("yolov8", out, m.config)
    k = 64 + 16 + 1
    px, py = 1.5 * 32, 0.5 * 32
    assert torch.allclose(boxes[0, k], torch.tensor([px - 3 * 32, py - 1.5 * 32, px + 1.5 * 32, py + 1.5 * 32]))
    assert torch.allclose(scores[0, k], torch.tensor([0.5, 1.0]))


def test_postprocess_threshold_and_nms():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [1, 1, 11, 11], [40, 40, 50, 50], [-5, -5, 70, 70]]])
    scores = torch.tensor([[[0.9, 0.0], [0.8, 0.0], [0.0, 0.6], [0.0005, 0.0]]])
    (res,) = postprocess(boxes, scores, img_size=64, conf_threshold=0.001, iou_threshold=0.5)
    assert res["labels"].tolist() == [0, 1]
    assert torch.allclose(res["scores"], torch.tensor([0.9, 0.6]))
    assert torch.equal(res["boxes"], torch.tensor([[0.0, 0, 10, 10], [40, 40, 50, 50]]))


def _gt():
    return [torch.tensor([[0, 0.25, 0.25, 0.2, 0.2], [1, 0.7, 0.6, 0.3, 0.2]]), torch.tensor([[1, 0.5, 0.5, 0.4, 0.4]])]


def _perfect(gt, size, shift=0.0):
    out = []
    for g in gt:
        cx, cy, w, h = (g[:, 1:] * size).unbind(1)
        boxes = torch.stack((cx - w / 2 + shift, cy - h / 2, cx + w / 2 + shift, cy + h / 2), 1)
        out.append({"boxes": boxes, "scores": torch.linspace(0.9, 0.8, len(g)), "labels": g[:, 0].long()})
    return out


def test_coco_map_perfect_and_shifted():
    gt = _gt()
    m = coco_map(_perfect(gt, 100), gt, 100, ["a", "b"])
    assert m["map50"] == pytest.approx(1.0) and m["map50_95"] == pytest.approx(1.0)
    assert m["ap50_per_class"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    # shifting every box by 40% of the smallest width: IoU 0.6/1.4 = 0.43 for "a" -> not a match at 0.5
    shifted = coco_map(_perfect(gt, 100, shift=8.0), gt, 100, ["a", "b"])
    assert shifted["ap50_per_class"]["a"] == pytest.approx(0.0)
    assert 0.0 < shifted["map50"] < 1.0 and shifted["map50_95"] < shifted["map50"]


def test_coco_map_no_detections_and_wrong_label():
    gt = _gt()
    none = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    assert coco_map(none, gt, 100, ["a", "b"])["map50"] == 0.0
    wrong = _perfect(gt, 100)
    for p in wrong:
        p["labels"] = 1 - p["labels"]
    assert coco_map(wrong, gt, 100, ["a", "b"])["map50"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="predictions: expected one entry per ground-truth image"):
        coco_map(none[:1], gt, 100, ["a", "b"])
