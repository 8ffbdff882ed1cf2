"""Pictures of a demo run: loss curves per component (matplotlib) and a grid of predictions (Pillow)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = ((255, 64, 64), (64, 220, 64), (64, 128, 255), (255, 200, 0), (255, 0, 255),
           (0, 230, 230), (255, 140, 0), (160, 100, 255))


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) < 2:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    end = np.arange(1, len(v) + 1)
    start = np.maximum(0, end - window)  # trailing mean over at most `window` points
    return (c[end] - c[start]) / (end - start)


def loss_curves(history: Dict[str, List[float]], path: Path, title: str = "") -> Path:
    """One panel per loss component (and the total) against the step: raw values faint, the
    trailing mean bold; log scale when the values span more than a factor 20."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = history["step"]
    keys = [k for k in history if k not in ("step", "lr")]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    window = max(1, len(steps) // 50)
    for ax, key in zip(axes.flat, keys):
        vals = np.asarray(history[key], dtype=np.float64)
        ax.plot(steps, vals, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(vals, window), color="tab:blue", linewidth=1.8)
        pos = vals[vals > 0]
        if len(pos) and pos.max() / max(pos.min(), 1e-12) > 20:
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw_predictions(image: torch.Tensor, pred: Dict[str, torch.Tensor], gt: torch.Tensor,
                     names: Sequence[str], scale: int = 2, score_threshold: float = 0.3) -> Image.Image:
    """One image (uint8 ``[3, H, W]``) upscaled by ``scale``, ground truth in thin white,
    predictions above ``score_threshold`` in their class colour with ``name score``."""
    h, w = image.shape[-2:]
    im = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((w * scale, h * scale), Image.NEAREST)
    draw = ImageDraw.Draw(im)
    for cls, cx, cy, bw, bh in gt.tolist():
        draw.rectangle(((cx - bw / 2) * w * scale, (cy - bh / 2) * h * scale,
                        (cx + bw / 2) * w * scale, (cy + bh / 2) * h * scale), outline=(255, 255, 255), width=1)
    for (x1, y1, x2, y2), s, c in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
        if s < score_threshold:
            continue
        colour = COLOURS[int(c) % len(COLOURS)]
        draw.rectangle((x1 * scale, y1 * scale, x2 * scale, y2 * scale), outline=colour, width=2)
        name = names[int(c)] if int(c) < len(names) else str(int(c))
        draw.text((x1 * scale + 2, max(0.0, y1 * scale - 11)), f"{name} {s:.2f}", fill=colour)
    return im


def predictions_grid(images: Sequence[torch.Tensor], preds: Sequence[Dict[str, torch.Tensor]],
                     gts: Sequence[torch.Tensor], names: Sequence[str], path: Path, cols: int = 4,
                     scale: int = 2) -> Path:
    """A grid of :func:`draw_predictions` tiles saved as PNG."""
    tiles = [draw_predictions(im, p, g, names, scale) for im, p, g in zip(images, preds, gts)]
    if not tiles:
        raise ValueError("images: expected at least one image for the predictions grid, got none")
    cols = min(cols, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    tw, th = tiles[0].size
    pad = 4
    grid = Image.new("RGB", (cols * (tw + pad) + pad, rows * (th + pad) + pad), (30, 30, 30))
    for k, t in enumerate(tiles):
        grid.paste(t, (pad + (k % cols) * (tw + pad), pad + (k // cols) * (th + pad)))
    path = Path(path)
    grid.save(path)
    return path
