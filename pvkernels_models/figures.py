"""Labelled PNG figures, drawn with Pillow alone (no plotting library needed).

``image_grid``: a title, then sections (e.g. "CViViT, T=4: pseudo-video frames (input)"), each
a block of image rows with a label on the left of every row ("frame 0", "sample"...).
``line_plot``: a metric against the number of frames, one line per arm with mean +- std error
bars over seeds, baselines as dashed horizontal lines, axis labels, ticks and a legend.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22"]


def font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap size
        return ImageFont.load_default()


def text_width(draw, text: str, face) -> int:
    box = draw.textbbox((0, 0), text, font=face)
    return box[2] - box[0]


def image_grid(path: str | Path, title: str, sections: Sequence, scale: int = 4, columns: int = 8) -> None:
    """Writes a PNG of labelled image rows.

    Args:
        path: the PNG to write.
        title: the line on top.
        sections: ``[(heading, [(row_label, images), ...]), ...]`` with images (N, C, H, W) in
            [0, 1] (values outside are clipped for display); the first ``columns`` are shown.
        scale: pixels per image pixel.
    """
    from PIL import Image, ImageDraw

    rows = [(label, imgs) for _, block in sections for label, imgs in block]
    if not rows:
        raise ValueError("image_grid: nothing to draw")
    H, W = rows[0][1].shape[-2:]
    cell_h, cell_w = H * scale, W * scale
    small, big = font(12), font(15)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 12 + max(text_width(probe, label, small) for label, _ in rows)
    width = max(label_w + columns * (cell_w + 2) + 8, text_width(probe, title, big) + 16,
                *(text_width(probe, h, small) + 16 for h, _ in sections))
    height = 30 + sum(22 + len(block) * (cell_h + 2) for _, block in sections) + 6
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill="black", font=big)
    y = 30
    for heading, block in sections:
        draw.text((8, y + 4), heading, fill="#303030", font=small)
        y += 22
        for label, imgs in block:
            imgs = imgs[:columns].detach().float().cpu().clamp(0, 1)
            draw.text((8, y + cell_h // 2 - 7), label, fill="#505050", font=small)
            for i, img in enumerate(imgs):
                array = (img.expand(3, -1, -1) * 255).round().byte().permute(1, 2, 0).numpy()
                tile = Image.fromarray(array, "RGB").resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(tile, (label_w + i * (cell_w + 2), y))
            y += cell_h + 2
    canvas.save(path)


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    span = hi - lo if hi > lo else abs(hi) or 1.0
    raw = span / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_plot(path: str | Path, title: str, xlabel: str, ylabel: str, series: Sequence,
              baselines: Sequence = ()) -> None:
    """Writes a PNG line plot with error bars.

    Args:
        series: ``[(label, xs, means, stds), ...]`` (stds may hold None where unknown).
        baselines: ``[(label, mean, std), ...]``, drawn as dashed horizontal lines (std as a band edge).
    """
    from PIL import Image, ImageDraw

    small, big = font(12), font(15)
    W, H, left, right, top, bottom = 900, 440, 80, 330, 40, 56
    xs_all = [x for _, xs, _, _ in series for x in xs]
    ys = [m + s * sign for _, _, ms, ss in series for m, s in zip(ms, ss) for sign in (-1, 1) if s is not None]
    ys += [m for _, _, ms, _ in series for m in ms] + [b[1] for b in baselines]
    ys += [b[1] + b[2] * sign for b in baselines if b[2] is not None for sign in (-1, 1)]
    if not xs_all or not ys:
        raise ValueError("line_plot: nothing to draw")
    x_lo, x_hi = min(xs_all), max(xs_all)
    if x_lo == x_hi:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    pad = 0.08 * (x_hi - x_lo)
    x_lo, x_hi = x_lo - pad, x_hi + pad
    y_lo, y_hi = min(ys), max(ys)
    margin = 0.08 * (y_hi - y_lo) if y_hi > y_lo else (abs(y_hi) or 1.0) * 0.1
    y_lo, y_hi = y_lo - margin, y_hi + margin
    px = lambda x: left + (x - x_lo) / (x_hi - x_lo) * (W - left - right)  # noqa: E731
    py = lambda y: H - bottom - (y - y_lo) / (y_hi - y_lo) * (H - top - bottom)  # noqa: E731
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 10), title, fill="black", font=big)
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for x in sorted(set(xs_all)):
        draw.line([px(x), H - bottom, px(x), H - bottom + 5], fill="black")
        label = f"{x:g}"
        draw.text((px(x) - text_width(draw, label, small) / 2, H - bottom + 8), label, fill="black", font=small)
    for y in _ticks(y_lo, y_hi):
        draw.line([left - 5, py(y), left, py(y)], fill="black")
        draw.line([left + 1, py(y), W - right - 1, py(y)], fill="#eeeeee")
        label = f"{y:.4g}"
        draw.text((left - 8 - text_width(draw, label, small), py(y) - 7), label, fill="black", font=small)
    draw.text(((left + W - right) / 2 - text_width(draw, xlabel, small) / 2, H - 24), xlabel, fill="black", font=small)
    draw.text((8, top - 18), ylabel, fill="black", font=small)
    legend_y = top
    for i, (label, mean, std) in enumerate(baselines):
        color = PALETTE[(len(series) + i) % len(PALETTE)]
        x0, x1 = left + 1, W - right - 1
        for lo, hi, width in [(mean, mean, 2)] + ([(mean - std, mean + std, 1)] if std else []):
            for yv in {lo, hi}:
                for seg in range(int(x0), int(x1), 12):
                    draw.line([seg, py(yv), min(seg + 6, x1), py(yv)], fill=color, width=width)
        draw.line([W - right + 12, legend_y + 7, W - right + 32, legend_y + 7], fill=color, width=2)
        draw.text((W - right + 38, legend_y), label, fill="black", font=small)
        legend_y += 18
    for i, (label, xs, means, stds) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        points = [(px(x), py(m)) for x, m in zip(xs, means)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for (cx, cy), m, s in zip(points, means, stds):
            if s:
                draw.line([cx, py(m - s), cx, py(m + s)], fill=color, width=1)
                for yv in (m - s, m + s):
                    draw.line([cx - 4, py(yv), cx + 4, py(yv)], fill=color, width=1)
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        draw.line([W - right + 12, legend_y + 7, W - right + 32, legend_y + 7], fill=color, width=2)
        draw.text((W - right + 38, legend_y), label, fill="black", font=small)
        legend_y += 18
    canvas.save(path)


def video_rows(video: torch.Tensor, names: Sequence[str] | None = None) -> list:
    """Rows of a grid from videos (N, T, C, H, W): one row per frame, labelled "frame t" (or ``names``)."""
    T = video.shape[1]
    return [(names[t] if names else f"frame {t}", video[:, t]) for t in range(T)]
