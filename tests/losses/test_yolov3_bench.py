"""Smoke test of the YOLOv3 benchmark (tiny sizes): it runs, checks baseline == library, prints its table."""
from detloss_bench.yolov3 import loop_best_truth_iou, main, make_inputs
from detloss.assign import darknet


def test_bench_quick(capsys):
    assert main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "per-truth loop ignore (baseline)" in out and "vectorized" in out


def test_loop_baseline_equals_vectorized_pass():
    inputs, targets = make_inputs(2, 64, 3, 5, seed=1)
    pred = darknet._decode_darknet(inputs[2].detach().reshape(2, 3, 8, 8, 8), darknet.torch.tensor(
        [(10.0, 13.0), (16.0, 30.0), (33.0, 23.0)]), (64, 64)).reshape(2, -1, 4)
    boxes, rows = darknet._pad_truths(targets, 2)
    a = darknet._best_truth_iou(pred, boxes, rows >= 0)
    b = loop_best_truth_iou(pred, boxes, rows >= 0)
    assert (a[0] > 0).any()
    assert darknet.torch.equal(a[0], b[0]) and darknet.torch.equal(a[1], b[1])
