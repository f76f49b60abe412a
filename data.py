"""Images in, images out, for the two-stage VAE (Asperti & Trentin 2020): CIFAR-10 (section 4.1),
CelebA (4.2) or any image folder, each split decoded once on all cores into a cached uint8 .npy,
served as batches on a device; stage 2's batches of stage-1 latents (Dai & Wipf); the pictures
(labelled grids, Fig. 6-7's heatmap), with Pillow alone. Deviations from both:
- Lossless by default: --jpeg 75 is the reference's JPEG save and reload, for any dataset.
- Named resize filter, default bilinear as the reference's imresize (nearest: worse FID, Fig. 3).
- The CelebA split takes the official ranges of the sorted names, not of os.listdir's order.
- --limit takes a seeded random subset, not the first N files (one class of a sorted folder).
- Epoch e's order depends only on (seed, e), so a resumed run needs no saved RNG state.
"""
import functools
import hashlib
import io
import itertools
import multiprocessing
import os
import pathlib
import pickle
import sys
import tarfile
import time
import urllib.request

import numpy as np
import torch
from PIL import Image, ImageDraw

DATASETS = ("cifar10", "celeba", "folder")
RESIZE_MODES = {m.name.lower(): m for m in Image.Resampling}  # PIL's filters, by name
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_SPLITS = {"train": (0, 50000), "test": (0, 10000)}
CIFAR_PICKLE = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}  # as numpy 1 and 2 name them
CELEBA_CROP = (25, 45, 153, 173)  # PIL box (left, upper, right, lower): rows 45:173, cols 25:153
CELEBA_SPLITS = {"train": (0, 162770), "valid": (162770, 182637), "test": (182637, 202599)}


class DataError(Exception):
    """An expected failure (missing file, bad input), reported as one line without a traceback."""


def progress(items, total, desc, unit="images", count=len, leave=True):
    """Yield `items`, redrawing "desc done/total unit, rate, ETA" on stderr (<= 4/s); `leave` it."""
    start = last = time.time()
    done = width = 0  # width: the longest line drawn, which a shorter one must cover
    try:
        for item in itertools.chain(items, [progress]):  # `progress` itself marks the end
            if item is not progress:
                yield item
                done += count(item)
            if not done:
                continue
            if item is progress or time.time() - last >= 0.25:
                last = time.time()
                rate = done / max(last - start, 1e-9)
                left = (total - done) / rate if total else 0
                minutes, seconds = divmod(int(left), 60)
                line = (f"{desc} {done:.0f}/{total or '?'} {unit}, "
                        f"{rate:.0f} {unit}/s, ETA {minutes}:{seconds:02}")
                width = max(width, len(line))
                print(f"\r{line:<{width}}", end="", file=sys.stderr, flush=True)
    except Exception:  # met while the line is drawn (a corrupt image): its error on a new line
        if width:
            print(file=sys.stderr)
        raise
    if not done:
        return
    if leave:
        print(file=sys.stderr, flush=True)
    else:
        print("\r" + " " * width + "\r", end="", file=sys.stderr, flush=True)


def atomic_write(path, write):
    """write(f) to a temporary file renamed to `path` once complete: never a half-written file."""
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(tmp)), exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _cifar_pixels(data_dir, split, download):
    """uint8 (N, 32, 32, 3) of a split, from the official tarball (downloaded if need be)."""
    tarball = os.path.abspath(os.path.join(data_dir, "cifar-10-python.tar.gz"))
    fresh = not os.path.exists(tarball)
    if fresh and not download:
        raise DataError(f"{tarball} not found; download {CIFAR_URL} and put it there")
    if fresh:
        _download(CIFAR_URL, tarball, 163)  # 162.6 MiB
    found = hashlib.md5(pathlib.Path(tarball).read_bytes()).hexdigest()
    if found != CIFAR_MD5:
        if fresh:  # cut short (http.client may end a read early without an error): fetch again
            os.remove(tarball)
        raise DataError(
            f"{tarball} has MD5 {found}, not {CIFAR_MD5}: put the official {CIFAR_URL} "
            "there, run again online without it, or use --dataset folder")
    names = ["test_batch"]
    if split == "train":
        names = [f"data_batch_{i}" for i in range(1, 6)]
    rows = []
    with tarfile.open(tarball, "r:gz") as tar:
        for name in names:
            f = tar.extractfile(f"cifar-10-batches-py/{name}")
            rows.append(_Unpickler(f, encoding="bytes").load()[b"data"])
    pixels = np.concatenate(rows).reshape(-1, 3, 32, 32)  # R, G, B planes
    return pixels.transpose(0, 2, 3, 1)


def _download(url, path, mib):
    """`url` to `path`, whole or not at all, with a progress line."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            chunks = iter(lambda: r.read(2**20), b"")
            chunks = progress(chunks, mib, f"downloading {url}", "MiB",
                              lambda c: len(c) / 2**20)
            atomic_write(path, lambda f: f.writelines(chunks))
    except Exception as e:  # offline, refused, cut short: never a partial file
        raise DataError(f"could not download {url} ({e}); put it at {path}") from None


class _Unpickler(pickle.Unpickler):
    """numpy's array pieces only: a tampered CIFAR-10 batch runs no code."""

    def find_class(self, module, name):
        if (module, name) not in CIFAR_PICKLE:
            raise DataError(f"no CIFAR-10 batch holds {module}.{name}; get {CIFAR_URL}")
        return super().find_class(module, name)


@functools.cache
def list_images(root):
    """Sorted paths of the image files under `root`, recursively. Listed once per process (a
    start asks for a folder's splits, size and cache key): a run's folder must not change."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            if name.lower().endswith(IMAGE_EXTS):
                found.append(os.path.join(folder, name))
    return tuple(sorted(found))


def _image_paths(dataset, root, split=None):
    """A split's files (or all): CelebA's official range; a folder's train/, test/ or each 10th."""
    if dataset == "celeba":
        found = list_images(os.path.join(root, "celeba", "img_align_celeba"))
        if len(found) != CELEBA_SPLITS["test"][1]:  # the official ranges index all of them
            raise DataError(
                f"found {len(found)} of CelebA's 202,599 images; unzip img_align_celeba.zip "
                f"from mmlab.ie.cuhk.edu.hk/projects/CelebA.html in {root}/celeba")
        return found[slice(*CELEBA_SPLITS[split])]
    found = list_images(root)
    subfolders = [os.path.isdir(os.path.join(root, s)) for s in ("train", "test")]
    if split and all(subfolders):
        inside = os.path.join(root, split, "")
        found = [p for p in found if p.startswith(inside)]
    elif split:  # so each class of a sorted tree has test images
        test = split == "test"
        found = [p for i, p in enumerate(found, 1) if (i % 10 == 0) == test]
    if not found:
        raise DataError(
            f"no images in {split or 'any'} split of {root} (train/, test/, each 10th)")
    return found


def read_image(path):
    """The RGB image at `path`, decoded; a file Pillow cannot read is named."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # Pillow raises many types for a broken file
        raise DataError(f"cannot decode image {path} ({e}); remove or replace it") from None


def choose_img_size(dataset, data_dir=None):
    """CIFAR-10's 32, the paper's 64 for CelebA; a folder's first image's side if it is a
    square of a power-of-two side >= 4 (the decoder doubles from 2x2), else 64."""
    if dataset != "folder":
        return 32 if dataset == "cifar10" else 64
    w, h = read_image(_image_paths(dataset, data_dir)[0]).size
    return w if w == h >= 4 and not w & (w - 1) else 64


def split_size(dataset, split, data_dir):
    """The number of images in a split, counted without decoding any."""
    if dataset == "folder":
        return len(_image_paths(dataset, data_dir, split))
    if dataset == "celeba":
        return len(range(*CELEBA_SPLITS[split]))
    return len(range(*CIFAR_SPLITS[split]))


def _decode(job):
    """Pool worker: pixels, or a file cropped (box or centred square) and resized; then any JPEG."""
    src, box, size, resize, jpeg = job
    if not isinstance(src, np.ndarray):
        im = read_image(src)
        w, h = im.size
        side = min(w, h)  # the centred square
        box = box or ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
        im = im.crop(box).resize((size, size), RESIZE_MODES[resize])
        src = np.asarray(im)
    if jpeg:  # as the reference's imsave(.jpg) and imread: Pillow's defaults, 4:2:0 chroma
        buf = io.BytesIO()
        Image.fromarray(src).save(buf, format="JPEG", quality=jpeg)
        src = np.asarray(Image.open(buf).convert("RGB"))
    return src


def cache_path(dataset, split, data_dir, size, resize, jpeg):
    """Where a split's decoded pixels are kept: beside CIFAR-10 and CelebA; a folder's in the
    user's cache, keyed on what the images are (names, sizes, times), not where they lie."""
    jpg = f"_jpeg{jpeg}" if jpeg else ""
    name = f"{split}_{size}_{resize}{jpg}.npy"
    if dataset == "cifar10":  # never resized
        return os.path.join(data_dir, f"cifar10_{split}{jpg}.npy")
    if dataset == "celeba":
        return os.path.join(data_dir, "celeba", name)
    files = []
    for p in _image_paths(dataset, data_dir):
        st = os.stat(p)
        files.append((os.path.relpath(p, data_dir), st.st_size, st.st_mtime_ns))
    key = hashlib.sha1(repr(files).encode()).hexdigest()[:16]
    home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(home, "balancing-vae", f"folder-{key}", name)


def load_split(dataset, split, data_dir="data", img_size=None, resize="bilinear", jpeg=None,
               download=True):
    """One split as a read-only uint8 memmap (N, H, W, 3) of its cache, decoded on first use."""
    size = img_size or choose_img_size(dataset, data_dir)
    if dataset == "cifar10" and size != 32:
        raise DataError(f"CIFAR-10 images are 32x32, not {size}x{size}; resize them as a folder")
    cache = cache_path(dataset, split, data_dir, size, resize, jpeg)
    if os.path.exists(cache):
        return np.load(cache, mmap_mode="r")
    box = None
    if dataset == "cifar10":
        src = _cifar_pixels(data_dir, split, download)
    else:
        src = _image_paths(dataset, data_dir, split)
    if dataset == "celeba":
        box = CELEBA_CROP
    jobs = [(s, box, size, resize, jpeg) for s in src]
    header = {"descr": "|u1", "fortran_order": False, "shape": (len(src), size, size, 3)}

    def write(f):  # streamed: a 2.5 GB split is never held in memory
        np.lib.format.write_array_header_1_0(f, header)
        with multiprocessing.Pool(os.cpu_count()) as pool:
            images = pool.imap(_decode, jobs, 64)
            f.writelines(progress(images, len(src), f"{dataset} {split}", count=lambda _: 1))
    atomic_write(cache, write)
    return np.load(cache, mmap_mode="r")


def subset(images, limit, seed):
    """`limit` of `images` drawn from `seed`, kept in order (the same in every stage, resume)."""
    if limit is None:
        return images
    if not 1 <= limit <= len(images):
        raise DataError(f"--limit {limit} is not between 1 and {len(images)}, the image count")
    drawn = np.random.default_rng(seed).choice(len(images), limit, replace=False)
    return images[np.sort(drawn)]


def epoch_generator(seed, epoch):
    """The generator of epoch `epoch`'s shuffle (and stage-2 noise), from (seed, epoch) alone."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class Batches:
    """Batches of float (B, 3, H, W) in [0, 1] from one uint8 tensor on `device`: no DataLoader."""

    def __init__(self, images, batch_size, device="cpu", shuffle=True, drop_last=True, seed=0):
        if len(images) == 0 or (drop_last and len(images) < batch_size):
            raise DataError(f"{len(images)} images do not make one batch of {batch_size}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.x = torch.from_numpy(np.array(images)).to(device)  # a writable copy

    def __len__(self):  # whole batches, or every image
        extra = 0 if self.drop_last else self.batch_size - 1
        return (len(self.x) + extra) // self.batch_size

    def epoch(self, e):
        n = len(self.x)
        order = torch.arange(n)
        if self.shuffle:
            order = torch.randperm(n, generator=epoch_generator(self.seed, e))
        batches = order.to(self.x.device).split(self.batch_size)
        for idx in batches[:len(self)]:
            x = self.x[idx].permute(0, 3, 1, 2)  # channels_last, as the network
            yield x.float().div_(255)


def to_uint8(x):
    """Batches' inverse, to uint8 (N, H, W, 3) on the host: rounded, as files are quantised,
    and saturated (a value past 1 is white, not wrapped round to black)."""
    x = (x.float() * 255).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def latent_batches(m1, images, batch_size, seed, device):
    """Stage-2 data (Dai & Wipf): epoch e's batches of z = mu + sigma * eps, eps from (seed, e),
    and the images an epoch (whole batches only, as stage 1's)."""
    if len(images) < batch_size:
        raise DataError(f"{len(images)} images do not make one batch of {batch_size}")
    batches = Batches(images, 500, device, shuffle=False, drop_last=False)
    with torch.no_grad():
        codes = [m1.encode(x) for x in batches.epoch(0)]
    mu, logsd = map(torch.cat, zip(*codes))
    sd = logsd.exp()
    whole = len(mu) // batch_size

    def epoch(e):
        g = epoch_generator(seed, e)
        z = mu + sd * torch.randn(mu.shape, generator=g).to(device)
        z = z[torch.randperm(len(z), generator=g).to(device)]
        return z.split(batch_size)[:whole]
    return epoch, whole * batch_size


# --- Pictures (Pillow only) ------------------------------------------------------------------
def save_grid(images, path, title, recon=None, texts=(), ncol=8, pad=2, top=20):
    """uint8 images (N, H, W, 3) in rows of `ncol` under a title, small ones enlarged (32 px 2x);
    with `recon`, rows of originals alternate with rows of their reconstructions, each named;
    `texts` [(x, y, text, colour)] are written over the first image."""
    left = 0
    if recon is not None:  # whole rows only, the names in a left margin
        left = 60
        n = len(images) // ncol * ncol
        shape = (-1, ncol, *images.shape[1:])
        pairs = [images[:n].reshape(shape), recon[:n].reshape(shape)]
        images = np.stack(pairs, 1).reshape(-1, *images.shape[1:])
    k = max(1, 64 // images.shape[1])  # a 32 px image is small on screen: twice its size
    images = images.repeat(k, 1).repeat(k, 2)
    n, h, w, _ = images.shape
    rows = -(-n // ncol)
    shape = (top + rows * (h + pad) + pad, left + ncol * (w + pad) + pad, 3)
    grid = np.full(shape, 255, np.uint8)
    for i, img in enumerate(images):
        y = top + pad + i // ncol * (h + pad)
        x = left + pad + i % ncol * (w + pad)
        grid[y:y + h, x:x + w] = img
    img = Image.fromarray(grid)
    draw = ImageDraw.Draw(img)
    draw.multiline_text((pad, 5), title, fill="black")
    for r in range(rows if left else 0):
        name = ("original", "recon")[r % 2]
        draw.text((pad, top + r * (h + pad) + h // 2), name, fill="black")
    for x, y, text, colour in texts:
        draw.text((left + pad + x, top + pad + y), text, fill=colour)
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def colours(values):
    """Fig. 6-7's colours as uint8 RGB: dark blue at 0, through light blue, to yellow at 1."""
    channels = ((20, 40, 250), (30, 150, 230), (90, 140, 60))  # R, G, B at 0, 0.5 and 1
    rgb = [np.interp(values, (0, 0.5, 1), c) for c in channels]
    return np.stack(rgb, -1).astype(np.uint8)


def heatmap(values, path, title, mark=0.8):
    """values in [0, 1] (rows x columns) as coloured cells, 6 px a row, the columns 600 px in
    all, with a colour scale beside them (1 at the top) that marks `mark` in red."""
    cells = colours(values).repeat(6, 0)
    cells = cells.repeat(max(1, 600 // values.shape[1]), 1)
    h = max(len(cells), 100)
    w = cells.shape[1]
    canvas = np.full((h, w + 110, 3), 255, np.uint8)
    canvas[:len(cells), :w] = cells
    canvas[:, w + 20:w + 32] = colours(np.linspace(1, 0, h))[:, None]
    texts = []
    for t in (0, 0.5, mark, 1):
        y = round((1 - t) * (h - 1))
        red = t == mark
        canvas[y, w + 17:w + 36] = (255, 0, 0) if red else 0
        label = f"{t:g} inactive" if red else f"{t:g}"
        texts.append((w + 38, y - 5, label, "red" if red else "black"))
    save_grid(canvas[None], path, title, texts=texts, ncol=1, top=34)
