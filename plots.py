"""PNG plots of the retrieval curves that metrics.evaluate_retrieval returns, and of retrieved images."""
import os

import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")      # files only: never needs a display

from matplotlib.figure import Figure  # noqa: E402  (after the backend choice)

from runtime import atomic_write  # noqa: E402


def save_retrieval_plots(metrics, out_dir):
    """Write precision_radius.png, pr_curve.png and precision_at_n.png into out_dir; return their paths.

    ``metrics`` is the dict of ``metrics.evaluate_retrieval`` (its ``curves``, ``hash_bit``, ``radius``,
    ``topk``). Each file is written atomically.
    """
    curves = metrics["curves"]
    bits, radius, top_r = metrics["hash_bit"], metrics["radius"], metrics["topk"]
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    ax.plot(curves["radius"], curves["precision"], marker=".", label="precision")
    ax.plot(curves["radius"], curves["recall"], marker=".", label="recall")
    ax.plot(curves["radius"], curves["map"], marker=".", label="MAP (deephash)")
    if "map_mmhh" in curves:
        ax.plot(curves["radius"], curves["map_mmhh"], linestyle="--", label="MAP (mmhh)")
    if "empty_fraction" in curves:
        ax.plot(curves["radius"], curves["empty_fraction"], linestyle=":", color="grey",
                label="empty-ball fraction")
    ax.axvline(radius, color="black", linewidth=0.8, alpha=0.5)
    ax.set(xlabel="Hamming radius", ylabel="value", ylim=(-0.02, 1.02),
           title=f"Hamming ball metrics, {bits} bits (deephash convention; marked radius {radius})")
    ax.legend(fontsize="small")
    paths.append(_save(fig, out_dir, "precision_radius.png"))

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    ax.plot(curves["recall"], curves["precision"], marker=".")
    at = curves["radius"].index(radius) if radius in curves["radius"] else None
    if at is not None:
        ax.scatter([curves["recall"][at]], [curves["precision"][at]], color="red", zorder=3,
                   label=f"radius {radius}")
        ax.legend(fontsize="small")
    ax.set(xlabel="recall", ylabel="precision", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
           title=f"Precision-recall over Hamming radius 0..{bits}, {bits} bits (deephash convention)")
    paths.append(_save(fig, out_dir, "pr_curve.png"))

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    values = curves["precision_at_n"]
    ax.plot(range(1, len(values) + 1), values)
    ax.set(xlabel="N (top N of the linear scan)", ylabel="precision@N", ylim=(-0.02, 1.02),
           title=f"Precision@N, N = 1..{top_r}, {bits} bits (continuous codes, mean over queries)")
    paths.append(_save(fig, out_dir, "precision_at_n.png"))
    return paths


def save_map_vs_bits(series, out_dir, name="map_vs_bits.png", ylabel="MAP@H<=2 (deephash)"):
    """One line per method: ``series`` maps a method to [(bits, mean, std)], plotted with error bars."""
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for method, points in series.items():
        bits, means, stds = zip(*sorted(points)) if points else ((), (), ())
        ax.errorbar(bits, means, yerr=stds, marker="o", capsize=3, label=method)
    all_bits = sorted({bits for points in series.values() for bits, _, _ in points})
    ax.set_xticks(all_bits)
    ax.set(xlabel="code length (bits)", ylabel=ylabel, ylim=(-0.02, 1.02),
           title=f"{ylabel} against code length (mean and std over seeds)")
    ax.legend(fontsize="small")
    return _save(fig, out_dir, name)


def save_retrieval_grid(path, query_paths, answers, database_paths, radius):
    """Each query's image beside its results (hamming_index.Answer), best first, with the Hamming
    distance under each result and a green (relevant) or red (not) frame when relevance is known.
    An empty ball is said so; nearest codes returned for one are marked. Written atomically to ``path``.

    The tiles are pasted into one picture drawn on one axes: a figure of tens of small axes takes
    seconds to save, and evaluation draws this grid after every run.
    """
    columns = 1 + max([len(answer.index) for answer in answers] + [1])
    step_x, step_y = _TILE + 2 * _FRAME + 6, _TILE + 2 * _FRAME + 16     # room for the caption below
    canvas = np.full((len(answers) * step_y, columns * step_x, 3), 255, dtype=np.uint8)
    fig = Figure(figsize=(canvas.shape[1] / 100, canvas.shape[0] / 100 + 0.3))
    ax = fig.add_subplot()
    for row, (query, answer) in enumerate(zip(query_paths, answers)):
        note = "query, ball empty: nearest" if answer.fallback else f"query, ball {answer.ball_size}"
        cells = [(query, note, None)]
        relevant = answer.relevant.tolist() if answer.relevant is not None else [None] * len(answer.index)
        for item, distance, good in zip(answer.index.tolist(), answer.distance.tolist(), relevant):
            cells.append((database_paths[item] if database_paths is not None else None, f"d = {distance}", good))
        if not len(answer.index):
            cells.append((None, f"empty ball (r = {radius})", None))
        for column, (image, caption, good) in enumerate(cells):
            top, left = row * step_y, column * step_x
            canvas[top:top + _TILE + 2 * _FRAME, left:left + _TILE + 2 * _FRAME] = _FRAME_COLOURS[good]
            canvas[top + _FRAME:top + _FRAME + _TILE, left + _FRAME:left + _FRAME + _TILE] = _tile(image)
            ax.text(left + _FRAME + _TILE / 2, top + 2 * _FRAME + _TILE + 1, caption, ha="center", va="top",
                    fontsize=6)
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"Hamming ball of radius {radius}: results by continuous score")
    return _save(fig, os.path.dirname(os.path.abspath(path)), os.path.basename(path))


_TILE, _FRAME = 72, 3               # pixels
_FRAME_COLOURS = {True: (40, 170, 60), False: (220, 40, 40), None: (235, 235, 235)}


def _tile(path):
    """The image at ``path`` as a (_TILE, _TILE, 3) array; grey when there is none or it cannot be read."""
    try:
        with Image.open(path) as image:
            # Small images (Fashion-MNIST's 28 pixels) are enlarged by pixel repetition, not blurred.
            smooth = Image.Resampling.BICUBIC if min(image.size) >= _TILE else Image.Resampling.NEAREST
            return np.asarray(image.convert("RGB").resize((_TILE, _TILE), smooth))
    except (OSError, ValueError, TypeError, AttributeError):    # gone since indexing, or no path
        return np.full((_TILE, _TILE, 3), 200, dtype=np.uint8)


def _save(fig, out_dir, name):
    """Save fig as out_dir/name, atomically."""
    for ax in fig.axes:
        ax.title.set_fontsize("small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(os.fspath(out_dir), name)
    atomic_write(path, lambda stream: fig.savefig(stream, format="png", dpi=100))
    return path
