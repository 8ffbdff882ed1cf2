"""detloss.integrations.torchvision against the stock torchvision models: a short seeded training
of small FCOS, RetinaNet and SSD models, the stock ``compute_loss`` in one copy and detloss's in
the other; every step's loss dict agrees to 1e-5 relative.

torchvision 0.29.1 (the integrations environment); models built with weights=None and
weights_backbone=None (no downloads: the models' own constructors with a small convolutional
backbone, five levels for FCOS and RetinaNet, three for SSD); 128 px images.
"""
from __future__ import annotations

import copy
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead

from detloss.integrations.torchvision import model_kind, use_detloss, use_torchvision_loss

STEPS = 4
RTOL = 1e-5
SIZE = 128


class TinyFPN(nn.Module):
    """Five 32-channel feature maps at strides 8 to 128 (P3-P7), a few convolutions."""

    out_channels = 32

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 4, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU()) for _ in range(4))

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.down:
            feats.append(layer(feats[-1]))
        return OrderedDict((str(i), f) for i, f in enumerate(feats))


def fpn_backbone():
    return TinyFPN()


def small_fcos():
    return FCOS(fpn_backbone(), num_classes=5, min_size=SIZE, max_size=SIZE)


def small_retinanet(box_loss="l1"):
    sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in (16, 32, 64, 128, 256))
    gen = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    model = RetinaNet(fpn_backbone(), num_classes=5, anchor_generator=gen, min_size=SIZE, max_size=SIZE)
    model.head.regression_head._loss_type = box_loss
    return model


class TinySSDBackbone(nn.Module):
    """Three feature maps of 16, 8 and 4 cells for a 128 px input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 4, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.down1 = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU())

    def forward(self, x):
        a = self.stem(x)
        b = self.down1(a)
        return OrderedDict([("0", a), ("1", b), ("2", self.down2(b))])


def small_ssd():
    gen = DefaultBoxGenerator([[2], [2, 3], [2]], scales=[0.15, 0.35, 0.6, 0.9], steps=[8, 16, 32])
    head = SSDHead([32, 32, 32], gen.num_anchors_per_location(), num_classes=5)
    return SSD(TinySSDBackbone(), gen, (SIZE, SIZE), num_classes=5, head=head)


def batches(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
        targets = []
        for n in (3, 0 if len(out) % 3 == 2 else 2):  # an image without objects now and then
            wh = 12 + torch.rand(n, 2, generator=g) * 60
            xy = torch.rand(n, 2, generator=g) * (SIZE - wh)
            targets.append({"boxes": torch.cat((xy, xy + wh), 1), "labels": torch.randint(1, 5, (n,), generator=g)})
        out.append((images, targets))
    return out


def train(model, data):
    torch.manual_seed(1)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    history = []
    for images, targets in data:
        losses = model(images, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    return history


@pytest.mark.parametrize(
    "build, kind",
    [(small_fcos, "FCOS"), (small_retinanet, "RetinaNet"), (lambda: small_retinanet("giou"), "RetinaNet"), (small_ssd, "SSD")],
    ids=["fcos", "retinanet-l1", "retinanet-giou", "ssd"],
)
def test_training_steps_agree_with_the_stock_model(build, kind):
    torch.manual_seed(0)
    stock = build()
    ours = use_detloss(copy.deepcopy(stock))
    assert model_kind(ours) == kind
    data = batches(STEPS)
    want, got = train(stock, data), train(ours, data)
    assert len(got) == STEPS
    for step, (w, g) in enumerate(zip(want, got)):
        assert list(g) == list(w), f"step {step}: keys"
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=RTOL, abs=1e-7), f"step {step} {k}: {g[k]} vs {w[k]}"


def test_undo_and_redo():
    model = small_retinanet()
    base = type(model).compute_loss
    use_detloss(model, gains={"cls": 2.0, "box": 1.0})
    assert model.compute_loss is not base and model.compute_loss.loss.gains["cls"] == 2.0
    use_detloss(model)
    assert model.compute_loss.loss.gains["cls"] == 1.0
    use_torchvision_loss(model)
    assert "compute_loss" not in model.__dict__
    fcos = use_detloss(small_fcos())
    assert len(fcos.anchor_generator._forward_pre_hooks) == 1
    use_torchvision_loss(fcos)
    assert len(fcos.anchor_generator._forward_pre_hooks) == 0


def test_not_a_supported_model():
    with pytest.raises(TypeError, match="model: expected a torchvision FCOS, RetinaNet or SSD model"):
        use_detloss(nn.Linear(2, 2))


def test_detloss_imports_no_framework():
    code = (
        "import sys, detloss, detloss.integrations.torchvision, detloss.losses.registry\n"
        "detloss.RetinaNetLoss(3); detloss.SSDLoss(3); detloss.FCOSLoss(3)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchvision', 'ultralytics')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
