"""Data for the two-stage VAE: CIFAR-10, CelebA and any image folder, as uint8 arrays.

The paper (Asperti & Trentin 2020) trains on CIFAR-10 at 32x32 (section 4.1) and CelebA at
64x64 (section 4.2), with the preprocessing of Dai & Wipf's and the authors' released code.

- cifar10: the official python tarball, downloaded into --data-dir, MD5-checked and read with
  a restricted unpickler; 50,000 train / 10,000 test images served at their native 32x32 only
  (another --img-size is an error, not a silent resize).
- celeba: <data-dir>/celeba/img_align_celeba/ or the official img_align_celeba.zip beside it
  (read in place, not extracted), put there by hand; sorted file names, split by
  list_eval_partition.txt when present, else by the official index ranges; the 128x128 crop
  at rows 45:173, columns 25:153, resized (64x64 by default).
- folder: any tree of images (jpg, png, ...): centre-cropped to a square, resized to
  --img-size. If the folder has train/ and test/ subfolders they are the splits; otherwise
  every 10th image by sorted relative path (the 10th, 20th, ...) is test and the rest train.
  The default size is the images' own when all are square, of one size and a power of two
  (as the network needs), else 64: `choose_img_size` says which and why.
- jpeg=Q (--jpeg Q), any dataset: each image, after any crop and resize, is encoded as JPEG
  at quality Q and decoded, as the reference's CIFAR-10 preprocessing does with Q = 75.
- `subset(images, limit, seed)`: a seeded random subset of a split (train.py's --limit).

Each split is decoded once on all CPU cores and cached as a uint8 .npy (N, H, W, 3) that is
loaded back memory-mapped: <data-dir>/cifar10_{split}{J}.npy, <data-dir>/celeba/{split}_
{size}_{resize}{J}.npy (J is _jpeg<Q> or nothing), and for folders $XDG_CACHE_HOME (default
~/.cache)/balancing-vae/folder-<key>/, where <key> hashes the folder's path and its images'
paths, sizes and mtimes, so the user's folder is never written to and any change to it
triggers a fresh cache directory, which then replaces that folder's older ones. `fingerprint`
is what a checkpoint records to recognise its data. `Batches` keeps a split on the training
device as one uint8 tensor and yields shuffled float batches in [0, 1].

Deviations from the reference:
- Lossless by default. The reference preprocessing (the authors', as Dai & Wipf's
  preprocess.py) saves every CIFAR-10 image, train and test, as a .jpg at the default quality
  75 and reads it back, so the paper's training images, mse and FID real images carry JPEG
  artefacts. We serve the published pixels unless jpeg=75 asks for that protocol (see
  _jpeg_round_trip). The reference re-encodes only CIFAR-10; CelebA's files are JPEGs already.
- Resizing always names its PIL filter, default bilinear. The reference preprocessing used
  scipy's deprecated imresize (bilinear); the paper's port to plain PIL `resize()` silently
  got nearest neighbour, whose jaggies the VAE cannot reconstruct and which worsen FID
  (section 4.2, Fig. 3). Pillow's own default has since changed again (bicubic since 7).
- The CelebA split is the official partition of the sorted names; the released code splits
  an unsorted os.listdir by the same index ranges.
- Shuffling: the permutation of epoch e depends only on (seed, e), not on a running RNG
  stream, so a resumed run sees the same batches without saving any RNG state.
- A --limit takes a seeded random subset, not the first N files, which in a folder sorted
  by class are all of one class.
"""
import hashlib
import http.client
import io
import json
import multiprocessing
import os
import pickle
import shutil
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
SPLITS = {"cifar10": ("train", "test"), "celeba": ("train", "valid", "test"),
          "folder": ("train", "test")}
# Named, not all of Image.Resampling, which grows with Pillow (13 added two "mks" filters)
RESIZE_MODES = {n: Image.Resampling[n.upper()]
                for n in ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CELEBA_PAGE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"  # "Align&Cropped Images"
CELEBA_SIZE = (178, 218)  # (width, height) of every aligned image
CELEBA_CROP = (25, 45, 153, 173)  # PIL box (left, upper, right, lower): rows 45:173, cols 25:153
CELEBA_SPLITS = {"train": (0, 162770), "valid": (162770, 182637), "test": (182637, 202599)}
FOLDER_TEST_EVERY = 10
FOLDER_SIZE = 64  # a folder's side when its images do not settle one


class DataError(Exception):
    """An expected failure (missing file, bad input), reported as one line without a traceback."""


def progress(items, total, desc, unit="images", size=len, done=0, leave=True):
    """Yield from `items`, redrawing one line on stderr at most 4 times a second (no tqdm):
    `desc done/total unit, rate unit/s, ETA m:ss`. Each item holds size(item) units; `done` units
    were finished before this call (a resumed epoch), and the rate counts only this call's.
    With leave=False the line is wiped at the end (a log line takes its place). It reads nothing
    but the host clock, so it adds no device synchronisation to a CUDA loop."""
    start = last = time.time()
    first = shown = done
    width = 0

    def draw(now):
        nonlocal width
        rate = (done - first) / max(now - start, 1e-9)
        eta = int((total - done) / rate) if total and rate > 0 else 0
        line = (f"{desc} {done:.0f}/{total or '?'} {unit}, {rate:.0f} {unit}/s, "
                f"ETA {eta // 60}:{eta % 60:02d}")
        width = max(width, len(line))
        print(f"\r{line:<{width}}", end="", file=sys.stderr, flush=True)
    for item in items:
        yield item
        done += size(item)
        now = time.time()
        if now - last >= 0.25 or done == total:
            last, shown = now, done
            draw(now)
    if done != shown:  # the last items came within 0.25 s of a redraw: show the final count
        draw(time.time())
    if done > first:
        print("\n" if leave else "\r" + " " * width + "\r", end="", file=sys.stderr, flush=True)


def seconds_per_call(fn, n, device="cpu"):
    """Mean wall-clock seconds of fn() over n calls; a CUDA device is synchronised before and
    after, so queued GPU work is counted (the benchmark modes of train.py and fid.py)."""
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


def _write(path, write):
    """atomic_write of a cache file, where a full disk or a read-only place is a DataError."""
    try:
        atomic_write(path, write)
    except OSError as e:
        raise DataError(f"cannot write {path} ({e.strerror or e}); free some disk space or make "
                        f"that place writable (caches go to --data-dir; folder caches to "
                        f"$XDG_CACHE_HOME, default ~/.cache)") from None


def _images_under(root):
    """Sorted (path relative to root, path) of all image files under `root`, recursively."""
    found = []
    for d, _, names in os.walk(root):
        top = os.path.relpath(d, root)  # once per directory: relpath per file is slow on 60,000
        found += [(n if top == "." else os.path.join(top, n), os.path.join(d, n))
                  for n in names if n.lower().endswith(IMAGE_EXTS)]
    return sorted(found)


def list_images(root):
    """Sorted paths of all image files under `root` (recursively), by relative path."""
    return [path for _, path in _images_under(root)]


def save_grid(images, path, ncol=8, pad=2):
    """Write uint8 images (N, H, W, 3) as one PNG grid of `ncol` columns, white between."""
    if not os.fspath(path).lower().endswith(".png"):  # not PNG data under a lossy format's name
        raise DataError(f"{path}: image grids are written as PNG (lossless); name the file .png")
    images = np.asarray(images)
    n, h, w, _ = images.shape
    grid = np.full((-(-n // ncol) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        top, left = pad + i // ncol * (h + pad), pad + i % ncol * (w + pad)
        grid[top:top + h, left:left + w] = img
    atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))


def choose_img_size(dataset, data_dir=None):
    """(side, reason) of the default image size, printed as f"{side} ({reason})", e.g.
    "32 (every image is 32x32)": the paper's 32 for CIFAR-10 and 64 for CelebA; for a folder
    (data_dir given) its images' own size when all are square, of one size and a power of two
    >= 4, else 64. A folder's image headers are read once (no decoding) and the answer cached
    beside its caches."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if dataset == "cifar10":
        return 32, "CIFAR-10's only size"
    if dataset == "celeba":
        return 64, "the paper's CelebA size"
    if data_dir is None:
        return FOLDER_SIZE, "no folder given to look at"
    return _folder_size(data_dir)


def default_img_size(dataset, data_dir=None):
    """The side that img_size=None means: choose_img_size's, without the reason."""
    return choose_img_size(dataset, data_dir)[0]


def subset(images, limit, seed):
    """`limit` of `images` drawn without replacement from `seed`, in their original order: the
    same ones at every call (a resume, stage 2, the evaluation's bookkeeping). None means all
    of them, unchanged."""
    if limit is None:
        return images
    n = len(images)
    if not 1 <= limit <= n:
        raise DataError(f"--limit {limit} is not between 1 and {n}, the number of images there")
    # Sorted, so the subset keeps the split's order; the shuffle is Batches' job.
    return images[np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))]


def fingerprint(dataset, data_dir, img_size=None, resize="bilinear", jpeg=None):
    """What a checkpoint records of its data, to compare before resuming or evaluating: a
    JSON-able dict of dataset, source, img_size (None resolved), resize (None for CIFAR-10,
    which is never resized) and jpeg. The source is the official MD5 for cifar10 (load_split
    checks the tarball against it), the image count and list_eval_partition.txt's SHA-1 (None
    when absent) for celeba, and the key of its caches for a folder (its path and images'
    paths, sizes, mtimes). Cheap: file names and sizes, no decoding."""
    _check_options(dataset, data_dir, resize, jpeg)
    if dataset == "cifar10":
        source, resize = f"md5 {CIFAR_MD5}", None
    elif dataset == "celeba":
        part = os.path.join(data_dir, "celeba", "list_eval_partition.txt")
        with _celeba_files(data_dir) as (names, _, _):
            sha1 = _hash_file(part, hashlib.sha1()) if os.path.isfile(part) else None
            source = f"{len(names)} images, list_eval_partition.txt sha1 {sha1}"
    else:
        source = f"folder key {_folder_files(data_dir)[2]}"
    size = default_img_size(dataset, data_dir) if img_size is None else img_size
    return {"dataset": dataset, "source": source, "img_size": size, "resize": resize,
            "jpeg": jpeg}


def _check_options(dataset, data_dir, resize, jpeg):
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if resize not in RESIZE_MODES:
        raise DataError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    if jpeg is not None and (type(jpeg) is not int or not 1 <= jpeg <= 95):
        raise DataError(f"JPEG quality must be an integer from 1 to 95, got {jpeg!r} (the "
                        f"reference's preprocessing uses 75)")
    if os.path.isfile(data_dir):
        raise DataError(f"--data-dir {data_dir} is a file; give the folder that holds the data")


def load_split(dataset, split, data_dir="data", img_size=None, resize="bilinear", download=True,
               jpeg=None):
    """One split as a read-only uint8 array (N, H, W, 3), memory-mapped from its cache.

    img_size None is choose_img_size's; jpeg None keeps the decoded pixels, a quality 1..95
    passes each image through a JPEG round trip (see _jpeg_round_trip). The first call prepares
    the cache (downloading CIFAR-10 when `download`); every expected failure raises DataError
    with a message saying what to do."""
    _check_options(dataset, data_dir, resize, jpeg)
    if split not in SPLITS[dataset]:
        raise DataError(f"{dataset} has no split {split!r}; it has {', '.join(SPLITS[dataset])}")
    size = default_img_size(dataset, data_dir) if img_size is None else img_size
    if size < 1:
        raise DataError(f"image size must be positive, got {size}")
    jpg = "" if jpeg is None else f"_jpeg{jpeg}"
    if dataset == "cifar10":
        if size != 32:
            raise DataError(f"CIFAR-10 images are 32x32, so img_size must be 32 (got {size}); to "
                            f"train at another size, convert them to an image folder and use "
                            f"'folder'")
        cache = os.path.join(data_dir, f"cifar10_{split}{jpg}.npy")
        if not os.path.exists(cache) and jpeg is None:
            _prepare_cifar(data_dir, download)
        elif not os.path.exists(cache):  # from the published pixels, as the reference encodes
            pixels = load_split(dataset, split, data_dir, download=download)
            _decode_to_cache(cache, range(len(pixels)), lambda i: np.array(pixels[i]), None, size,
                             resize, jpeg, f"cifar10 {split}")
    elif dataset == "celeba":
        cache = os.path.join(data_dir, "celeba", f"{split}_{size}_{resize}{jpg}.npy")
        if not os.path.exists(cache):
            with _celeba_files(data_dir) as (names, labels, read):
                chosen = [labels[n] for n in _celeba_pick(data_dir, names, split)]
                _decode_to_cache(cache, chosen, read, _celeba_window, size, resize, jpeg,
                                 f"celeba {split}")
    else:
        paths, key = _folder_split(data_dir, split)
        cache = os.path.join(_folder_cache_dir(data_dir, key), f"{split}_{size}_{resize}{jpg}.npy")
        if not os.path.exists(cache):
            _decode_to_cache(cache, paths, _read_file, _centre_square, size, resize, jpeg,
                             f"folder {split}")
    return _load_cache(cache, size)


def _load_cache(path, size):
    """The cache memory-mapped, once it is seen to hold what its name says; a damaged one (cut
    short by a copy, say; our own writes are atomic) is refused, not silently rebuilt."""
    try:
        x = np.load(path, mmap_mode="r")
        ok, why = x.dtype == np.uint8 and x.shape[1:] == (size, size, 3), f"{x.dtype} {x.shape}"
    except (ValueError, EOFError, OSError) as e:
        ok, why = False, e
    if not ok:
        raise DataError(f"the cache {path} is damaged ({why}); delete it and run again to "
                        f"rebuild it")
    return x


def _write_npy(path, shape, arrays):
    """Stream uint8 `arrays`, whose rows together make `shape`, into an .npy file atomically,
    so a 2.5 GB split never has to be held in memory."""
    def write(f):
        header = {"descr": "|u1", "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        for a in arrays:
            f.write(np.ascontiguousarray(a, np.uint8).tobytes())
    _write(path, write)
    print(f"cached {path}", file=sys.stderr)


# ---------------------------------------------------------------- CIFAR-10

class _CifarUnpickler(pickle.Unpickler):
    """The official batches hold only dicts, lists, bytes, ints and numpy arrays; refusing every
    other global (os.system, builtins.eval, ...) means a tampered file cannot run code."""
    SAFE = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # as the official files
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct}  # as numpy >= 2 writes

    def find_class(self, module, name):
        if (module, name) not in self.SAFE:
            raise DataError(f"it refers to {module}.{name}, which no official CIFAR-10 batch "
                            f"contains")
        return self.SAFE[module, name]


def _hash_file(path, h):
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url, path, md5):
    """Fetch `url` to `path` with a progress line; the file only appears complete and
    verified."""
    def write(f):
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=60) as r:
            mib = -(-int(r.headers.get("Content-Length") or 0) // (1 << 20)) or None
            for chunk in progress(iter(lambda: r.read(1 << 20), b""), mib, f"downloading {url}",
                                  "MiB", size=lambda chunk: len(chunk) / (1 << 20)):
                f.write(chunk)
                digest.update(chunk)
        if digest.hexdigest() != md5:
            raise DataError(f"the download of {url} has MD5 {digest.hexdigest()}, not {md5}; "
                            f"run again")
    try:
        atomic_write(path, write)
    except (OSError, http.client.HTTPException) as e:
        raise DataError(f"could not download {url} ({e}). Download it some other way and put it "
                        f"at {os.path.abspath(path)}, then run again.") from None


def _cifar_batch(tar, name):
    """uint8 (N, 32, 32, 3) from one official batch, whose b'data' rows hold the R, then G,
    then B plane, each 32x32 row-major."""
    fix = (f"Put the official {CIFAR_URL} there (MD5 {CIFAR_MD5}) and run again")
    try:
        f = tar.extractfile(f"cifar-10-batches-py/{name}")
        batch = _CifarUnpickler(f, encoding="bytes").load()
    except (KeyError, DataError, pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"cannot read {name} from {tar.name}: {e}. {fix}.") from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8
            and data.shape[1:] == (3072,)):
        raise DataError(f"{name} in {tar.name} is not an official CIFAR-10 batch (no uint8 "
                        f"b'data' with 3072 columns). {fix}.")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _prepare_cifar(data_dir, download):
    """Verify (downloading first if needed) the official tarball and cache both splits."""
    tarball = os.path.abspath(os.path.join(data_dir, "cifar-10-python.tar.gz"))
    if not os.path.exists(tarball):
        if not download:
            raise DataError(f"{tarball} not found; download {CIFAR_URL} and put it there")
        _download(CIFAR_URL, tarball, CIFAR_MD5)
    elif (found := _hash_file(tarball, hashlib.md5())) != CIFAR_MD5:
        raise DataError(f"{tarball} has MD5 {found}, not the official {CIFAR_MD5}: it is corrupt "
                        f"or incomplete. Put the official file ({CIFAR_URL}) there, or delete it "
                        f"and run again online to download it, or use --dataset folder with "
                        f"images you have.")
    with tarfile.open(tarball, "r:gz") as tar:  # read every batch before writing any cache
        splits = {s: [_cifar_batch(tar, n) for n in names] for s, names in CIFAR_BATCHES.items()}
    for split, arrays in splits.items():
        _write_npy(os.path.join(data_dir, f"cifar10_{split}.npy"),
                   (sum(map(len, arrays)), 32, 32, 3), arrays)


# ---------------------------------------------------------------- decoding

def _read_file(path):
    with open(path, "rb") as f:
        return f.read()


def _centre_square(width_height, label):
    w, h = width_height
    s = min(w, h)
    return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s


def _celeba_window(width_height, label):
    if width_height != CELEBA_SIZE:
        raise DataError(f"{label} is {width_height[0]}x{width_height[1]}, not 178x218: not an "
                        f"aligned CelebA image (img_align_celeba)")
    return CELEBA_CROP


def _jpeg_round_trip(pixels, quality):
    """uint8 (H, W, 3) after a JPEG encode at `quality` and a decode, in memory: our equivalent
    of the reference's imwrite to a .jpg and imread back (Dai & Wipf's preprocess.py: scipy.misc
    imsave and imread(mode='RGB'), i.e. Pillow). We rely on Pillow's defaults as it did: 4:2:0
    chroma subsampling, the standard IJG tables scaled by quality, baseline coding; decoding
    with libjpeg's default IDCT and fancy upsampling. What may differ: the JPEG library build
    (the reference's Pillow of 2018-2020; libjpeg-turbo 3 in today's wheels), whose rounding
    can move some pixels by a level, and any writer that is not Pillow (OpenCV's imwrite
    defaults to quality 95)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def _decode(job):
    """Pool worker: one image as uint8 (size, size, 3). With a `crop`, `raw` is an encoded
    image, cropped to the box crop(width_height, label) returns, then resized; without,
    it is pixels already (CIFAR-10). Then the JPEG round trip when `jpeg` is a quality."""
    label, raw, crop, size, resize, jpeg = job
    if crop is not None:
        try:
            with Image.open(io.BytesIO(raw)) as im:
                im = im.convert("RGB")
        except Exception as e:  # Pillow raises many types for broken files: "cannot decode"
            raise DataError(f"cannot decode image {label} ({e}); remove or replace it and run "
                            f"again") from None
        box = crop(im.size, label)
        raw = np.asarray(im.crop(box).resize((size, size), RESIZE_MODES[resize]))
    return raw if jpeg is None else _jpeg_round_trip(raw, jpeg)


def _decode_to_cache(cache, labels, read, crop, size, resize, jpeg, desc):
    """Decode read(label) for every label on all CPU cores, in order, straight into the
    cache."""
    def jobs():  # read here, in the parent, so the workers need no open zip file
        for label in labels:
            try:
                raw = read(label)
            except (OSError, zipfile.BadZipFile) as e:
                raise DataError(f"cannot read {label}: {e}") from None
            yield label, raw, crop, size, resize, jpeg
    desc += f" {resize}" * (crop is not None) + f" {size}x{size}" + f" jpeg{jpeg}" * bool(jpeg)
    with multiprocessing.Pool(os.cpu_count()) as pool:
        images = pool.imap(_decode, jobs(), chunksize=64)
        _write_npy(cache, (len(labels), size, size, 3),
                   progress(images, len(labels), desc, size=lambda im: 1))


# ---------------------------------------------------------------- CelebA

@contextmanager
def _celeba_files(data_dir):
    """Yield the sorted names of the CelebA images, each name's label (its path, or its zip
    member) and a function reading one label's bytes."""
    root = os.path.join(data_dir, "celeba")
    folder = os.path.join(root, "img_align_celeba")
    zpath = folder + ".zip"
    if os.path.isdir(folder):
        names = sorted(f for f in os.listdir(folder) if f.lower().endswith(".jpg"))
        yield names, {n: os.path.join(folder, n) for n in names}, _read_file
    elif os.path.isfile(zpath):
        try:
            zf = zipfile.ZipFile(zpath)
        except zipfile.BadZipFile as e:
            raise DataError(f"{zpath} is not a valid zip ({e}); download it again") from None
        with zf:
            members = {os.path.basename(m): m for m in zf.namelist() if m.lower().endswith(".jpg")}
            yield sorted(members), members, zf.read
    else:
        raise DataError(f"CelebA not found: expected {folder}/ or {zpath}. Download "
                        f"img_align_celeba.zip (and list_eval_partition.txt) by hand from "
                        f"{CELEBA_PAGE} and put it there.")


def _celeba_pick(data_dir, names, split):
    """The sorted file names in `split`: per list_eval_partition.txt (0 train, 1 valid, 2 test)
    when present, else the official index ranges, which need all 202,599 images."""
    root = os.path.join(data_dir, "celeba")
    part_file = os.path.join(root, "list_eval_partition.txt")
    if os.path.isfile(part_file):
        try:
            with open(part_file) as f:
                part = dict(line.split() for line in f if line.strip())
        except ValueError:
            raise DataError(f"{part_file} is not a list of 'name code' lines; fetch it again") \
                from None
        if set(part) != set(names):
            raise DataError(f"{part_file} lists {len(part)} images but {len(names)} were found, "
                            f"and not the same ones; the download is incomplete or mixed: fetch "
                            f"it again")
        code = str(SPLITS["celeba"].index(split))
        return [n for n in names if part[n] == code]
    if len(names) != CELEBA_SPLITS["test"][1]:
        raise DataError(f"found {len(names)} CelebA images in {root}, not "
                        f"{CELEBA_SPLITS['test'][1]}: the split by index needs all of "
                        f"img_align_celeba (or put list_eval_partition.txt there)")
    lo, hi = CELEBA_SPLITS[split]
    return names[lo:hi]


# ---------------------------------------------------------------- image folders

def _folder_files(root):
    """(paths, relative paths, key) of every image under `root`, sorted by relative path; the
    key hashes root's absolute path and each image's relative path, size and mtime."""
    if not os.path.isdir(root):
        what = "is a file" if os.path.isfile(root) else "not found"
        raise DataError(f"image folder {root} {what}; give --data-dir the folder that holds your "
                        f"images")
    found = _images_under(root)
    if not found:
        raise DataError(f"no images ({' '.join(IMAGE_EXTS)}) under {root}; put your images "
                        f"there, or give --data-dir the folder that holds them")
    key = hashlib.sha1(os.path.abspath(root).encode())
    for rel, path in found:
        try:
            st = os.stat(path)
        except OSError as e:  # a broken link, say
            raise DataError(f"cannot read {path} ({e.strerror}); repair or remove it") from None
        key.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return [p for _, p in found], [r for r, _ in found], key.hexdigest()[:16]


def _folder_split(root, split):
    """Paths of `split` in an image folder and a key that changes whenever its images change."""
    paths, rel, key = _folder_files(root)
    if all(os.path.isdir(os.path.join(root, s)) for s in ("train", "test")):
        chosen = [p for p, r in zip(paths, rel) if r.split(os.sep)[0] == split]
    else:  # the 10th, 20th, ... is test: every part of a sorted tree (each class) gets some
        is_test = [(i + 1) % FOLDER_TEST_EVERY == 0 for i in range(len(paths))]
        chosen = [p for p, t in zip(paths, is_test) if t == (split == "test")]
    if not chosen:
        raise DataError(f"the {split} split of {root} is empty (train/ and test/ subfolders are "
                        f"the splits; without them every {FOLDER_TEST_EVERY}th image is test)")
    return chosen, key


def _folder_cache_dir(root, key):
    """$XDG_CACHE_HOME/balancing-vae/folder-<key>/, whose file `source` names its folder. When
    it is new, the same folder's other cache directories, stale since its images changed, are
    removed: otherwise each edit of the folder would leave one more behind, without end."""
    home = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                        "balancing-vae")
    path, source = os.path.join(home, f"folder-{key}"), os.fsencode(os.path.abspath(root))
    if os.path.isfile(os.path.join(path, "source")):
        return path
    _write(os.path.join(path, "source"), lambda f: f.write(source))
    # A directory without `source` predates this bookkeeping: its folder is unknown, so it stays.
    stale = [os.path.join(home, d) for d in sorted(os.listdir(home))
             if d.startswith("folder-") and d != f"folder-{key}"
             and os.path.isfile(s := os.path.join(home, d, "source")) and _read_file(s) == source]
    if stale:
        mb = sum(os.path.getsize(os.path.join(d, f))
                 for s in stale for d, _, fs in os.walk(s) for f in fs) / 1e6
        for s in stale:
            shutil.rmtree(s)
        print(f"removed {len(stale)} stale cache directories ({mb:.0f} MB) of "
              f"{os.path.abspath(root)}, whose images changed", file=sys.stderr)
    return path


def _image_size(path):
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except Exception as e:  # as in _decode
        raise DataError(f"cannot read image {path} ({e}); remove or replace it") from None


def _folder_size(root):
    """choose_img_size for a folder, from the first two distinct sizes among its images: the
    header scan (on all cores) stops at the second, and its result is cached."""
    paths, _, key = _folder_files(root)
    record = os.path.join(_folder_cache_dir(root, key), "image_sizes.json")
    try:
        with open(record) as f:
            sizes = json.load(f)
    except FileNotFoundError:
        sizes = []
        with multiprocessing.Pool(os.cpu_count()) as pool:
            found = pool.imap(_image_size, paths, chunksize=256)
            for wh in progress(found, len(paths), "reading image sizes", size=lambda wh: 1):
                if list(wh) not in sizes:
                    sizes.append(list(wh))
                    if len(sizes) == 2:
                        break
        _write(record, lambda f: f.write(json.dumps(sizes).encode()))
    except ValueError as e:
        raise DataError(f"{record} is damaged ({e}); delete it and run again") from None
    (w, h), *others = sizes
    if others:
        return FOLDER_SIZE, f"images of mixed sizes, e.g. {w}x{h} and {others[0][0]}x{others[0][1]}"
    if w != h:
        return FOLDER_SIZE, f"every image is {w}x{h}, not square"
    if w < 4 or w & (w - 1):
        return FOLDER_SIZE, f"every image is {w}x{w}, not a power of two >= 4 as the network needs"
    return w, f"every image is {w}x{w}"


# ---------------------------------------------------------------- batches for training

def epoch_generator(seed, epoch):
    """The CPU generator of one epoch's shuffle (and stage-2 noise): it depends only on (seed,
    epoch), so a resumed run draws the same numbers without saving any RNG state."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class Batches:
    """Minibatches of one split, kept on `device` as a single uint8 tensor (N, H, W, 3), a
    quarter of float32's memory, and converted per batch to float (B, 3, H, W) in [0, 1] on the
    device; for data this small no DataLoader or worker processes are needed."""

    def __init__(self, images, batch_size, device="cpu", shuffle=True, drop_last=True, seed=0):
        n = len(images)
        if n == 0 or (drop_last and n < batch_size):
            raise DataError(f"{n} images do not make one batch of {batch_size}; lower the batch "
                            f"size")
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.x = torch.empty(images.shape, dtype=torch.uint8, device=device)
        for i in range(0, n, 4096):
            # np.array copies a (possibly read-only, memory-mapped) slice into writable memory,
            # as torch.from_numpy wants; chunks keep the host copy small when the target is a GPU.
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
    """Float images (N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3) on the host, as images are
    stored."""
    return (x.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

