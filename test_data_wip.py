"""Tests of data.py (pytest, CPU only, no network; every fixture is built in tmp_path), split
out of test_vae.py while data.py changes.

Each test compares with an independent value: a hand computation, a closed form, or files
built with known contents. Run: python -m pytest -q test_data_wip.py"""
import builtins
import hashlib
import io
import json
import os
import pickle
import re
import tarfile
import urllib.error
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data


# =============================================================================================
# data.py: CIFAR-10, CelebA, image folders, batches
# =============================================================================================
@pytest.fixture(autouse=True)
def offline_with_private_cache(monkeypatch, tmp_path):
    """Any download attempt fails as without network; folder caches go to tmp_path/cache."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")
    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, fs in os.walk(root) for f in fs)


def save_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")  # lossless, whatever the file's extension


def jpeg_round_trip(pixels, quality):
    """The reference's imsave(.jpg) + imread, spelled out: Pillow at `quality`, 4:2:0."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels)).save(buf, format="JPEG", quality=quality,
                                             subsampling="4:2:0")
    return np.asarray(Image.open(buf).convert("RGB"))


def no_image_opens(monkeypatch):
    """From now on, opening any image (here or in a forked worker) fails the call."""
    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened")
    monkeypatch.setattr(data.Image, "open", refuse)


# ---------------------------------------------------------------- CIFAR-10

def cifar_image(k):
    """Image k as (row, column, channel): every pixel differs from its transposed or
    plane-swapped counterpart, so a wrong reshape cannot pass."""
    y, x, c = np.indices((32, 32, 3))
    return ((7 * k + 3 * y + 5 * x + 80 * c) % 256).astype(np.uint8)


COUNTS = {**{f"data_batch_{i}": 2 for i in range(1, 6)}, "test_batch": 3}
TRAIN = np.stack([cifar_image(k) for k in range(10)])
TEST = np.stack([cifar_image(k) for k in range(10, 13)])


class Gadget:
    """Unpickling it calls func(*args): what a tampered batch would do."""
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def cifar_tarball(path, module="numpy._core", replace=None):
    """An official-format tarball; `module` spells numpy's module as numpy 2 (numpy._core) or
    the official files (numpy.core) do. `replace` maps a batch name to another object to
    pickle. Returns its MD5."""
    members, k = {}, 0
    for name, n in COUNTS.items():
        # a b'data' row is the R plane, then G, then B, each row-major (the official format)
        rows = np.stack([np.concatenate([cifar_image(i)[:, :, c].ravel() for c in range(3)])
                         for i in range(k, k + n)])
        batch = {b"batch_label": name.encode(), b"labels": [i % 10 for i in range(n)],
                 b"data": rows, b"filenames": [b"%d.png" % i for i in range(n)]}
        # protocol 3 names globals as plain text (GLOBAL opcode), like the official protocol-2
        raw = pickle.dumps((replace or {}).get(name, batch), protocol=3)
        members[name] = raw.replace(b"numpy._core.multiarray", module.encode() + b".multiarray")
        k += n
    meta = {b"label_names": [b"cat"] * 10, b"num_vis": 3072}
    members["batches.meta"] = pickle.dumps(meta, protocol=3)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setattr(data, "CIFAR_MD5", cifar_tarball(root / "cifar-10-python.tar.gz"))
    return root


def test_official_constants():
    """The reference's facts that the fixtures below replace with small ones."""
    assert data.CIFAR_MD5 == "c58f30108f718f92721af3b95e74349a"
    assert data.CIFAR_URL == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert data.CELEBA_SPLITS == {"train": (0, 162770), "valid": (162770, 182637),
                                  "test": (182637, 202599)}


@pytest.mark.parametrize("module", ["numpy.core", "numpy._core"])
def test_cifar_pixels_exact_and_cached(tmp_path, monkeypatch, module):
    root = tmp_path / "data"
    monkeypatch.setattr(data, "CIFAR_MD5", cifar_tarball(root / "cifar-10-python.tar.gz", module))
    for split, expected in [("train", TRAIN), ("test", TEST)]:
        x = data.load_split("cifar10", split, root)
        assert isinstance(x, np.memmap) and not x.flags.writeable
        np.testing.assert_array_equal(x, expected)
    os.remove(root / "cifar-10-python.tar.gz")  # the caches alone now serve both splits
    np.testing.assert_array_equal(data.load_split("cifar10", "train", root), TRAIN)
    assert files_under(root) == ["cifar10_test.npy", "cifar10_train.npy"]


class FakeResponse(io.BytesIO):
    """What urlopen returns; with `drop`, the connection breaks after the first read."""
    def __init__(self, payload, drop=False):
        super().__init__(payload)
        self.headers, self.drop, self.reads = {"Content-Length": str(len(payload))}, drop, 0

    def read(self, n=-1):
        self.reads += 1
        if self.drop and self.reads > 1:
            raise ConnectionResetError("connection reset by peer")
        return super().read(n)


@pytest.mark.parametrize("outcome", ["ok", "corrupt", "dropped"])
def test_cifar_download_verified_before_use(tmp_path, monkeypatch, capsys, outcome):
    src, root = tmp_path / "official.tar.gz", tmp_path / "data"
    monkeypatch.setattr(data, "CIFAR_MD5", cifar_tarball(src))
    payload = src.read_bytes()
    if outcome == "corrupt":
        payload = payload[:-1] + bytes([payload[-1] ^ 1])
    monkeypatch.setattr(data.urllib.request, "urlopen",
                        lambda url, timeout: FakeResponse(payload, drop=outcome == "dropped"))
    if outcome == "ok":
        np.testing.assert_array_equal(data.load_split("cifar10", "test", root), TEST)
        assert (root / "cifar-10-python.tar.gz").read_bytes() == payload
        # the final count is drawn even when the whole file came within 0.25 s
        assert f"\rdownloading {data.CIFAR_URL} 0/1 MiB, " in capsys.readouterr().err
    else:
        match = "MD5" if outcome == "corrupt" else "connection reset"
        with pytest.raises(data.DataError, match=match) as e:
            data.load_split("cifar10", "train", root)
        assert data.CIFAR_URL in str(e.value)
        assert files_under(root) == []  # neither the partial download nor a cache


@pytest.mark.parametrize("download", [True, False])
def test_cifar_missing_tarball_names_url_and_path(tmp_path, download):
    root = tmp_path / "data"
    with pytest.raises(data.DataError) as e:
        data.load_split("cifar10", "train", root, download=download)
    assert data.CIFAR_URL in str(e.value) and str(root / "cifar-10-python.tar.gz") in str(e.value)
    assert not root.exists() or files_under(root) == []  # no partial download left behind


def test_cifar_corrupt_tarball_is_refused_with_a_way_on_offline(cifar_dir):
    tarball = cifar_dir / "cifar-10-python.tar.gz"
    tarball.write_bytes(tarball.read_bytes()[:1000])  # a truncated download
    found = hashlib.md5(tarball.read_bytes()).hexdigest()
    with pytest.raises(data.DataError) as e:
        data.load_split("cifar10", "train", cifar_dir)
    msg = str(e.value)
    assert f"{tarball} has MD5 {found}, not the official {data.CIFAR_MD5}" in msg
    assert f"Put the official file ({data.CIFAR_URL}) there" in msg
    assert "--dataset folder" in msg
    assert files_under(cifar_dir) == ["cifar-10-python.tar.gz"]


@pytest.mark.parametrize("gadget", ["os.system", "builtins.open"])
def test_cifar_malicious_pickle_is_not_executed(tmp_path, monkeypatch, gadget):
    root, marker = tmp_path / "data", tmp_path / "pwned"
    if gadget == "os.system":
        evil = Gadget(os.system, f"touch {marker}")
    else:
        evil = Gadget(builtins.open, str(marker), "w")
    md5 = cifar_tarball(root / "cifar-10-python.tar.gz", replace={"test_batch": evil})
    monkeypatch.setattr(data, "CIFAR_MD5", md5)
    with pytest.raises(data.DataError, match="test_batch .*no official CIFAR-10 batch contains"):
        data.load_split("cifar10", "train", root)
    assert not marker.exists()
    assert files_under(root) == ["cifar-10-python.tar.gz"]  # not even the (valid) train cache


@pytest.mark.parametrize("cut", [0, 50, -1, "shape"])
def test_damaged_cache_is_refused_then_rebuilt_once_deleted(cifar_dir, cut):
    data.load_split("cifar10", "train", cifar_dir)
    cache = cifar_dir / "cifar10_train.npy"
    if cut == "shape":  # whole, but not what its name says
        np.save(cache, TRAIN[:, :16])
    else:  # empty, header cut, last byte missing
        cache.write_bytes(cache.read_bytes()[:cut])
    with pytest.raises(data.DataError, match=f"the cache {cache} is damaged .*delete it"):
        data.load_split("cifar10", "train", cifar_dir)
    os.remove(cache)
    np.testing.assert_array_equal(data.load_split("cifar10", "train", cifar_dir), TRAIN)


def test_cifar_jpeg_round_trip_of_both_splits(cifar_dir):
    for split, pixels in [("train", TRAIN), ("test", TEST)]:
        x = data.load_split("cifar10", split, cifar_dir, jpeg=75)
        np.testing.assert_array_equal(x, np.stack([jpeg_round_trip(a, 75) for a in pixels]))
        assert np.abs(x.astype(int) - pixels).max() > 0  # lossy indeed
    os.remove(cifar_dir / "cifar-10-python.tar.gz")  # served from the caches from now on
    np.testing.assert_array_equal(data.load_split("cifar10", "test", cifar_dir), TEST)
    q95 = data.load_split("cifar10", "test", cifar_dir, jpeg=95)
    np.testing.assert_array_equal(q95, np.stack([jpeg_round_trip(a, 95) for a in TEST]))
    assert files_under(cifar_dir) == ["cifar10_test.npy", "cifar10_test_jpeg75.npy",
                                      "cifar10_test_jpeg95.npy", "cifar10_train.npy",
                                      "cifar10_train_jpeg75.npy"]


# ---------------------------------------------------------------- CelebA

QUADRANTS = ((0, 0), (0, 64), (64, 0), (64, 64))  # top-left corners inside the 128x128 window


def celeba_colours(k):
    return np.array([(10 * k, 20, 30), (40, 10 * k + 5, 60),
                     (70, 80, 10 * k + 9), (200, 210, 220 - k)], np.uint8)


def celeba_image(k):
    """A 178x218 image, green outside the crop window; the window's quadrants have image k's
    colours."""
    a = np.full((218, 178, 3), (0, 255, 0), np.uint8)
    for (r, c), colour in zip(QUADRANTS, celeba_colours(k)):
        a[45 + r:45 + r + 64, 25 + c:25 + c + 64] = colour
    return a


def assert_celeba(x, ks):
    """At 64x64 each quadrant is 32x32; pixels within 4 of the quadrant borders may blend, all
    others (the outer rim included: any green there would mean a shifted crop) are exact."""
    assert x.shape == (len(ks), 64, 64, 3)
    far = np.ones(64, bool)
    far[28:36] = False
    for img, k in zip(x, ks):
        for (r, c), colour in zip(QUADRANTS, celeba_colours(k)):
            rows, cols = np.arange(r // 2, r // 2 + 32), np.arange(c // 2, c // 2 + 32)
            assert (img[np.ix_(rows[far[rows]], cols[far[cols]])] == colour).all()


def make_celeba(root, n=5, source="folder", partition=None):
    """n CelebA-like files 000001.jpg... (PNG inside: lossless) as a folder or the official
    zip."""
    os.makedirs(root / "celeba", exist_ok=True)
    if source == "folder":
        for k in range(n):
            save_png(root / "celeba" / "img_align_celeba" / f"{k + 1:06d}.jpg", celeba_image(k))
    else:
        with zipfile.ZipFile(root / "celeba" / "img_align_celeba.zip", "w") as zf:
            for k in reversed(range(n)):  # the zip's own order must not matter
                buf = io.BytesIO()
                Image.fromarray(celeba_image(k)).save(buf, format="PNG")
                zf.writestr(f"img_align_celeba/{k + 1:06d}.jpg", buf.getvalue())
    if partition is not None:
        (root / "celeba" / "list_eval_partition.txt").write_text(
            "".join(f"{k + 1:06d}.jpg {p}\n" for k, p in enumerate(partition)))


@pytest.fixture
def small_celeba_splits(monkeypatch):
    monkeypatch.setattr(data, "CELEBA_SPLITS", {"train": (0, 3), "valid": (3, 4), "test": (4, 5)})


@pytest.mark.parametrize("source", ["folder", "zip"])
@pytest.mark.parametrize("partition, expected", [
    (None, {"train": [0, 1, 2], "valid": [3], "test": [4]}),  # by index, small_celeba_splits
    ([0, 2, 0, 1, 0], {"train": [0, 2, 4], "valid": [3], "test": [1]}),
])
def test_celeba_crop_resize_and_split(tmp_path, small_celeba_splits, source, partition,
                                      expected):
    make_celeba(tmp_path, source=source, partition=partition)
    for split, ks in expected.items():
        assert_celeba(data.load_split("celeba", split, tmp_path), ks)
    assert os.path.exists(tmp_path / "celeba" / "valid_64_bilinear.npy")


def test_celeba_cache_is_per_resize_mode(tmp_path, small_celeba_splits):
    make_celeba(tmp_path)
    assert_celeba(data.load_split("celeba", "test", tmp_path, resize="lanczos"), [4])
    os.rename(tmp_path / "celeba" / "img_align_celeba", tmp_path / "moved")
    assert_celeba(data.load_split("celeba", "test", tmp_path, resize="lanczos"), [4])  # cached
    with pytest.raises(data.DataError, match="CelebA not found"):
        data.load_split("celeba", "test", tmp_path, resize="nearest")


def test_celeba_jpeg_comes_after_crop_and_resize(tmp_path, small_celeba_splits):
    make_celeba(tmp_path)
    lossless = data.load_split("celeba", "train", tmp_path)
    x = data.load_split("celeba", "train", tmp_path, jpeg=75)
    np.testing.assert_array_equal(x, np.stack([jpeg_round_trip(a, 75) for a in lossless]))
    assert os.path.exists(tmp_path / "celeba" / "train_64_bilinear_jpeg75.npy")


# ---------------------------------------------------------------- image folders

def folder_image(k, wide):
    """A 50x30 (or 30x50) image whose centred 30x30 square is colour k and the rest white."""
    a = np.full((30, 50, 3) if wide else (50, 30, 3), 255, np.uint8)
    (a[:, 10:40] if wide else a[10:40])[:] = (k, 100 + k, 200 - k)
    return a


# Sorted by path relative to the root; created in another order. Index 9 is the test image.
NESTED = ["a/0.png", "a/b/1.bmp", "a/b/c/2.PNG", "a/z.png", "b.png", "c/0.png", "c/1.png",
          "d.png", "e.png", "f/x.png", "g.png", "h.png"]


def make_folder(root, rels, start=0):
    for k, rel in reversed(list(enumerate(rels, start))):
        a = folder_image(k, wide=k % 2 == 0)
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        Image.fromarray(a).save(root / rel, format="BMP" if rel.endswith(".bmp") else "PNG")
    (root / "notes.txt").write_text("not an image")


def colours(ks):
    """The expected 15x15 images: each centre colour k, uniform (so exact in every resize
    mode)."""
    centres = np.array([(k, 100 + k, 200 - k) for k in ks], np.uint8)
    return np.broadcast_to(centres[:, None, None], (len(ks), 15, 15, 3))


def cache_dirs(tmp_path):
    return sorted(os.listdir(tmp_path / "cache" / "balancing-vae"))


def test_folder_nested_tree_split_every_10th(tmp_path):
    make_folder(tmp_path / "imgs", NESTED)
    before = files_under(tmp_path / "imgs")
    test = data.load_split("folder", "test", tmp_path / "imgs", 15)
    np.testing.assert_array_equal(test, colours([9]))
    np.testing.assert_array_equal(data.load_split("folder", "train", tmp_path / "imgs", 15),
                                  colours([0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11]))
    assert files_under(tmp_path / "imgs") == before  # the caches live elsewhere
    assert all(f.startswith("balancing-vae/folder-") for f in files_under(tmp_path / "cache"))


def test_folder_train_test_subfolders_and_modes(tmp_path):
    make_folder(tmp_path, ["train/cat/0.png", "train/dog/1.png", "test/2.png", "other/3.png"])
    for mode in data.RESIZE_MODES:
        train = data.load_split("folder", "train", tmp_path, 15, mode)
        np.testing.assert_array_equal(train, colours([0, 1]))
        np.testing.assert_array_equal(data.load_split("folder", "test", tmp_path, 15, mode),
                                      colours([2]))


def test_folder_grey_and_rgba_become_rgb(tmp_path):
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "0.png")
    Image.fromarray(np.full((8, 8, 4), (1, 2, 3, 0), np.uint8)).save(tmp_path / "1.png")
    x = data.load_split("folder", "train", tmp_path, 8)
    np.testing.assert_array_equal(x[:, 0, 0], [[77, 77, 77], [1, 2, 3]])


def test_folder_cache_follows_changes_and_replaces_the_stale_one(tmp_path, capsys):
    imgs, other = tmp_path / "imgs", tmp_path / "other"  # another folder's cache stays
    make_folder(imgs, NESTED[:3])
    make_folder(other, ["0.png"])
    data.load_split("folder", "train", other, 15)
    old = tmp_path / "cache" / "balancing-vae" / "folder-0123456789abcdef"
    os.makedirs(old)  # a cache from before caches named their folder: left alone
    np.testing.assert_array_equal(data.load_split("folder", "train", imgs, 15), colours([0, 1, 2]))
    assert len(cache_dirs(tmp_path)) == 3
    size = os.path.getsize(imgs / "a/b/1.bmp")
    make_folder(imgs, ["a/b/1.bmp"], start=51)  # new content, same size (BMP: uncompressed)
    os.utime(imgs / "a/b/1.bmp", ns=(1, 1))  # and surely another mtime
    assert os.path.getsize(imgs / "a/b/1.bmp") == size
    capsys.readouterr()
    np.testing.assert_array_equal(data.load_split("folder", "train", imgs, 15),
                                  colours([0, 51, 2]))
    err = capsys.readouterr().err
    assert f"removed 1 stale cache directories (0 MB) of {imgs}, whose images changed" in err
    assert len(cache_dirs(tmp_path)) == 3  # one of imgs, one of other, the old one
    make_folder(imgs, ["zz.png"], start=60)  # an added image
    np.testing.assert_array_equal(data.load_split("folder", "train", imgs, 15),
                                  colours([0, 51, 2, 60]))
    keys = [data._folder_files(str(f))[2] for f in (imgs, other)]
    assert cache_dirs(tmp_path) == sorted(["folder-0123456789abcdef"] +
                                          [f"folder-{k}" for k in keys])
    source = tmp_path / "cache" / "balancing-vae" / f"folder-{keys[0]}" / "source"
    assert source.read_text() == str(imgs)


@pytest.mark.parametrize("mode, interior", [("nearest", 255), ("bilinear", 128), ("box", 128)])
def test_resize_modes_really_differ(tmp_path, mode, interior):
    """A 1-pixel checkerboard halved: nearest keeps one phase (the jaggies of Fig. 3), filters
    average."""
    y, x = np.indices((64, 64))
    board = np.where((x + y) % 2 == 0, 255, 0).astype(np.uint8)
    save_png(str(tmp_path / "0.png"), np.stack([board] * 3, axis=-1))
    out = data.load_split("folder", "train", tmp_path, 32, mode)
    assert (out[0, 1:-1, 1:-1] == interior).all()


def test_each_resize_mode_is_its_pil_filter_and_default_bilinear(tmp_path):
    """Random pixels, centre-cropped 40x30 -> 30x30 and resized to 17: each mode equals PIL's
    filter of that name, and no mode given means bilinear."""
    a = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    save_png(str(tmp_path / "0.png"), a)
    square = Image.fromarray(a[:, 5:35])
    for mode, pil in [("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC),
                      ("nearest", Image.NEAREST), ("lanczos", Image.LANCZOS),
                      ("box", Image.BOX), ("hamming", Image.HAMMING)]:
        expected = np.asarray(square.resize((17, 17), pil))
        np.testing.assert_array_equal(data.load_split("folder", "train", tmp_path, 17, mode)[0],
                                      expected)
    assert len(data.RESIZE_MODES) == 6
    expected = np.asarray(square.resize((17, 17), Image.BILINEAR))
    np.testing.assert_array_equal(data.load_split("folder", "train", tmp_path, 17)[0], expected)


def test_folder_jpeg_round_trip_per_quality(tmp_path):
    rng = np.random.default_rng(2)
    smooth = np.cumsum(rng.integers(0, 9, (2, 16, 16, 3)), axis=2).astype(np.uint8)
    flat = np.full((16, 16, 3), (200, 30, 90), np.uint8)  # 8x8-aligned blocks of one colour
    for k, a in enumerate([smooth[0], smooth[1], flat]):
        save_png(str(tmp_path / "imgs" / f"{k}.png"), a)
    x75 = data.load_split("folder", "train", tmp_path / "imgs", 16, jpeg=75)
    x95 = data.load_split("folder", "train", tmp_path / "imgs", 16, jpeg=95)
    for x, q in [(x75, 75), (x95, 95)]:
        np.testing.assert_array_equal(x[:2], [jpeg_round_trip(a, q) for a in smooth])
    assert np.abs(x75[2].astype(int) - flat).max() <= 2  # survives almost exactly
    assert not np.array_equal(x75[:2], x95[:2])
    lossless = data.load_split("folder", "train", tmp_path / "imgs", 16)
    np.testing.assert_array_equal(lossless, [smooth[0], smooth[1], flat])
    names = [os.path.basename(f) for f in files_under(tmp_path / "cache") if f.endswith(".npy")]
    assert sorted(names) == ["train_16_bilinear.npy", "train_16_bilinear_jpeg75.npy",
                             "train_16_bilinear_jpeg95.npy"]


def test_undecodable_image_is_named_and_no_cache_is_left(tmp_path):
    make_folder(tmp_path / "imgs", NESTED)
    (tmp_path / "imgs" / "c" / "1.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(data.DataError, match=r"cannot decode image .*c.1\.png"):
        data.load_split("folder", "train", tmp_path / "imgs", 15)
    assert not any(f.endswith(".npy") or ".tmp-" in f for f in files_under(tmp_path / "cache"))
    make_folder(tmp_path / "imgs", NESTED)  # repaired: the next call prepares a good cache
    x = data.load_split("folder", "train", tmp_path / "imgs", 15)
    np.testing.assert_array_equal(x, colours([0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11]))


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "x.npy"
    path.write_bytes(b"old")

    def write_then_fail(f):
        f.write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        data.atomic_write(path, write_then_fail)
    assert files_under(tmp_path) == ["x.npy"] and path.read_bytes() == b"old"


# ---------------------------------------------------------------- default size, identity

@pytest.mark.parametrize("sizes, expected", [
    ([(32, 32)] * 12, (32, "every image is 32x32")),
    ([(32, 32)] * 5 + [(16, 16)] + [(8, 8)], (64, "images of mixed sizes, e.g. 32x32 and 16x16")),
    ([(20, 10)] * 3, (64, "every image is 20x10, not square")),
    ([(48, 48)] * 3, (64, "every image is 48x48, not a power of two >= 4 as the network needs")),
    ([(2, 2)] * 3, (64, "every image is 2x2, not a power of two >= 4 as the network needs")),
])
def test_folder_default_size_from_headers_cached(tmp_path, monkeypatch, sizes, expected):
    for k, (w, h) in enumerate(sizes):
        save_png(str(tmp_path / "imgs" / f"{k:02d}.png"), np.full((h, w, 3), k, np.uint8))
    assert data.choose_img_size("folder", tmp_path / "imgs") == expected
    no_image_opens(monkeypatch)  # the second start reads the cached answer, no image
    assert data.choose_img_size("folder", tmp_path / "imgs") == expected
    assert data.default_img_size("folder", tmp_path / "imgs") == expected[0]


def test_folder_default_size_used_by_load_split_and_follows_changes(tmp_path):
    for k in range(3):
        save_png(str(tmp_path / f"{k}.png"), np.full((8, 8, 3), k, np.uint8))
    assert data.load_split("folder", "train", tmp_path).shape == (3, 8, 8, 3)  # not 64
    save_png(str(tmp_path / "3.png"), np.full((16, 16, 3), 3, np.uint8))
    assert data.choose_img_size("folder", tmp_path)[0] == 64


def test_fixed_default_sizes():
    assert data.choose_img_size("cifar10") == (32, "CIFAR-10's only size")
    assert data.choose_img_size("celeba", "anywhere") == (64, "the paper's CelebA size")


def test_fingerprint_cifar10_ignores_resize(cifar_dir):
    expected = {"dataset": "cifar10", "source": f"md5 {data.CIFAR_MD5}", "img_size": 32,
                "resize": None, "jpeg": 75}
    assert data.fingerprint("cifar10", cifar_dir, None, "nearest", 75) == expected
    assert data.fingerprint("cifar10", cifar_dir, 32, "bilinear", 75) == expected


def test_fingerprint_celeba_counts_and_partition_hash(tmp_path):
    make_celeba(tmp_path, source="zip")
    fp = data.fingerprint("celeba", tmp_path)
    assert fp == {"dataset": "celeba", "source": "5 images, list_eval_partition.txt sha1 None",
                  "img_size": 64, "resize": "bilinear", "jpeg": None}
    make_celeba(tmp_path, source="zip", partition=[0, 0, 0, 1, 2])
    sha1 = hashlib.sha1(b"".join(b"%06d.jpg %d\n" % (k + 1, p)
                                 for k, p in enumerate([0, 0, 0, 1, 2]))).hexdigest()
    fp = data.fingerprint("celeba", tmp_path, 32, "box")
    assert fp["source"] == f"5 images, list_eval_partition.txt sha1 {sha1}"
    assert (fp["img_size"], fp["resize"]) == (32, "box")


def test_fingerprint_folder_is_its_cache_key_and_cheap(tmp_path, monkeypatch):
    make_folder(tmp_path / "imgs", NESTED[:3])
    data.load_split("folder", "train", tmp_path / "imgs", 15)
    (cache,) = cache_dirs(tmp_path)
    no_image_opens(monkeypatch)
    fp = data.fingerprint("folder", tmp_path / "imgs", 15, "box", 90)
    assert fp == {"dataset": "folder", "source": f"folder key {cache[len('folder-'):]}",
                  "img_size": 15, "resize": "box", "jpeg": 90}
    os.utime(tmp_path / "imgs" / "a/0.png", ns=(1, 1))
    assert data.fingerprint("folder", tmp_path / "imgs", 15, "box", 90) != fp


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("setup, call, message", [
    (None, ("mnist", "train"), "unknown dataset 'mnist'"),
    (None, ("folder", "train", "{tmp}", 8, "bogus"), "unknown resize mode 'bogus'"),
    (None, ("folder", "valid", "{tmp}"), "folder has no split 'valid'"),
    (None, ("cifar10", "train", "{tmp}", 64), "CIFAR-10 images are 32x32"),
    (None, ("cifar10", "train", "{tmp}", 0), "image size must be positive, got 0"),
    ("one image", ("folder", "train", "{tmp}", -3), "image size must be positive, got -3"),
    (None, ("folder", "train", "{tmp}/nowhere"),
     "image folder .*nowhere not found; give --data-dir the folder that holds your images"),
    ("one image", ("folder", "train", "{tmp}/0.png"), "0.png is a file; give the folder"),
    ("one image", ("cifar10", "train", "{tmp}/0.png"), "0.png is a file; give the folder"),
    (None, ("folder", "train", "{tmp}"), "no images .* put your images there"),
    ("broken link", ("folder", "train", "{tmp}"), "cannot read .*gone.png .*repair or remove"),
    ("one image", ("folder", "test", "{tmp}"), "test split of .* is empty"),
    ("cache is a file", ("folder", "train", "{tmp}", 8), "cannot write .*free some disk space"),
    (None, ("celeba", "train", "{tmp}"), "CelebA not found: expected .*img_align_celeba.zip"),
    ("celeba", ("celeba", "train", "{tmp}"), "found 5 CelebA images .* not 202599"),
    ("celeba bad partition", ("celeba", "train", "{tmp}"),
     "list_eval_partition.txt lists 4 images but 5"),
    ("celeba wrong size", ("celeba", "train", "{tmp}"), "000002.jpg is 50x30, not 178x218"),
    ("one image", ("folder", "train", "{tmp}", 8, "bilinear", True, 0), "JPEG quality must be"),
    ("one image", ("folder", "train", "{tmp}", 8, "bilinear", True, 96), "from 1 to 95, got 96"),
    ("one image", ("folder", "train", "{tmp}", 8, "bilinear", True, 75.0), "got 75.0"),
])
def test_bad_input_gives_clear_error(tmp_path, monkeypatch, setup, call, message):
    if setup in ("one image", "broken link", "cache is a file"):
        make_folder(tmp_path, ["0.png"] if setup == "one image" else NESTED[:3])
    if setup == "broken link":
        os.symlink(tmp_path / "nothing", tmp_path / "gone.png")
    if setup == "cache is a file":
        (tmp_path / "cachefile").write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cachefile"))
    elif setup and setup.startswith("celeba"):
        make_celeba(tmp_path, partition=[0, 0, 1, 2] if "partition" in setup else None)
        if "wrong size" in setup:
            save_png(str(tmp_path / "celeba" / "img_align_celeba" / "000002.jpg"),
                     folder_image(0, True))
            part = "".join(f"{k:06d}.jpg 0\n" for k in range(1, 6))  # all train
            (tmp_path / "celeba" / "list_eval_partition.txt").write_text(part)
    args = [a.format(tmp=tmp_path) if isinstance(a, str) else a for a in call]
    with pytest.raises(data.DataError, match=message):
        data.load_split(*args)


def test_damaged_size_record_says_delete_it(tmp_path):
    make_folder(tmp_path / "imgs", ["0.png"])
    data.choose_img_size("folder", tmp_path / "imgs")
    (record,) = [f for f in files_under(tmp_path / "cache") if f.endswith("image_sizes.json")]
    (tmp_path / "cache" / record).write_text('[[50, ')
    with pytest.raises(data.DataError, match="image_sizes.json is damaged .*delete it"):
        data.choose_img_size("folder", tmp_path / "imgs")


# ---------------------------------------------------------------- subsets and Batches

def test_subset_is_seeded_spread_sorted_and_checked():
    """1000 'images' sorted by class (100 per class), as a class-folder tree lists them."""
    images = np.arange(1000)[:, None]
    ids = data.subset(images, 100, seed=3)[:, 0]
    expected = np.sort(np.random.default_rng(3).choice(1000, 100, replace=False))
    np.testing.assert_array_equal(ids, expected)  # the documented draw, so resumes agree
    assert (np.diff(ids) > 0).all() and set(ids // 100) == set(range(10))  # every class
    np.testing.assert_array_equal(data.subset(images, 100, seed=3)[:, 0], ids)
    assert not np.array_equal(data.subset(images, 100, seed=4)[:, 0], ids)
    assert data.subset(images, None, seed=3) is images
    np.testing.assert_array_equal(data.subset(images, 1000, seed=3), images)
    for bad in (0, 1001):
        with pytest.raises(data.DataError, match=f"--limit {bad} is not between 1 and 1000"):
            data.subset(images, bad, seed=3)


IMAGES = np.random.default_rng(0).integers(0, 256, (10, 4, 5, 3), dtype=np.uint8)
IMAGES[:, 0, 0, 0] = np.arange(10)  # each image's id


def ids(batch):
    return (batch[:, 0, 0, 0] * 255).round().long().tolist()


@pytest.mark.parametrize("drop_last, sizes", [(True, [3, 3, 3]), (False, [3, 3, 3, 1])])
def test_batches_cover_each_image_once_exactly(drop_last, sizes):
    b = data.Batches(IMAGES, 3, drop_last=drop_last)
    assert len(b) == len(sizes)
    for e in range(3):
        batches = list(b.epoch(e))
        assert [len(x) for x in batches] == sizes
        seen = sum((ids(x) for x in batches), [])
        assert len(set(seen)) == len(seen) == sum(sizes)
        for x in batches:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 4, 5)
            assert x.is_contiguous(memory_format=torch.channels_last)
            expected = IMAGES[ids(x)].transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
            assert torch.equal(x, torch.from_numpy(expected))


def test_batches_order_depends_only_on_seed_and_epoch():
    def order(e, seed=0, shuffle=True):
        batches = data.Batches(IMAGES, 5, seed=seed, shuffle=shuffle).epoch(e)
        return sum((ids(x) for x in batches), [])
    assert order(3) == order(3)  # a fresh instance, as after a resume
    assert order(0) != order(1) and order(0, seed=1) != order(0)
    assert order(1, seed=0) != order(0, seed=1)  # seed and epoch do not just add up
    # the documented generator, so a checkpoint resumed by another version sees the same order
    g = torch.Generator().manual_seed(7 * 1_000_003 + 2)
    assert order(2, seed=7) == torch.randperm(10, generator=g).tolist()
    assert order(0, shuffle=False) == list(range(10))


def test_batches_from_read_only_memmap_without_warning(tmp_path):
    np.save(tmp_path / "x.npy", IMAGES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = data.Batches(np.load(tmp_path / "x.npy", mmap_mode="r"), 10, shuffle=False)
    assert torch.equal(b.x, torch.from_numpy(IMAGES))


def test_batches_too_few_images():
    with pytest.raises(data.DataError, match="10 images do not make one batch of 11"):
        data.Batches(IMAGES, 11)


# ---------------------------------------------------------------- command line

def test_cli_prints_split_stats_and_writes_preview(cifar_dir, tmp_path, capsys):
    argv = ["--dataset", "cifar10", "--data-dir", str(cifar_dir),
            "--preview", str(tmp_path / "g.png")]
    assert data.main(argv) == 0
    expected = []
    for split, x in [("train", TRAIN), ("test", TEST)]:
        r, g, b = (x[..., c].astype(np.float64).sum() / x[..., c].size for c in range(3))
        expected.append(f"{split:5s} {len(x):7d} images  32x32x3  mean R,G,B {r:.2f} {g:.2f} "
                        f"{b:.2f}")
    assert capsys.readouterr().out.splitlines() == expected
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 + 2 * 34, 2 + 8 * 34, 3)  # 10 images in rows of 8, 2-pixel gaps
    np.testing.assert_array_equal(grid[2:34, 36:68], TRAIN[1])
    np.testing.assert_array_equal(grid[36:68, 2:34], TRAIN[8])


def test_cli_folder_default_size_and_jpeg(tmp_path, capsys):
    for k in range(10):
        save_png(str(tmp_path / "imgs" / f"{k}.png"), np.full((8, 8, 3), 10 * k, np.uint8))
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--jpeg", "50"]
    assert data.main(argv) == 0
    out, err = capsys.readouterr()
    assert "image size 8 (every image is 8x8)" in err
    assert out.splitlines()[1] == "test        1 images  8x8x3  mean R,G,B 90.00 90.00 90.00"
    assert any(f.endswith("test_8_bilinear_jpeg50.npy") for f in files_under(tmp_path / "cache"))


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "celeba"], "error: CelebA not found"),
    (["--dataset", "folder", "--data-dir", "{tmp}/f.png"], "error: image folder .*f.png is a file"),
    (["--dataset", "cifar10", "--img-size", "0"], "error: image size must be positive, got 0"),
    (["--dataset", "cifar10", "--preview", "g.jpg"],
     r"error: g\.jpg: image grids are written as PNG \(lossless\); name the file \.png"),
])
def test_cli_expected_failure_is_one_line_without_traceback(tmp_path, capsys, argv, message):
    (tmp_path / "f.png").write_bytes(b"")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert data.main(["--data-dir", str(tmp_path)] + argv) == 1  # the last --data-dir counts
    err = capsys.readouterr().err
    assert re.match(message, err) and err.count("\n") == 1
    assert files_under(tmp_path) == ["f.png"]  # nothing decoded, downloaded or written first


def test_save_grid_refuses_a_name_of_another_format(tmp_path):
    with pytest.raises(data.DataError, match="name the file .png"):
        data.save_grid(IMAGES, tmp_path / "g.jpg")
    assert files_under(tmp_path) == []
