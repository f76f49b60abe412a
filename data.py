"""Data for the two-stage VAE (Asperti & Trentin 2020): from files on disk to batches on a device.

- cifar10 (paper section 4.1): the official python tarball, downloaded into --data-dir and
  MD5-checked; 50,000 train / 10,000 test images, at their native 32x32 only.
- celeba (section 4.2): the 202,599 aligned JPEGs in <data-dir>/celeba/img_align_celeba/, put
  there by hand; the 128x128 window at rows 45:173, columns 25:153, resized (64x64 by default).
- folder: any tree of images, centre-cropped to a square and resized. Its train/ and test/
  subfolders are the splits, else every 10th image by sorted path is test. The default size is
  the first image's side if it is square and a power of two, else 64.

Each split is decoded once, on all cores, into a uint8 .npy (N, H, W, 3) that is loaded back
memory-mapped: <data-dir>/cifar10_{split}{J}.npy, <data-dir>/celeba/{split}_{size}_{resize}{J}.npy
(J is _jpeg<Q> or nothing), and a folder's under the celeba names in $XDG_CACHE_HOME (default
~/.cache)/balancing-vae/folder-<key>/. The key hashes the folder's path and its images' paths,
sizes and mtimes, so the folder is never written to and any change to it makes a new cache.

Deviations from the paper and the reference code:
- Lossless by default. The reference saves every CIFAR-10 image as a .jpg at quality 75 and
  reads it back; jpeg=75 (--jpeg 75) gives that protocol, for any dataset.
- Resizing names its PIL filter, default bilinear as the reference's scipy imresize; the paper's
  port to PIL's resize() got nearest neighbour, whose jaggies worsen FID (section 4.2, Fig. 3).
- The CelebA split takes the official index ranges of the sorted file names; the released code
  takes them of an unsorted os.listdir.
- The shuffle of epoch e depends only on (seed, e), so a resumed run needs no saved RNG state.
- --limit takes a seeded random subset, not the first N files (of one class in a sorted folder).
"""
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

import numpy as np
import torch
from PIL import Image

DATASETS = ("cifar10", "celeba", "folder")
SPLITS = {"cifar10": ("train", "test"), "celeba": ("train", "valid", "test"),
          "folder": ("train", "test")}
RESIZE_MODES = {m.name.lower(): m for m in Image.Resampling}  # PIL's filters, by name
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CELEBA_SIZE = (178, 218)  # (width, height) of every aligned image
CELEBA_CROP = (25, 45, 153, 173)  # PIL box (left, upper, right, lower): rows 45:173, cols 25:153
CELEBA_SPLITS = {"train": (0, 162770), "valid": (162770, 182637), "test": (182637, 202599)}


class DataError(Exception):
    """An expected failure (missing file, bad input), reported as one line without a traceback."""


def progress(items, total, desc, unit="images", size=len, leave=True):
    """Yield from `items`, redrawing `desc done/total unit, rate unit/s, ETA m:ss` on stderr at
    most 4 times a second and once at the end; leave=False then wipes the line. It reads only the
    host clock, so it adds no device synchronisation to a CUDA loop."""
    start = last = time.time()
    done = width = 0

    def draw():
        nonlocal width
        rate = done / max(time.time() - start, 1e-9)
        eta = int((total - done) / rate) if total and rate > 0 else 0
        line = (f"{desc} {done:.0f}/{total or '?'} {unit}, {rate:.0f} {unit}/s, "
                f"ETA {eta // 60}:{eta % 60:02d}")
        width = max(width, len(line))
        print(f"\r{line:<{width}}", end="", file=sys.stderr, flush=True)
    for item in items:
        yield item
        done += size(item)
        if time.time() - last >= 0.25:
            last = time.time()
            draw()
    if done:
        draw()
        print("\n" if leave else "\r" + " " * width + "\r", end="", file=sys.stderr, flush=True)


def seconds_per_call(fn, n, device="cpu"):
    """Mean wall-clock seconds of fn() over n calls, a CUDA device synchronised before and after
    so that queued GPU work is counted."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n


def describe(device):
    """A device for a log line: "cuda (its name)" or "cpu (N threads)", the threads torch uses."""
    device = torch.device(device)
    what = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{torch.get_num_threads()} threads")
    return f"{device} ({what})"


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
    """Sorted paths of the image files under `root`, recursively (the order of their paths
    relative to root, which all share its prefix)."""
    return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names
                  if n.lower().endswith(IMAGE_EXTS))


def save_grid(images, path, ncol=8, pad=2):
    """Write uint8 images (N, H, W, 3) as one PNG grid of `ncol` columns, white between."""
    if not os.fspath(path).lower().endswith(".png"):  # not PNG data under a lossy format's name
        raise DataError(f"{path}: image grids are written as PNG (lossless); name the file .png")
    n, h, w, _ = np.shape(images)
    grid = np.full((-(-n // ncol) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        top, left = pad + i // ncol * (h + pad), pad + i % ncol * (w + pad)
        grid[top:top + h, left:left + w] = img
    atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))


def choose_img_size(dataset, data_dir=None):
    """(side, reason) of the default image size: the paper's 32 for CIFAR-10 and 64 for CelebA;
    a folder's first image's side if square and a power of two >= 4, else 64."""
    _check_options(dataset)
    if dataset == "cifar10":
        return 32, "CIFAR-10's only size"
    if dataset == "celeba":
        return 64, "the paper's CelebA size"
    found, _ = _folder_files(data_dir)
    first = found[0][1]
    try:
        with Image.open(first) as im:  # reads the header only
            w, h = im.size
    except Exception as e:  # Pillow raises many types for a broken file
        raise DataError(f"cannot read image {first} ({e}); remove or replace it") from None
    if w == h >= 4 and not w & (w - 1):
        return w, f"the first image is {w}x{h}"
    return 64, f"the first image is {w}x{h}, not a square of a power-of-two side >= 4"


def subset(images, limit, seed):
    """`limit` of `images` drawn without replacement from `seed`, kept in their order (the same
    ones in every stage and resume); None means all of them."""
    if limit is None:
        return images
    if not 1 <= limit <= len(images):
        raise DataError(f"--limit {limit} is not between 1 and {len(images)}, the number of "
                        f"images there")
    return images[np.sort(np.random.default_rng(seed).choice(len(images), limit, replace=False))]


def fingerprint(dataset, data_dir, img_size=None, resize="bilinear", jpeg=None):
    """What a checkpoint records of its data, to compare before resuming or evaluating (file
    names and sizes, no decoding)."""
    _check_options(dataset, resize, jpeg)
    if dataset == "cifar10":
        source, resize = f"md5 {CIFAR_MD5}", None  # never resized
    elif dataset == "celeba":
        source = f"{len(_celeba_paths(data_dir))} images"
    else:
        source = f"folder key {_folder_files(data_dir)[1]}"
    size = choose_img_size(dataset, data_dir)[0] if img_size is None else img_size
    return {"dataset": dataset, "source": source, "img_size": size, "resize": resize,
            "jpeg": jpeg}


def _check_options(dataset, resize="bilinear", jpeg=None):
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if resize not in RESIZE_MODES:
        raise DataError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    if jpeg is not None and (type(jpeg) is not int or not 1 <= jpeg <= 95):
        raise DataError(f"JPEG quality must be an integer from 1 to 95, got {jpeg!r} (the "
                        f"reference's preprocessing uses 75)")


def load_split(dataset, split, data_dir="data", img_size=None, resize="bilinear", download=True,
               jpeg=None):
    """One split as a read-only uint8 memmap (N, H, W, 3) of its cache, which the first call
    prepares (downloading CIFAR-10 if `download`); img_size None is choose_img_size's."""
    _check_options(dataset, resize, jpeg)
    if split not in SPLITS[dataset]:
        raise DataError(f"{dataset} has no split {split!r}; it has {', '.join(SPLITS[dataset])}")
    if os.path.isfile(data_dir):
        raise DataError(f"--data-dir {data_dir} is a file; give the folder that holds the data")
    size = choose_img_size(dataset, data_dir)[0] if img_size is None else img_size
    jpg = f"_jpeg{jpeg}" if jpeg else ""
    if dataset == "cifar10":
        if size != 32:
            raise DataError(f"CIFAR-10 images are 32x32, so img_size must be 32 (got {size}); to "
                            f"train at another size, make them an image folder and use 'folder'")
        cache = os.path.join(data_dir, f"cifar10_{split}{jpg}.npy")
        if not os.path.exists(cache) and jpeg is None:
            _prepare_cifar(data_dir, download)
        elif not os.path.exists(cache):  # from the published pixels, as the reference encodes
            pixels = np.asarray(load_split(dataset, split, data_dir, download=download))
            _decode_to_cache(cache, pixels, False, 32, resize, jpeg, f"cifar10 {split}")
    elif dataset == "celeba":
        cache = os.path.join(data_dir, "celeba", f"{split}_{size}_{resize}{jpg}.npy")
        if not os.path.exists(cache):
            lo, hi = CELEBA_SPLITS[split]
            _decode_to_cache(cache, _celeba_paths(data_dir)[lo:hi], True, size, resize, jpeg,
                             f"celeba {split}")
    else:
        paths, key = _folder_split(data_dir, split)
        home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        cache = os.path.join(home, "balancing-vae", f"folder-{key}",
                             f"{split}_{size}_{resize}{jpg}.npy")
        if not os.path.exists(cache):
            _decode_to_cache(cache, paths, False, size, resize, jpeg, f"folder {split}")
    try:  # our writes are atomic, but a copy may cut a cache short: refused, not rebuilt
        x = np.load(cache, mmap_mode="r")
        ok, why = x.dtype == np.uint8 and x.shape[1:] == (size, size, 3), f"{x.dtype} {x.shape}"
    except (ValueError, EOFError, OSError) as e:
        ok, why = False, e
    if not ok:
        raise DataError(f"the cache {cache} is damaged ({why}); delete it and run again to "
                        f"rebuild it")
    return x


# ---------------------------------------------------------------- CIFAR-10

class _CifarUnpickler(pickle.Unpickler):
    """Refuses every global but numpy's array pieces, all that the official batches use, so a
    tampered file cannot run code (os.system, builtins.eval, ...)."""
    SAFE = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct")}  # the official files; numpy >= 2 writes

    def find_class(self, module, name):
        if (module, name) not in self.SAFE:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which no official "
                                         f"CIFAR-10 batch contains")
        return super().find_class(module, name)


def _download(url, path, md5):
    """Fetch `url` to `path` with a progress line; the file appears only complete and verified."""
    def write(f):
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=60) as r:
            mib = -(-int(r.headers.get("Content-Length") or 0) // 2**20) or None
            for chunk in progress(iter(lambda: r.read(2**20), b""), mib, f"downloading {url}",
                                  "MiB", size=lambda chunk: len(chunk) / 2**20):
                f.write(chunk)
                digest.update(chunk)
        if digest.hexdigest() != md5:
            raise DataError(f"the download of {url} has MD5 {digest.hexdigest()}, not {md5}; "
                            f"run again")
    try:
        atomic_write(path, write)
    except (OSError, http.client.HTTPException) as e:
        raise DataError(f"could not download {url} ({e}). Download it some other way and put it "
                        f"at {path}, then run again.") from None


def _prepare_cifar(data_dir, download):
    """Check (downloading it first if need be) the official tarball and cache both splits."""
    tarball = os.path.abspath(os.path.join(data_dir, "cifar-10-python.tar.gz"))
    if not os.path.exists(tarball):
        if not download:
            raise DataError(f"{tarball} not found; download {CIFAR_URL} and put it there")
        _download(CIFAR_URL, tarball, CIFAR_MD5)
    with open(tarball, "rb") as f:
        found = hashlib.md5(f.read()).hexdigest()
    if found != CIFAR_MD5:
        raise DataError(f"{tarball} has MD5 {found}, not the official {CIFAR_MD5}: it is corrupt "
                        f"or incomplete. Put the official file ({CIFAR_URL}) there, or delete it "
                        f"and run again online to download it, or use --dataset folder with "
                        f"images you have.")
    pixels = {"train": [], "test": []}
    with tarfile.open(tarball, "r:gz") as tar:  # every batch read before any cache is written
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            try:
                f = tar.extractfile(f"cifar-10-batches-py/{name}")
                batch = _CifarUnpickler(f, encoding="bytes").load()
            except pickle.UnpicklingError as e:
                raise DataError(f"cannot read {name} from {tarball}: {e}. Put the official "
                                f"{CIFAR_URL} there and run again.") from None
            # a b'data' row holds the R, then G, then B plane, each 32x32 row-major
            rows = batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            pixels["test" if name == "test_batch" else "train"].append(rows)
    for split, arrays in pixels.items():
        atomic_write(os.path.join(data_dir, f"cifar10_{split}.npy"),
                     lambda f: np.save(f, np.concatenate(arrays)))


# ---------------------------------------------------------------- decoding

def _decode(job):
    """Pool worker: one image as uint8 (size, size, 3), from pixels (CIFAR-10) or from a file,
    cropped (CelebA's window, else the centre square) and resized; then any JPEG round trip."""
    src, celeba, size, resize, jpeg = job
    if not isinstance(src, np.ndarray):
        try:
            with Image.open(src) as im:
                im = im.convert("RGB")
        except Exception as e:  # Pillow raises many types for a broken file
            raise DataError(f"cannot decode image {src} ({e}); remove or replace it, then run "
                            f"again") from None
        w, h = im.size
        if celeba and im.size != CELEBA_SIZE:
            raise DataError(f"{src} is {w}x{h}, not 178x218: not an aligned CelebA image")
        s = min(w, h)
        box = CELEBA_CROP if celeba else ((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)
        src = np.asarray(im.crop(box).resize((size, size), RESIZE_MODES[resize]))
    if jpeg is None:
        return src
    # The reference's imsave to .jpg and imread back, both Pillow, at its defaults (4:2:0 chroma
    # subsampling, the IJG tables scaled by quality); another libjpeg build may round a level off.
    buf = io.BytesIO()
    Image.fromarray(src).save(buf, format="JPEG", quality=jpeg)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def _decode_to_cache(cache, sources, celeba, size, resize, jpeg, desc):
    """Decode every source on all CPU cores, in order, streamed into the cache (a 2.5 GB split
    is never held in memory)."""
    def write(f):
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (len(sources), size, size, 3)})
        with multiprocessing.Pool(os.cpu_count()) as pool:
            images = pool.imap(_decode, ((s, celeba, size, resize, jpeg) for s in sources),
                               chunksize=64)
            for im in progress(images, len(sources), desc, size=lambda im: 1):
                f.write(im.tobytes())
    atomic_write(cache, write)
    print(f"cached {cache}", file=sys.stderr)


def _celeba_paths(data_dir):
    """The sorted paths of all 202,599 aligned CelebA images."""
    folder = os.path.join(data_dir, "celeba", "img_align_celeba")
    if not os.path.isdir(folder):
        raise DataError(f"CelebA not found: expected {folder}/. Download img_align_celeba.zip by "
                        f"hand from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html "
                        f"(\"Align&Cropped Images\") and unzip it in {os.path.dirname(folder)}.")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(".jpg"))
    if len(names) != CELEBA_SPLITS["test"][1]:
        raise DataError(f"found {len(names)} CelebA images in {folder}, not "
                        f"{CELEBA_SPLITS['test'][1]}: the official split needs all of them; "
                        f"unzip img_align_celeba.zip again")
    return [os.path.join(folder, n) for n in names]


# ---------------------------------------------------------------- image folders

def _folder_files(root):
    """Sorted (path relative to root, path) of a folder's images, and its cache key: the SHA-1
    of root's absolute path and each image's relative path, size and mtime."""
    if not os.path.isdir(root):
        what = "is a file" if os.path.isfile(root) else "not found"
        raise DataError(f"image folder {root} {what}; give --data-dir the folder that holds your "
                        f"images")
    prefix = len(os.path.join(root, ""))
    found = [(path[prefix:], path) for path in list_images(root)]
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
    return found, key.hexdigest()[:16]


def _folder_split(root, split):
    """Paths of `split` in an image folder, and the folder's cache key."""
    found, key = _folder_files(root)
    if all(os.path.isdir(os.path.join(root, s)) for s in ("train", "test")):
        chosen = [p for r, p in found if r.split(os.sep)[0] == split]
    else:  # the 10th, 20th, ... is test: every part of a sorted tree (each class) gets some
        chosen = [p for i, (_, p) in enumerate(found, 1) if (i % 10 == 0) == (split == "test")]
    if not chosen:
        raise DataError(f"the {split} split of {root} is empty (train/ and test/ subfolders are "
                        f"the splits; without them every 10th image is test)")
    return chosen, key


# ---------------------------------------------------------------- batches

def epoch_generator(seed, epoch):
    """The CPU generator of one epoch's shuffle (and stage-2 noise): it depends only on (seed,
    epoch), so a resumed run draws the same numbers without saving any RNG state."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class Batches:
    """Minibatches of one split, kept on `device` as one uint8 tensor (N, H, W, 3) and made
    float (B, 3, H, W) in [0, 1] per batch: data this small needs no DataLoader."""

    def __init__(self, images, batch_size, device="cpu", shuffle=True, drop_last=True, seed=0):
        n = len(images)
        if n == 0 or (drop_last and n < batch_size):
            raise DataError(f"{n} images do not make one batch of {batch_size}; lower the batch "
                            f"size")
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.x = torch.empty(images.shape, dtype=torch.uint8, device=device)
        for i in range(0, n, 4096):  # chunks keep the host copy small when the target is a GPU
            # np.array: a writable copy of a read-only memmap's slice, as torch.from_numpy wants
            self.x[i:i + 4096] = torch.from_numpy(np.array(images[i:i + 4096]))

    def __len__(self):
        n, b = len(self.x), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch(self, e):
        """Iterator over the batches of epoch `e`, in an order that depends only on (seed, e)."""
        if self.shuffle:
            order = torch.randperm(len(self.x), generator=epoch_generator(self.seed, e))
        else:
            order = torch.arange(len(self.x))
        order = order.to(self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            # NHWC storage permuted to NCHW is channels_last memory, the layout the network uses
            yield self.x[idx].permute(0, 3, 1, 2).float().div_(255)


def to_uint8(x):
    """Float images (N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3) on the host, as stored."""
    return (x.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
