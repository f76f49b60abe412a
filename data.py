"""Data for the two-stage VAE: CIFAR-10, CelebA and image folders as uint8 arrays.

(Shared utilities below; the dataset code is being written.)
"""
import os
import sys
import time

import numpy as np
from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(Exception):
    """An expected failure (missing file, bad input): main() prints it without a traceback."""


def progress(iterable, total=None, desc=""):
    """Yield from `iterable`, redrawing one progress line on stderr (no tqdm dependency)."""
    total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
    start = last = time.time()
    n = 0
    for n, item in enumerate(iterable, 1):
        yield item
        now = time.time()
        if now - last > 0.5 or n == total:
            last = now
            rate = n / max(now - start, 1e-9)
            done = f"{n}/{total}" if total else str(n)
            print(f"\r{desc} {done} ({rate:.1f}/s)", end="", file=sys.stderr, flush=True)
    if n:
        print(file=sys.stderr, flush=True)


def atomic_write(path, write):
    """Call write(f) on a temporary file beside `path`, then rename it into place, so an
    interruption never leaves a half-written file that later loads as garbage."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def list_images(root):
    """Sorted paths of all image files under `root` (recursively), by their path relative to root."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTS)]
    return sorted(found, key=lambda p: os.path.relpath(p, root))


def save_grid(images, path, ncol=8, pad=2):
    """Write uint8 images (N, H, W, 3) as one PNG grid of `ncol` columns on a white background."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
