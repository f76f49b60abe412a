"""Data for the two-stage VAE (Asperti & Trentin 2020): CIFAR-10 (section 4.1), CelebA (4.2) or
any image folder, each split decoded once on all cores into a cached uint8 .npy, served as batches
on a device; stage 2 trains on the stage-1 encoder's latents (Dai & Wipf). Deviations from both:
- Lossless by default: --jpeg 75 is the reference's JPEG save and reload, for any dataset.
- Named resize filter, default bilinear as the reference's imresize (nearest: worse FID, Fig. 3).
- The CelebA split takes the official ranges of the sorted names, not of os.listdir's order.
- --limit takes a seeded random subset, not the first N files (one class of a sorted folder).
- Epoch e's order depends only on (seed, e), so a resumed run needs no saved RNG state.
"""
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
from PIL import Image

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


def progress(items, total, desc, unit="images", size=len, leave=True):
    """Yield `items`, redrawing "desc done/total unit, rate, ETA" on stderr (<= 4/s); `leave` it."""
    start, last, done, width = time.time(), time.time(), 0, 0
    try:
        for item in itertools.chain(items, [progress]):  # `progress` itself marks the end
            if item is not progress:
                yield item
                done += size(item)
            if done and (item is progress or time.time() - last >= 0.25):
                last, rate = time.time(), done / max(time.time() - start, 1e-9)
                m, s = divmod(int((total - done) / rate) if total and rate > 0 else 0, 60)
                eta = f"ETA {m}:{s:02}"
                line = f"{desc} {done:.0f}/{total or '?'} {unit}, {rate:.0f} {unit}/s, {eta}"
                width = max(width, len(line))  # to cover a longer line drawn before
                print(f"\r{line:<{width}}", end="", file=sys.stderr, flush=True)
    except Exception:  # met while the line is drawn (a corrupt image): its error on a new line
        print("\n" * bool(width), end="", file=sys.stderr)
        raise
    if done:
        print("\n" if leave else "\r" + " " * width + "\r", end="", file=sys.stderr, flush=True)


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
    if (fresh := not os.path.exists(tarball)) and not download:
        raise DataError(f"{tarball} not found; download {CIFAR_URL} and put it there")
    try:
        if fresh:
            with urllib.request.urlopen(CIFAR_URL, timeout=60) as r:
                chunks = progress(iter(lambda: r.read(2**20), b""), 163,  # 162.6 MiB
                                  f"downloading {CIFAR_URL}", "MiB", lambda c: len(c) / 2**20)
                atomic_write(tarball, lambda f: f.writelines(chunks))
    except Exception as e:  # offline, refused, cut short: never a partial file
        raise DataError(f"could not download {CIFAR_URL} ({e}); put it at {tarball}") from None
    if (found := hashlib.md5(pathlib.Path(tarball).read_bytes()).hexdigest()) != CIFAR_MD5:
        if fresh:  # cut short (http.client may end a read early without an error): fetch again
            os.remove(tarball)
        raise DataError(f"{tarball} has MD5 {found}, not {CIFAR_MD5}: put the official "
                        f"{CIFAR_URL} there, run again online without it, or use --dataset folder")
    class Unpickler(pickle.Unpickler):  # numpy's array pieces only: a tampered batch runs no code
        def find_class(self, module, name):
            if (module, name) not in CIFAR_PICKLE:
                raise DataError(f"no CIFAR-10 batch holds {module}.{name}; get {CIFAR_URL}")
            return super().find_class(module, name)
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    with tarfile.open(tarball, "r:gz") as tar:
        rows = [Unpickler(tar.extractfile(f"cifar-10-batches-py/{name}"), encoding="bytes")
                .load()[b"data"] for name in names]
    return np.concatenate(rows).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # R, G, B planes


def list_images(root):
    """Sorted paths of the image files under `root`, recursively."""
    return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names
                  if n.lower().endswith(IMAGE_EXTS))


def _image_paths(dataset, root, split=None):
    """A split's files (or all): CelebA's official range; a folder's train/, test/ or each 10th."""
    if dataset == "celeba":
        found = list_images(os.path.join(root, "celeba", "img_align_celeba"))
        if len(found) != CELEBA_SPLITS["test"][1]:  # the official ranges index all of them
            raise DataError(f"found {len(found)} of CelebA's 202,599 images; unzip img_align_celeba"
                            f".zip from mmlab.ie.cuhk.edu.hk/projects/CelebA.html in {root}/celeba")
        return found[slice(*CELEBA_SPLITS[split])]
    found = list_images(root)
    if split and all(os.path.isdir(os.path.join(root, s)) for s in ("train", "test")):
        found = [p for p in found if p.startswith(os.path.join(root, split, ""))]
    elif split:  # so each class of a sorted tree has test images
        found = [p for i, p in enumerate(found, 1) if (i % 10 == 0) == (split == "test")]
    if not found:
        raise DataError(f"no images in {split or 'any'} split of {root} (train/, test/, each 10th)")
    return found


def choose_img_size(dataset, data_dir=None):
    """(side, why): the paper's 32 or 64; a folder's first image's if square 2^k >= 4, else 64."""
    if dataset != "folder":
        return (32, "CIFAR-10's only size") if dataset == "cifar10" else (64, "the paper's size")
    with Image.open(_image_paths(dataset, data_dir)[0]) as im:  # reads the header only
        w, h = im.size
    if w == h >= 4 and not w & (w - 1):
        return w, f"the first image is {w}x{h}"
    return 64, f"the first image is {w}x{h}, not a square of a power-of-two side >= 4"


def split_size(dataset, split, data_dir):
    """The number of images in a split, counted without decoding any."""
    if dataset == "folder":
        return len(_image_paths(dataset, data_dir, split))
    return len(range(*(CELEBA_SPLITS if dataset == "celeba" else CIFAR_SPLITS)[split]))


def _decode(job):
    """Pool worker: pixels, or a file cropped (box or centred square) and resized; then any JPEG."""
    src, box, size, resize, jpeg = job
    if not isinstance(src, np.ndarray):
        try:
            with Image.open(src) as im:
                im = im.convert("RGB")
        except Exception as e:  # Pillow raises many types for a broken file
            raise DataError(f"cannot decode image {src} ({e}); remove or replace it") from None
        w, h, s = *im.size, min(im.size)
        box = box or ((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)
        src = np.asarray(im.crop(box).resize((size, size), RESIZE_MODES[resize]))
    if jpeg:  # as the reference's imsave(.jpg) and imread: Pillow's defaults, 4:2:0 chroma
        buf = io.BytesIO()
        Image.fromarray(src).save(buf, format="JPEG", quality=jpeg)
        src = np.asarray(Image.open(buf).convert("RGB"))
    return src


def load_split(dataset, split, data_dir="data", img_size=None, resize="bilinear", jpeg=None,
               download=True):
    """One split as a read-only uint8 memmap (N, H, W, 3) of its cache, decoded on first use."""
    size, jpg = img_size or choose_img_size(dataset, data_dir)[0], f"_jpeg{jpeg}" if jpeg else ""
    if dataset == "cifar10" and size != 32:
        raise DataError(f"CIFAR-10 images are 32x32, not {size}x{size}; resize them as a folder")
    name = f"{split}_{size}_{resize}{jpg}.npy"
    if dataset == "cifar10":  # never resized
        cache = os.path.join(data_dir, f"cifar10_{split}{jpg}.npy")
    elif dataset == "celeba":
        cache = os.path.join(data_dir, "celeba", name)
    else:  # keyed on what the images are, not where the folder lies
        st = [(os.path.relpath(p, data_dir), os.stat(p)) for p in _image_paths(dataset, data_dir)]
        key = hashlib.sha1(repr([(p, s.st_size, s.st_mtime_ns) for p, s in st]).encode())
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                             "balancing-vae", f"folder-{key.hexdigest()[:16]}", name)
    if not os.path.exists(cache):
        src = (_cifar_pixels(data_dir, split, download) if dataset == "cifar10"
               else _image_paths(dataset, data_dir, split))
        box = CELEBA_CROP if dataset == "celeba" else None
        def write(f):  # streamed: a 2.5 GB split is never held in memory
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                     "shape": (len(src), size, size, 3)})
            with multiprocessing.Pool(os.cpu_count()) as pool:
                images = pool.imap(_decode, ((s, box, size, resize, jpeg) for s in src), 64)
                f.writelines(progress(images, len(src), f"{dataset} {split}", size=lambda _: 1))
        atomic_write(cache, write)
    return np.load(cache, mmap_mode="r")


def subset(images, limit, seed):
    """`limit` of `images` drawn from `seed`, kept in order (the same in every stage, resume)."""
    if limit is None:
        return images
    if not 1 <= limit <= len(images):
        raise DataError(f"--limit {limit} is not between 1 and {len(images)}, the image count")
    return images[np.sort(np.random.default_rng(seed).choice(len(images), limit, replace=False))]


def epoch_generator(seed, epoch):
    """The generator of epoch `epoch`'s shuffle (and stage-2 noise), from (seed, epoch) alone."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class Batches:
    """Batches of float (B, 3, H, W) in [0, 1] from one uint8 tensor on `device`: no DataLoader."""
    def __init__(self, images, batch_size, device="cpu", shuffle=True, drop_last=True, seed=0):
        if len(images) == 0 or (drop_last and len(images) < batch_size):
            raise DataError(f"{len(images)} images do not make one batch of {batch_size}")
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.x = seed, torch.from_numpy(np.array(images)).to(device)  # writable copy

    def __len__(self):
        return (len(self.x) + (0 if self.drop_last else self.batch_size - 1)) // self.batch_size

    def epoch(self, e):
        n, g = len(self.x), epoch_generator(self.seed, e)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        for idx in order.to(self.x.device).split(self.batch_size)[:len(self)]:
            yield self.x[idx].permute(0, 3, 1, 2).float().div_(255)  # channels_last, as the net


def to_uint8(x):
    """Batches' inverse, to uint8 (N, H, W, 3) on the host: rounded, as files are quantised."""
    return (x.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def latent_batches(m1, images, batch_size, seed, device):
    """Stage-2 data (Dai & Wipf): epoch e's batches of z = mu + sigma * eps, eps from (seed, e)."""
    if len(images) < batch_size:
        raise DataError(f"{len(images)} images do not make one batch of {batch_size}")
    with torch.no_grad():
        mu, logsd = map(torch.cat, zip(*map(m1.encode, Batches(
            images, 500, device, shuffle=False, drop_last=False).epoch(0))))
    def epoch(e):
        g = epoch_generator(seed, e)
        z = mu + logsd.exp() * torch.randn(mu.shape, generator=g).to(device)
        z = z[torch.randperm(len(z), generator=g).to(device)]
        return z.split(batch_size)[:len(z) // batch_size]  # whole batches only, as stage 1's
    return epoch, len(mu) // batch_size * batch_size
