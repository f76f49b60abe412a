"""Data for the two-stage VAE: CIFAR-10, CelebA and any image folder, as uint8 arrays.

The paper (Asperti & Trentin 2020) trains on CIFAR-10 at 32x32 (section 4.1) and CelebA at
64x64 (section 4.2), with the preprocessing of Dai & Wipf's and the authors' released code.

- cifar10: the official python tarball, downloaded into --data-dir, MD5-checked and read with a
  restricted unpickler; 50,000 train / 10,000 test images served at their native 32x32 only
  (another --img-size is an error, not a silent resize).
- celeba: <data-dir>/celeba/img_align_celeba/ or the official img_align_celeba.zip beside it
  (read in place, not extracted), put there by hand; sorted file names, split by
  list_eval_partition.txt when present, else by the official index ranges; the 128x128 crop
  at rows 45:173, columns 25:153, resized (64x64 by default).
- folder: any tree of images (jpg, png, ...): centre-cropped to a square, resized to
  --img-size. If the folder has train/ and test/ subfolders they are the splits; otherwise
  every 10th image by sorted relative path (the 10th, 20th, ...) is test and the rest train.

Each split is decoded once on all CPU cores and cached as a uint8 .npy (N, H, W, 3) that is
loaded back memory-mapped: <data-dir>/cifar10_{split}.npy, <data-dir>/celeba/{split}_{size}_
{resize}.npy, and for folders $XDG_CACHE_HOME (default ~/.cache)/balancing-vae/folder-<key>/,
where <key> hashes the folder's path and its images' paths, sizes and mtimes, so the user's
folder is never written to and any change to it triggers a fresh cache. `Batches` keeps a
split on the training device as one uint8 tensor and yields shuffled float batches in [0, 1].

Deviations from the reference:
- Resizing always names its PIL filter, default bilinear. The reference preprocessing used
  scipy's deprecated imresize (bilinear); the paper's port to plain PIL `resize()` silently got
  nearest neighbour, whose jaggies the VAE cannot reconstruct and which worsen FID (section
  4.2, Fig. 3). Pillow's own default has since changed again (bicubic since Pillow 7).
- Shuffling: the permutation of epoch e depends only on (seed, e), not on a running RNG
  stream, so a resumed run sees the same batches without saving any RNG state.
"""
import argparse
import hashlib
import http.client
import io
import multiprocessing
import os
import pickle
import sys
import tarfile
import time
import urllib.request
import zipfile
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2 renamed numpy.core to numpy._core
except ImportError:
    from numpy.core.multiarray import _reconstruct

DATASETS = ("cifar10", "celeba", "folder")
SPLITS = {"cifar10": ("train", "test"), "celeba": ("train", "valid", "test"), "folder": ("train", "test")}
RESIZE_MODES = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
                "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CELEBA_PAGE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"  # "Align&Cropped Images"
CELEBA_SIZE = (178, 218)  # (width, height) of every aligned image
CELEBA_CROP = (25, 45, 153, 173)  # PIL box (left, upper, right, lower): rows 45:173, columns 25:153
CELEBA_SPLITS = {"train": (0, 162770), "valid": (162770, 182637), "test": (182637, 202599)}
FOLDER_TEST_EVERY = 10


class DataError(Exception):
    """An expected failure (missing file, bad input): main() prints it without a traceback."""


def progress(items, total, desc, unit="images", size=len, done=0):
    """Yield from `items`, redrawing one line on stderr at most 4 times a second (no tqdm):
    `desc done/total unit, rate unit/s, ETA m:ss`. Each item holds size(item) units; `done` units
    were finished before this call (a resumed epoch), and the rate counts only this call's.
    It reads nothing but the host clock, so it adds no device synchronisation to a CUDA loop."""
    start = last = time.time()
    first = done
    for item in items:
        yield item
        done += size(item)
        now = time.time()
        if now - last >= 0.25 or done == total:
            last = now
            rate = (done - first) / max(now - start, 1e-9)
            eta = int((total - done) / rate) if total and rate > 0 else 0
            print(f"\r{desc} {done:.0f}/{total or '?'} {unit}, {rate:.0f} {unit}/s, "
                  f"ETA {eta // 60}:{eta % 60:02d}", end="", file=sys.stderr, flush=True)
    if done > first:
        print(file=sys.stderr, flush=True)


def seconds_per_call(fn, n, device="cpu"):
    """Mean wall-clock seconds of fn() over n calls; a CUDA device is synchronised before and after,
    so queued GPU work is counted (the benchmark modes of train.py and fid.py)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n


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
    for dirpath, _, filenames in os.walk(root):
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


def default_img_size(dataset):
    """The paper's image side: 32 for CIFAR-10, 64 for CelebA (and, by default, for folders)."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return 32 if dataset == "cifar10" else 64


def load_split(dataset, split, data_dir="data", img_size=None, resize="bilinear", download=True):
    """One split as a read-only uint8 array (N, H, W, 3), memory-mapped from its cache.

    The first call prepares the cache (downloading CIFAR-10 when `download`); every expected
    failure raises DataError with a message saying what to do."""
    default = default_img_size(dataset)  # also rejects an unknown dataset
    size = default if img_size is None else img_size
    if split not in SPLITS[dataset]:
        raise DataError(f"{dataset} has no split {split!r}; it has {', '.join(SPLITS[dataset])}")
    if resize not in RESIZE_MODES:
        raise DataError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    if size < 1:
        raise DataError(f"image size must be positive, got {size}")
    if dataset == "cifar10":
        if size != 32:
            raise DataError(f"CIFAR-10 images are 32x32, so img_size must be 32 (got {size}); to "
                            f"train at another size, convert them to an image folder and use 'folder'")
        cache = os.path.join(data_dir, f"cifar10_{split}.npy")
        if not os.path.exists(cache):
            _prepare_cifar(data_dir, download)
    elif dataset == "celeba":
        cache = os.path.join(data_dir, "celeba", f"{split}_{size}_{resize}.npy")
        if not os.path.exists(cache):
            with _celeba_images(data_dir, split) as (labels, read):
                _decode_to_cache(cache, labels, read, _celeba_window, size, resize, f"celeba {split}")
    else:
        paths, key = _folder_split(data_dir, split)
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser(os.path.join("~", ".cache"))
        cache = os.path.join(cache_home, "balancing-vae", f"folder-{key}", f"{split}_{size}_{resize}.npy")
        if not os.path.exists(cache):
            _decode_to_cache(cache, paths, _read_file, _centre_square, size, resize, f"folder {split}")
    return np.load(cache, mmap_mode="r")


def _write_npy(path, shape, arrays):
    """Stream uint8 `arrays`, whose rows together make `shape`, into an .npy file atomically, so
    a 2.5 GB split never has to be held in memory."""
    def write(f):
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        for a in arrays:
            f.write(np.ascontiguousarray(a, np.uint8).tobytes())
    atomic_write(path, write)
    print(f"cached {path}", file=sys.stderr)


# ---------------------------------------------------------------- CIFAR-10

class _CifarUnpickler(pickle.Unpickler):
    """The official batches hold only dicts, lists, bytes, ints and numpy arrays; refusing every
    other global (os.system, builtins.eval, ...) means a tampered file cannot run code."""
    SAFE = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # as the official files name it
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct}  # as numpy >= 2 writes it

    def find_class(self, module, name):
        if (module, name) not in self.SAFE:
            raise DataError(f"it refers to {module}.{name}, which no official CIFAR-10 batch contains")
        return self.SAFE[module, name]


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url, path, md5):
    """Fetch `url` to `path` with a progress line; the file only appears complete and verified."""
    def write(f):
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=60) as r:
            mib = -(-int(r.headers.get("Content-Length") or 0) // (1 << 20)) or None
            for chunk in progress(iter(lambda: r.read(1 << 20), b""), mib, f"downloading {url}",
                                  "MiB", size=lambda chunk: len(chunk) / (1 << 20)):
                f.write(chunk)
                digest.update(chunk)
        if digest.hexdigest() != md5:
            raise DataError(f"the download of {url} has MD5 {digest.hexdigest()}, not {md5}; run again")
    try:
        atomic_write(path, write)
    except (OSError, http.client.HTTPException) as e:
        raise DataError(f"could not download {url} ({e}). Download it some other way and put it at "
                        f"{os.path.abspath(path)}, then run again.") from None


def _cifar_batch(tar, name):
    """uint8 (N, 32, 32, 3) from one official batch, whose b'data' rows hold the R, then G, then
    B plane, each 32x32 row-major."""
    try:
        batch = _CifarUnpickler(tar.extractfile(f"cifar-10-batches-py/{name}"), encoding="bytes").load()
    except (KeyError, DataError, pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"cannot read {name} from {tar.name}: {e}. Delete the tarball and run again "
                        f"to download the official one.") from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)):
        raise DataError(f"{name} in {tar.name} is not an official CIFAR-10 batch (no uint8 b'data' with "
                        f"3072 columns); delete the tarball and run again")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _prepare_cifar(data_dir, download):
    """Verify (downloading first if needed) the official tarball and cache both splits."""
    tarball = os.path.join(data_dir, "cifar-10-python.tar.gz")
    if not os.path.exists(tarball):
        if not download:
            raise DataError(f"{os.path.abspath(tarball)} not found; download {CIFAR_URL} and put it there")
        _download(CIFAR_URL, tarball, CIFAR_MD5)
    elif _md5(tarball) != CIFAR_MD5:
        raise DataError(f"the MD5 of {os.path.abspath(tarball)} is not {CIFAR_MD5}: the file is corrupt or "
                        f"incomplete. Delete it and run again to download it afresh.")
    with tarfile.open(tarball, "r:gz") as tar:  # read every batch before writing any cache
        splits = {split: [_cifar_batch(tar, n) for n in names] for split, names in CIFAR_BATCHES.items()}
    for split, arrays in splits.items():
        _write_npy(os.path.join(data_dir, f"cifar10_{split}.npy"), (sum(map(len, arrays)), 32, 32, 3), arrays)


# ---------------------------------------------------------------- CelebA and folders

def _read_file(path):
    with open(path, "rb") as f:
        return f.read()


def _centre_square(width_height, label):
    w, h = width_height
    s = min(w, h)
    return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s


def _celeba_window(width_height, label):
    if width_height != CELEBA_SIZE:
        raise DataError(f"{label} is {width_height[0]}x{width_height[1]}, not 178x218: not an aligned "
                        f"CelebA image (img_align_celeba)")
    return CELEBA_CROP


def _decode(job):
    """Pool worker: encoded image -> uint8 (size, size, 3), cropped to the box that
    crop(width_height, label) returns, then resized."""
    label, raw, crop, size, resample = job
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im = im.convert("RGB")
    except Exception as e:  # Pillow raises many types for broken files; all mean "cannot decode"
        raise DataError(f"cannot decode image {label} ({e}); remove or replace it and run again") from None
    return np.asarray(im.crop(crop(im.size, label)).resize((size, size), resample))


def _decode_to_cache(cache, labels, read, crop, size, resize, desc):
    """Decode read(label) for every label on all CPU cores, in order, straight into the cache."""
    def jobs():  # read here, in the parent, so the workers need no open zip file
        for label in labels:
            try:
                raw = read(label)
            except (OSError, zipfile.BadZipFile) as e:
                raise DataError(f"cannot read {label}: {e}") from None
            yield label, raw, crop, size, RESIZE_MODES[resize]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        images = pool.imap(_decode, jobs(), chunksize=64)
        images = progress(images, len(labels), f"{desc} {resize} {size}x{size}", size=lambda im: 1)
        _write_npy(cache, (len(labels), size, size, 3), images)


@contextmanager
def _celeba_images(data_dir, split):
    """Yield the labels of `split` and a function reading one label's bytes."""
    root = os.path.join(data_dir, "celeba")
    folder, zpath = os.path.join(root, "img_align_celeba"), os.path.join(root, "img_align_celeba.zip")
    if os.path.isdir(folder):
        names = sorted(f for f in os.listdir(folder) if f.lower().endswith(".jpg"))
        yield [os.path.join(folder, n) for n in _celeba_pick(root, names, split)], _read_file
    elif os.path.isfile(zpath):
        try:
            zf = zipfile.ZipFile(zpath)
        except zipfile.BadZipFile as e:
            raise DataError(f"{zpath} is not a valid zip ({e}); delete it and download it again") from None
        with zf:
            members = {os.path.basename(m): m for m in zf.namelist() if m.lower().endswith(".jpg")}
            yield [members[n] for n in _celeba_pick(root, sorted(members), split)], zf.read
    else:
        raise DataError(f"CelebA not found: expected {folder}/ or {zpath}. Download img_align_celeba.zip "
                        f"(and list_eval_partition.txt) by hand from {CELEBA_PAGE} and put it there.")


def _celeba_pick(root, names, split):
    """The sorted file names in `split`: per list_eval_partition.txt (0 train, 1 valid, 2 test)
    when present, else the official index ranges, which need all 202,599 images."""
    part_file = os.path.join(root, "list_eval_partition.txt")
    if os.path.isfile(part_file):
        try:
            with open(part_file) as f:
                part = dict(line.split() for line in f if line.strip())
        except ValueError:
            raise DataError(f"{part_file} is not a list of 'name code' lines; fetch it again") from None
        if set(part) != set(names):
            raise DataError(f"{part_file} lists {len(part)} images but {len(names)} were found, and not the "
                            f"same ones; the download is incomplete or mixed: fetch it again")
        code = str(SPLITS["celeba"].index(split))
        return [n for n in names if part[n] == code]
    if len(names) != CELEBA_SPLITS["test"][1]:
        raise DataError(f"found {len(names)} CelebA images in {root}, not {CELEBA_SPLITS['test'][1]}: the "
                        f"split by index needs all of img_align_celeba (or put list_eval_partition.txt there)")
    lo, hi = CELEBA_SPLITS[split]
    return names[lo:hi]


def _folder_split(root, split):
    """Paths of `split` in an image folder and a key that changes whenever its images change."""
    if not os.path.isdir(root):
        raise DataError(f"image folder {root} not found")
    paths = list_images(root)
    if not paths:
        raise DataError(f"no images ({' '.join(IMAGE_EXTS)}) under {root}")
    rel = [os.path.relpath(p, root) for p in paths]
    key = hashlib.sha1(os.path.abspath(root).encode())
    for p, r in zip(paths, rel):
        st = os.stat(p)
        key.update(f"{r}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if all(os.path.isdir(os.path.join(root, s)) for s in ("train", "test")):
        chosen = [p for p, r in zip(paths, rel) if r.split(os.sep)[0] == split]
    else:  # the 10th, 20th, ... image is test: every part of a sorted tree (e.g. each class) gets some
        is_test = [(i + 1) % FOLDER_TEST_EVERY == 0 for i in range(len(paths))]
        chosen = [p for p, t in zip(paths, is_test) if t == (split == "test")]
    if not chosen:
        raise DataError(f"the {split} split of {root} is empty (train/ and test/ subfolders are the splits; "
                        f"without them every {FOLDER_TEST_EVERY}th image is test)")
    return chosen, key.hexdigest()[:16]


# ---------------------------------------------------------------- batches for training

def epoch_generator(seed, epoch):
    """The CPU generator of one epoch's shuffle (and stage-2 noise): it depends only on (seed, epoch),
    so a resumed run draws the same numbers without saving any RNG state."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class Batches:
    """Minibatches of one split, kept on `device` as a single uint8 tensor (N, H, W, 3), a quarter
    of float32's memory, and converted per batch to float (B, 3, H, W) in [0, 1] on the device;
    for data this small no DataLoader or worker processes are needed."""

    def __init__(self, images, batch_size, device="cpu", shuffle=True, drop_last=True, seed=0):
        n = len(images)
        if n == 0 or (drop_last and n < batch_size):
            raise DataError(f"{n} images do not make one batch of {batch_size}; lower the batch size")
        self.batch_size, self.device, self.shuffle, self.drop_last = batch_size, device, shuffle, drop_last
        self.seed = seed
        self.x = torch.empty(images.shape, dtype=torch.uint8, device=device)
        for i in range(0, n, 4096):
            # np.array copies a (possibly read-only, memory-mapped) slice into writable memory, as
            # torch.from_numpy wants; chunks keep the host copy small when the target is a GPU.
            self.x[i:i + 4096] = torch.from_numpy(np.array(images[i:i + 4096]))

    def __len__(self):
        n, b = len(self.x), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch(self, e):
        """Iterator over the batches of epoch `e`. Its order depends only on (seed, e), so a run
        resumed at epoch e sees exactly the batches it would have seen."""
        if self.shuffle:
            g = epoch_generator(self.seed, e)
            order = torch.randperm(len(self.x), generator=g).to(self.device)
        else:
            order = torch.arange(len(self.x), device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            # Permuting NHWC storage to NCHW gives channels_last memory layout for free, which is
            # the layout the convolutional network runs in.
            yield self.x[idx].permute(0, 3, 1, 2).float().div_(255)


# ---------------------------------------------------------------- back to the host

def to_uint8(x):
    """Float images (N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3) on the host, as images are stored."""
    return (x.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description="Prepare and cache a dataset, then print each split's image "
                                "count, shape and mean R, G, B (0-255).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, choices=DATASETS,
                   help="cifar10 is downloaded; celeba must be put in DATA_DIR/celeba/ by hand (see README); "
                        "folder is any tree of images at DATA_DIR")
    p.add_argument("--data-dir", default="data",
                   help="cifar10: where the tarball and caches go; celeba: the folder holding celeba/; "
                        f"folder: the image tree, whose train/ and test/ subfolders are the splits, else "
                        f"every {FOLDER_TEST_EVERY}th image by sorted path is test")
    p.add_argument("--img-size", type=int, default=None,
                   help="side of the square images; None means 32 for cifar10 (its only size), 64 otherwise")
    p.add_argument("--resize", default="bilinear", choices=RESIZE_MODES,
                   help="PIL filter for celeba and folder; nearest makes jaggies (paper Fig. 3)")
    p.add_argument("--preview", metavar="PNG",
                   help="also write the first 64 train images as a grid to this PNG")
    args = p.parse_args(argv)
    try:
        for split in SPLITS[args.dataset]:
            x = load_split(args.dataset, split, args.data_dir, args.img_size, args.resize)
            r, g, b = x.mean(axis=(0, 1, 2))
            shape = "x".join(map(str, x.shape[1:]))
            print(f"{split:5s} {len(x):7d} images  {shape}  mean R,G,B {r:.2f} {g:.2f} {b:.2f}")
        if args.preview:
            train = load_split(args.dataset, "train", args.data_dir, args.img_size, args.resize)
            save_grid(train[:64], args.preview)
            print(f"wrote {args.preview}", file=sys.stderr)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

