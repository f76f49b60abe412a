"""Tests for the whole project (pytest, CPU only, no network; every fixture is built in tmp_path).

Each test compares with an independent value: a hand computation, a closed form,
torch.distributions, or files built with known contents. Run: python -m pytest -q"""
import argparse
import builtins
import hashlib
import io
import json
import math
import os
import pathlib
import pickle
import re
import tarfile
import urllib.error
import warnings
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
from PIL import Image
from torch.distributions import Normal, kl_divergence

import data
import fid
import train
import vae
from data import DataError


# =============================================================================================
# vae.py and train.py: the loss, gamma, networks, training, resume, evaluation
# =============================================================================================
# ------------------------------------------------------------------ loss, KL, gamma (vae.py)
def test_loss_equals_hand_computation():
    x = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    x_hat = torch.tensor([[0.2, 0.6], [0.5, 0.75]])
    mu = torch.tensor([[0.0], [1.0]])
    logsd = torch.tensor([[0.0], [math.log(0.5)]])
    gamma, k = torch.tensor(0.5), 3.0
    loss, mse, kl = vae.vae_loss(x, x_hat, mu, logsd, gamma, k)
    # by hand: squared errors 0.04 + 0.16 = 0.2 and 0 + 0.25 = 0.25, D = 2 values per sample
    gen = [s / (2 * 0.25) + 2 * math.log(0.5) + 2 * 0.5 * math.log(2 * math.pi) for s in (0.2, 0.25)]
    kls = [0.0, 0.5 * (1 + 0.25 - math.log(0.25) - 1)]
    assert mse.item() == pytest.approx((0.2 + 0.25) / 4, abs=1e-7)
    assert kl.item() == pytest.approx(sum(kls) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(sum(g + k * q for g, q in zip(gen, kls)) / 2, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_equals_torch_distributions(seed):
    g = torch.Generator().manual_seed(seed)
    mu, logsd = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    ref = kl_divergence(Normal(mu, logsd.exp()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(vae.kl_divergence(mu, logsd), ref)


def test_computed_gamma_follows_the_rule():
    g = vae.ComputedGamma()
    est, seen = 1.0, []
    for batch_mse in [0.5, 2.0, 0.1, 0.1, 3.0, 0.01]:
        g.update(torch.tensor(batch_mse))
        est = min(est, 0.99 * est + 0.01 * batch_mse)
        seen.append(g().item())
        assert g().item() == pytest.approx(math.sqrt(est), rel=1e-6)
    assert seen[0] == pytest.approx(math.sqrt(0.995), rel=1e-6)  # 0.99 * 1 + 0.01 * 0.5
    assert seen[1] == seen[0]  # a batch above the estimate leaves it unchanged
    assert seen[4] == seen[3]


def test_computed_gamma_never_increases():
    g, prev = vae.ComputedGamma(), 1.0
    for batch_mse in torch.rand(500, generator=torch.Generator().manual_seed(0)) * 2:
        g.update(batch_mse)
        assert g().item() <= prev
        prev = g().item()


def test_gradients_computed_vs_learned():
    x, x_hat = torch.rand(4, 6), torch.rand(4, 6, requires_grad=True)
    mu, logsd = torch.zeros(4, 2), torch.zeros(4, 2)
    computed = vae.ComputedGamma()
    computed.update(torch.tensor(0.3))
    gamma = computed()
    loss, _, _ = vae.vae_loss(x, x_hat, mu, logsd, gamma)
    loss.backward()
    assert not gamma.requires_grad and list(computed.parameters()) == []
    # d loss / d x_hat = (x_hat - x) / gamma^2 / batch with gamma a constant (eq. 9)
    torch.testing.assert_close(x_hat.grad, (x_hat - x).detach() / gamma ** 2 / 4)
    learned = vae.LearnedGamma()
    loss, _, _ = vae.vae_loss(x, x_hat.detach(), mu, logsd, learned())
    loss.backward()
    # d/d log(gamma) of sse / (2 gamma^2) + D log(gamma) at gamma = 1: D - sse (batch mean), eq. 8
    sse = (x - x_hat.detach()).square().sum(1)
    assert learned.log_gamma.grad.item() == pytest.approx((6 - sse).mean().item(), rel=1e-5)


# ------------------------------------------------------------------ networks
@pytest.mark.parametrize("side,num_scale", [(16, 2), (32, 3), (64, 4)])
def test_stage1_shapes(side, num_scale):
    m = vae.VAE(side, latent_dim=8, base_dim=4, fc_dim=16, num_scale=num_scale)
    x = torch.rand(3, 3, side, side)
    x_hat, mu, logsd = m(x)
    assert x_hat.shape == x.shape and mu.shape == logsd.shape == (3, 8)
    assert 0 < x_hat.min() and x_hat.max() < 1  # sigmoid output
    assert len(m.resample) == (num_scale - 1) + (int(math.log2(side)) - 1)  # down- and up-sampling convs


def test_stage1_matches_reference_layout():
    # Dai & Wipf's decoder: for 32x32 with base 32 the decoder runs 512 (2x2) -> 256 -> 128 -> 64 -> 32 (32x32)
    m = vae.VAE(32)
    ups = [mod for mod in m.decoder.modules() if isinstance(mod, torch.nn.ConvTranspose2d)]
    assert m.fc0.out_features == 4 * 512 and [u.out_channels for u in ups] == [256, 128, 64, 32]
    downs = [mod for mod in m.encoder.modules() if isinstance(mod, torch.nn.Conv2d) and mod.stride == (2, 2)]
    assert [d.out_channels for d in downs] == [64, 128]
    bn = next(mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    assert (bn.momentum, bn.eps) == (0.001, 1e-5)  # TF decay 0.999


def test_stage2_shapes():
    m = vae.SecondStage(latent_dim=8, dim=32, depth=3)
    z_hat, mu, logsd = m(torch.randn(5, 8))
    assert z_hat.shape == mu.shape == logsd.shape == (5, 8)
    assert m.mu.in_features == 32 + 8  # skip-concatenation of the input


@pytest.mark.parametrize("side,k", [(32, 1.0), (64, 4.0)])
def test_kl_weight_by_pixel_count(side, k):
    assert vae.kl_weight_for(side) == k
    assert train.parse_args(["--dataset", "celeba" if side == 64 else "cifar10"]).kl_weight == k


def test_variance_law_closed_form():
    mu = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [3.0, 0.0], [-3.0, 0.0]])
    logsd = torch.log(torch.tensor([[0.1, 1.0], [0.1, 1.0], [0.1, 1.0], [0.1, 1.0]]))
    law, e_var = vae.variance_law(mu, logsd)
    torch.testing.assert_close(law, torch.tensor([5.0 + 0.01, 1.0], dtype=torch.float64))
    torch.testing.assert_close(e_var, torch.tensor([0.01, 1.0], dtype=torch.float64))


# ------------------------------------------------------------------ training (train.py)
TINY = ["--img-size", "16", "--base-dim", "4", "--fc-dim", "16", "--latent-dim", "8", "--num-scale", "2",
        "--second-dim", "16", "--batch-size", "10", "--lr", "2e-3", "--seed", "3", "--sample-every", "2"]


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """60 smooth 16x16 training images (and 30 test) served in place of a data set."""
    yy, xx = np.mgrid[0:16, 0:16] / 15
    rng = np.random.default_rng(0)
    def images(n):
        a, b, c = rng.uniform(0, 1, (3, n, 1, 1))
        return (np.stack([a * xx, b * yy, c * (1 - xx)], -1) * 255).round().astype(np.uint8)
    splits = {"train": images(60), "test": images(30)}
    monkeypatch.setattr(data, "load_split", lambda dataset, split, *a, **k: splits[split])
    monkeypatch.setattr(train, "STOP", [])
    out = str(tmp_path / "run")
    return lambda *argv: train.main([*TINY, "--dataset", "folder", "--out", out, *argv]), out


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        del r["seconds"], r["images_per_s"]
    return rows


def test_training_lowers_mse_and_writes_outputs(tiny):
    run, out = tiny
    run("--epochs", "4")
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[-1]["mse"] < rows[0]["mse"]
    assert all(r["gamma"] <= 1 for r in rows) and rows[-1]["gamma"] < rows[0]["gamma"]
    assert set(rows[0]) >= {"stage", "epoch", "loss", "kl", "mse", "gamma", "var_law", "inactive", "lr"}
    for name in ("stage1.pt", "latent_variance.png", "gamma.png", "recon_e0004.png", "samples_e0002.png"):
        assert os.path.exists(os.path.join(out, name)), name
    ck = torch.load(os.path.join(out, "stage1.pt"), weights_only=True)
    assert ck["epoch"] == 4 and ck["model"]["gamma.mse_est"].item() == pytest.approx(rows[-1]["gamma"] ** 2, rel=1e-5)


def test_stage2_trains_from_stage1_and_eval_writes_table(tiny, capsys):
    run, out = tiny
    run("--epochs", "2")
    run("--stage", "2", "--epochs", "2")
    rows = metrics(out)
    assert [(r["stage"], r["epoch"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert os.path.exists(os.path.join(out, "samples_stage2_e0002.png"))
    run("--eval", "--no-fid", "--n-eval", "25")
    res = json.load(open(os.path.join(out, "eval.json")))
    assert set(res) >= {"rec_fid", "gen1_fid", "gen2_fid", "mse", "var_law", "inactive", "n", "inception", "latent_norm"}
    assert res["n"] == 25 and res["rec_fid"] is None and res["inception"] is None and 0 < res["mse"] < 1
    assert "REC" in capsys.readouterr().out


@pytest.mark.parametrize("stage,lose_line", [(1, False), (2, False), (1, True)])
def test_resume_equals_uninterrupted(tiny, tmp_path, stage, lose_line):
    run, out = tiny
    if stage == 2:
        run("--epochs", "1")
    run("--stage", str(stage), "--epochs", "3")
    straight = metrics(out)
    os.rename(out, str(tmp_path / "straight"))
    if stage == 2:
        run("--epochs", "1")
    run("--stage", str(stage), "--epochs", "2")
    if lose_line:  # killed after the epoch-2 checkpoint, before its metrics line
        path = os.path.join(out, "metrics.jsonl")
        lines = open(path).readlines()
        open(path, "w").writelines(lines[:-1])
    run("--stage", str(stage), "--epochs", "3", "--resume")
    assert metrics(out) == straight


def test_interrupt_mid_epoch_then_resume(tiny, tmp_path, monkeypatch):
    run, out = tiny
    run("--epochs", "2")
    straight = metrics(out)
    os.rename(out, str(tmp_path / "straight"))
    calls = []
    real_update = vae.ComputedGamma.update
    def update(self, batch_mse):  # a SIGINT arriving during the 9th step (epoch 2, step 3)
        real_update(self, batch_mse)
        calls.append(1)
        if len(calls) == 9:
            train.STOP.append(2)
    monkeypatch.setattr(vae.ComputedGamma, "update", update)
    with pytest.raises(SystemExit) as e:
        run("--epochs", "2")
    assert e.value.code == 130
    ck = torch.load(os.path.join(out, "stage1.pt"), weights_only=True)
    assert (ck["epoch"], ck["step"]) == (1, 3)
    monkeypatch.setattr(train, "STOP", [])
    run("--epochs", "2", "--resume")
    assert metrics(out) == straight


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny, monkeypatch, capsys):
    run, out = tiny
    real_loss = vae.vae_loss
    calls = []
    def loss(*a, **k):
        calls.append(1)
        l, mse, kl = real_loss(*a, **k)
        return (l * float("nan") if len(calls) == 8 else l), mse, kl
    monkeypatch.setattr(vae, "vae_loss", loss)
    with pytest.raises(SystemExit):
        run("--epochs", "3")
    assert "non-finite loss at epoch 2, step 2" in capsys.readouterr().err
    assert torch.load(os.path.join(out, "stage1.pt"), weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in metrics(out)] == [1]


def test_clear_errors(tiny, capsys):
    run, out = tiny
    def fails(*argv):
        with pytest.raises(SystemExit):
            run(*argv)
        return capsys.readouterr().err
    assert "train stage 1 first" in fails("--stage", "2", "--epochs", "1")
    assert "train stage 1 first" in fails("--epochs", "1", "--resume")
    assert "train stage 1 first" in fails("--eval", "--no-fid")
    run("--epochs", "1")
    assert "train stage 2 first" in fails("--stage", "2", "--epochs", "1", "--resume")
    assert "--resume" in fails("--epochs", "2")
    assert "--img-size 16" in fails("--epochs", "2", "--resume", "--img-size", "32")
    path = os.path.join(out, "stage1.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    assert "truncated or corrupt" in fails("--epochs", "2", "--resume")


def test_eval_with_fid_on_random_weights(tiny, tmp_path, monkeypatch, capsys):
    import fid
    run, out = tiny
    cache = tmp_path / "cache"
    cache.mkdir()
    test_split = np.load(_save(cache / "test.npy", data.load_split("folder", "test")), mmap_mode="r")
    monkeypatch.setattr(data, "load_split", lambda dataset, split, *a, **k: test_split if split == "test" else
                        np.ascontiguousarray(test_split[:20]))
    weights = tmp_path / "inception.pth"
    torch.manual_seed(0)
    torch.save(fid.InceptionV3().state_dict(), weights)
    run("--epochs", "1", "--batch-size", "10")
    run("--eval", "--n-eval", "4", "--inception-weights", str(weights))
    res = json.load(open(os.path.join(out, "eval.json")))
    net = fid.load_inception("torchvision", str(weights), "cpu")
    real = fid.feature_stats(net, np.asarray(test_split[:4]))
    assert list(cache.glob("fid_stats_*.npz"))  # the real statistics were cached beside the split
    np.testing.assert_allclose(fid.load_stats(next(cache.glob("fid_stats_*.npz")))[0], real[0])
    assert res["inception"] == "torchvision" and res["gen2_fid"] is None
    assert all(isinstance(res[k], float) and res[k] > 0 for k in ("rec_fid", "gen1_fid"))


def _save(path, array):
    np.save(path, array)
    return path


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
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def save_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")  # lossless, whatever the file's extension


# ---------------------------------------------------------------- CIFAR-10

def cifar_image(k):
    """Image k as (row, column, channel): every pixel differs from its transposed or
    plane-swapped counterpart, so a wrong reshape cannot pass."""
    y, x, c = np.indices((32, 32, 3))
    return ((7 * k + 3 * y + 5 * x + 80 * c) % 256).astype(np.uint8)


COUNTS = {**{f"data_batch_{i}": 2 for i in range(1, 6)}, "test_batch": 3}
TRAIN, TEST = np.stack([cifar_image(k) for k in range(10)]), np.stack([cifar_image(k) for k in range(10, 13)])


class Gadget:
    """Unpickling it calls func(*args): what a tampered batch would do."""
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def cifar_tarball(path, module="numpy._core", replace=None):
    """An official-format tarball; `module` spells numpy's module as numpy 2 (numpy._core) or the
    official files (numpy.core) do. `replace` maps a batch name to another object to pickle.
    Returns its MD5."""
    members, k = {}, 0
    for name, n in COUNTS.items():
        # a b'data' row is the R plane, then G, then B, each row-major (the official format)
        rows = np.stack([np.concatenate([cifar_image(i)[:, :, c].ravel() for c in range(3)])
                         for i in range(k, k + n)])
        batch = {b"batch_label": name.encode(), b"labels": [i % 10 for i in range(n)], b"data": rows,
                 b"filenames": [b"%d.png" % i for i in range(n)]}
        # protocol 3 names globals as plain text (GLOBAL opcode), like the official protocol-2 files
        members[name] = pickle.dumps((replace or {}).get(name, batch), protocol=3).replace(
            b"numpy._core.multiarray", module.encode() + b".multiarray")
        k += n
    members["batches.meta"] = pickle.dumps({b"label_names": [b"cat"] * 10, b"num_vis": 3072}, protocol=3)
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
        assert f"downloading {data.CIFAR_URL} (MiB) 1/1" in capsys.readouterr().err
    else:
        with pytest.raises(data.DataError, match="MD5" if outcome == "corrupt" else "connection reset") as e:
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


def test_cifar_corrupt_tarball_is_refused_before_use(cifar_dir):
    tarball = cifar_dir / "cifar-10-python.tar.gz"
    tarball.write_bytes(tarball.read_bytes()[:1000])  # a truncated download
    with pytest.raises(data.DataError, match="MD5") as e:
        data.load_split("cifar10", "train", cifar_dir)
    assert str(tarball) in str(e.value) and "Delete it" in str(e.value)
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


# ---------------------------------------------------------------- CelebA

QUADRANTS = ((0, 0), (0, 64), (64, 0), (64, 64))  # top-left corners inside the 128x128 window


def celeba_colours(k):
    return np.array([(10 * k, 20, 30), (40, 10 * k + 5, 60),
                     (70, 80, 10 * k + 9), (200, 210, 220 - k)], np.uint8)


def celeba_image(k):
    """A 178x218 image, green outside the crop window; the window's quadrants have image k's colours."""
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
    """n CelebA-like files 000001.jpg... (PNG inside: lossless) as a folder or the official zip."""
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


@pytest.mark.parametrize("source", ["folder", "zip"])
@pytest.mark.parametrize("partition, expected", [
    (None, {"train": [0, 1, 2], "valid": [3], "test": [4]}),  # by index, as CELEBA_SPLITS below
    ([0, 2, 0, 1, 0], {"train": [0, 2, 4], "valid": [3], "test": [1]}),
])
def test_celeba_crop_resize_and_split(tmp_path, monkeypatch, source, partition, expected):
    monkeypatch.setattr(data, "CELEBA_SPLITS", {"train": (0, 3), "valid": (3, 4), "test": (4, 5)})
    make_celeba(tmp_path, source=source, partition=partition)
    for split, ks in expected.items():
        assert_celeba(data.load_split("celeba", split, tmp_path), ks)
    assert os.path.exists(tmp_path / "celeba" / "valid_64_bilinear.npy")


def test_celeba_cache_is_per_resize_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CELEBA_SPLITS", {"train": (0, 3), "valid": (3, 4), "test": (4, 5)})
    make_celeba(tmp_path)
    assert_celeba(data.load_split("celeba", "test", tmp_path, resize="lanczos"), [4])
    os.rename(tmp_path / "celeba" / "img_align_celeba", tmp_path / "moved")
    assert_celeba(data.load_split("celeba", "test", tmp_path, resize="lanczos"), [4])  # from the cache
    with pytest.raises(data.DataError, match="CelebA not found"):
        data.load_split("celeba", "test", tmp_path, resize="nearest")


# ---------------------------------------------------------------- image folders

def folder_image(k, wide):
    """A 50x30 (or 30x50) image whose centred 30x30 square is colour k and the rest white."""
    a = np.full((30, 50, 3) if wide else (50, 30, 3), 255, np.uint8)
    (a[:, 10:40] if wide else a[10:40])[:] = (k, 100 + k, 200 - k)
    return a


# Sorted by path relative to the root; created in another order. Index 9 is the test image.
NESTED = ["a/0.png", "a/b/1.bmp", "a/b/c/2.PNG", "a/z.png", "b.png", "c/0.png", "c/1.png", "d.png", "e.png",
          "f/x.png", "g.png", "h.png"]


def make_folder(root, rels, start=0):
    for k, rel in reversed(list(enumerate(rels, start))):
        a = folder_image(k, wide=k % 2 == 0)
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        Image.fromarray(a).save(root / rel, format="BMP" if rel.endswith(".bmp") else "PNG")
    (root / "notes.txt").write_text("not an image")


def colours(ks):
    """The expected 15x15 images: each centre colour k, uniform (so exact in every resize mode)."""
    centres = np.array([(k, 100 + k, 200 - k) for k in ks], np.uint8)
    return np.broadcast_to(centres[:, None, None], (len(ks), 15, 15, 3))


def test_folder_nested_tree_split_every_10th(tmp_path):
    make_folder(tmp_path / "imgs", NESTED)
    before = files_under(tmp_path / "imgs")
    np.testing.assert_array_equal(data.load_split("folder", "test", tmp_path / "imgs", 15), colours([9]))
    np.testing.assert_array_equal(data.load_split("folder", "train", tmp_path / "imgs", 15),
                                  colours([0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11]))
    assert files_under(tmp_path / "imgs") == before  # the caches live elsewhere
    assert all(f.startswith("balancing-vae/folder-") for f in files_under(tmp_path / "cache"))


def test_folder_train_test_subfolders_and_modes(tmp_path):
    make_folder(tmp_path, ["train/cat/0.png", "train/dog/1.png", "test/2.png", "other/3.png"])
    for mode in data.RESIZE_MODES:
        np.testing.assert_array_equal(data.load_split("folder", "train", tmp_path, 15, mode), colours([0, 1]))
        np.testing.assert_array_equal(data.load_split("folder", "test", tmp_path, 15, mode), colours([2]))


def test_folder_grey_and_rgba_become_rgb(tmp_path):
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "0.png")
    Image.fromarray(np.full((8, 8, 4), (1, 2, 3, 0), np.uint8)).save(tmp_path / "1.png")
    x = data.load_split("folder", "train", tmp_path, 8)
    np.testing.assert_array_equal(x[:, 0, 0], [[77, 77, 77], [1, 2, 3]])


def test_folder_cache_follows_changes(tmp_path):
    make_folder(tmp_path, NESTED[:3])
    np.testing.assert_array_equal(data.load_split("folder", "train", tmp_path, 15), colours([0, 1, 2]))
    size = os.path.getsize(tmp_path / "a/b/1.bmp")
    make_folder(tmp_path, ["a/b/1.bmp"], start=51)  # new content, same size (BMP is uncompressed)
    os.utime(tmp_path / "a/b/1.bmp", ns=(1, 1))  # and surely another mtime
    assert os.path.getsize(tmp_path / "a/b/1.bmp") == size
    np.testing.assert_array_equal(data.load_split("folder", "train", tmp_path, 15), colours([0, 51, 2]))
    make_folder(tmp_path, ["zz.png"], start=60)  # an added image
    np.testing.assert_array_equal(data.load_split("folder", "train", tmp_path, 15), colours([0, 51, 2, 60]))


@pytest.mark.parametrize("mode, interior", [("nearest", 255), ("bilinear", 128), ("box", 128)])
def test_resize_modes_really_differ(tmp_path, mode, interior):
    """A 1-pixel checkerboard halved: nearest keeps one phase (the jaggies of Fig. 3), filters average."""
    y, x = np.indices((64, 64))
    board = np.where((x + y) % 2 == 0, 255, 0).astype(np.uint8)
    save_png(str(tmp_path / "0.png"), np.stack([board] * 3, axis=-1))
    out = data.load_split("folder", "train", tmp_path, 32, mode)
    assert (out[0, 1:-1, 1:-1] == interior).all()


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


@pytest.mark.parametrize("setup, call, message", [
    (None, ("mnist", "train"), "unknown dataset 'mnist'"),
    (None, ("folder", "train", "{tmp}", 8, "bogus"), "unknown resize mode 'bogus'"),
    (None, ("folder", "valid", "{tmp}"), "folder has no split 'valid'"),
    (None, ("cifar10", "train", "{tmp}", 64), "CIFAR-10 images are 32x32"),
    (None, ("folder", "train", "{tmp}/nowhere"), "image folder .*nowhere not found"),
    (None, ("folder", "train", "{tmp}"), "no images"),
    ("one image", ("folder", "test", "{tmp}"), "test split of .* is empty"),
    (None, ("celeba", "train", "{tmp}"), "CelebA not found: expected .*img_align_celeba.zip"),
    ("celeba", ("celeba", "train", "{tmp}"), "found 5 CelebA images .* not 202599"),
    ("celeba bad partition", ("celeba", "train", "{tmp}"), "list_eval_partition.txt lists 4 images but 5"),
    ("celeba wrong size", ("celeba", "train", "{tmp}"), "000002.jpg is 50x30, not 178x218"),
])
def test_bad_input_gives_clear_error(tmp_path, setup, call, message):
    if setup == "one image":
        make_folder(tmp_path, ["0.png"])
    elif setup and setup.startswith("celeba"):
        make_celeba(tmp_path, partition=[0, 0, 1, 2] if "partition" in setup else None)
        if "wrong size" in setup:
            save_png(str(tmp_path / "celeba" / "img_align_celeba" / "000002.jpg"), folder_image(0, True))
            part = "".join(f"{k:06d}.jpg 0\n" for k in range(1, 6))  # all train
            (tmp_path / "celeba" / "list_eval_partition.txt").write_text(part)
    args = [a.format(tmp=tmp_path) if isinstance(a, str) else a for a in call]
    with pytest.raises(data.DataError, match=message):
        data.load_split(*args)


# ---------------------------------------------------------------- Batches

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
        return sum((ids(x) for x in data.Batches(IMAGES, 5, seed=seed, shuffle=shuffle).epoch(e)), [])
    assert order(3) == order(3)  # a fresh instance, as after a resume
    assert order(0) != order(1) and order(0, seed=1) != order(0)
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
    argv = ["--dataset", "cifar10", "--data-dir", str(cifar_dir), "--preview", str(tmp_path / "g.png")]
    assert data.main(argv) == 0
    expected = []
    for split, x in [("train", TRAIN), ("test", TEST)]:
        r, g, b = (x[..., c].astype(np.float64).sum() / x[..., c].size for c in range(3))
        expected.append(f"{split:5s} {len(x):7d} images  32x32x3  mean R,G,B {r:.2f} {g:.2f} {b:.2f}")
    assert capsys.readouterr().out.splitlines() == expected
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 + 2 * 34, 2 + 8 * 34, 3)  # 10 images in rows of 8, 2-pixel gaps
    np.testing.assert_array_equal(grid[2:34, 36:68], TRAIN[1])
    np.testing.assert_array_equal(grid[36:68, 2:34], TRAIN[8])


def test_cli_expected_failure_is_one_line_without_traceback(tmp_path, capsys):
    assert data.main(["--dataset", "celeba", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: CelebA not found") and "Traceback" not in err


# =============================================================================================
# fid.py: Inception v3, Frechet distance, command line
# =============================================================================================
# torchvision's Inception3(aux_logits=True) state-dict names and shapes, dumped once with torchvision
MANIFEST = json.loads((pathlib.Path(fid.__file__).resolve().parent / "testdata/inception_manifest.json").read_text())


def spd(rng, d, n=None):
    """A covariance: from n samples (singular when n <= d), else well conditioned."""
    x = rng.standard_normal((n or 3 * d, d)) @ rng.standard_normal((d, d))
    return np.cov(x, rowvar=False)


# ---------------------------------------------------------------- Frechet distance

def _closed_form_cases():
    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2, s = rng.standard_normal(d), rng.standard_normal(d), spd(rng, d)
    a, b = rng.random(d) + 0.1, rng.random(d) + 0.1
    singular = spd(rng, d, n=10)  # N < dimension: rank 9
    dmu2 = np.sum((mu1 - mu2) ** 2)
    return {  # (mu1, sigma1, mu2, sigma2, expected FID, tolerance relative to the trace)
        "equal covariances: squared mean distance": (mu1, s, mu2, s, dmu2, 1e-9),
        "diagonal covariances": (mu1, np.diag(a), mu2, np.diag(b),
                                 np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + dmu2, 1e-9),
        "FID(A, A) = 0": (mu1, s, mu1, s, 0.0, 1e-9),
        # the square roots of the 55 round-off eigenvalues (~1e-16 of the largest) add ~1e-7 of the trace
        "equal singular covariances": (mu1, singular, mu2, singular, dmu2, 1e-6),
    }


@pytest.mark.parametrize("case", list(_closed_form_cases()))
def test_frechet_distance_closed_forms(case):
    mu1, s1, mu2, s2, expected, tol = _closed_form_cases()[case]
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=0, abs=tol * np.trace(s1))


@pytest.mark.parametrize("n", [10, 200])  # singular (N < dimension) and full rank
def test_frechet_distance_matches_sqrtm_and_is_symmetric(n):
    rng = np.random.default_rng(n)
    mu1, mu2, s1, s2 = rng.standard_normal(64), rng.standard_normal(64), spd(rng, 64, n), spd(rng, 64, n)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(
        scipy.linalg.sqrtm(s1 @ s2)).real  # pytorch-fid's route
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-8)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-10)


def test_frechet_distance_fallback_when_the_root_fails(monkeypatch, capsys):
    rng = np.random.default_rng(1)
    a, b = rng.random(8) + 0.1, rng.random(8) + 0.1
    eigvals, calls = np.linalg.eigvals, []

    def fail_once(m):
        calls.append(m)
        if len(calls) == 1:
            raise np.linalg.LinAlgError("did not converge")
        return eigvals(m)

    monkeypatch.setattr(np.linalg, "eigvals", fail_once)
    got = fid.frechet_distance(np.zeros(8), np.diag(a), np.zeros(8), np.diag(b))
    # pytorch-fid's retry: the root of (s1 + 1e-6 I)(s2 + 1e-6 I), the traces of s1 and s2 unchanged
    assert got == pytest.approx(np.sum(a + b - 2 * np.sqrt((a + 1e-6) * (b + 1e-6))), rel=1e-10)
    assert len(calls) == 2 and "adding 1e-6 * I" in capsys.readouterr().err


@pytest.mark.parametrize("stats, message", [
    ((np.full(4, np.nan), np.eye(4), np.zeros(4), np.eye(4)), "NaN"),
    ((np.zeros(4), -np.eye(4), np.zeros(4), np.eye(4)), "imaginary"),  # -I is no covariance: roots of -1
    ((np.zeros(4), np.eye(4), np.zeros(3), np.eye(3)), "do not match"),
])
def test_frechet_distance_refuses_bad_statistics(stats, message):
    with pytest.raises(DataError, match=message):
        fid.frechet_distance(*stats)


# ---------------------------------------------------------------- the network and its weights

def random_state():
    """Random weights with torchvision's names: He-normal convolutions (features stay O(1)), random
    batch-norm statistics, and the classifier heads of the manifest that loading must ignore."""
    torch.manual_seed(0)
    model = fid.InceptionV3()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5), m.bias.data.normal_(0, 0.1)
    heads = {k: torch.randn(shape) for k, shape in MANIFEST.items() if k.startswith(fid.IGNORED)}
    return {**model.state_dict(), **heads}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    state = random_state()
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def model(weights):
    return fid.load_inception("torchvision", weights_path=weights[0], device="cpu")


@pytest.mark.parametrize("variant", ["torchvision", "tf"])
def test_state_dict_matches_torchvision_manifest(variant):
    want = {k: s for k, s in MANIFEST.items() if not k.startswith(("AuxLogits.", "fc."))}
    assert len(want) == len(MANIFEST) - 16
    assert {k: list(v.shape) for k, v in fid.InceptionV3(variant).state_dict().items()} == want


@pytest.mark.parametrize("variant,classes", [("torchvision", 1000), ("tf", 1008)])
def test_weights_file_with_classifier_heads_loads(weights, tmp_path, variant, classes):
    state = {**weights[1], "fc.weight": torch.zeros(classes, 2048), "fc.bias": torch.zeros(classes)}
    torch.save(state, tmp_path / "w.pth")
    loaded = fid.load_inception(variant, weights_path=tmp_path / "w.pth", device="cpu").state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    other = "tf" if variant == "torchvision" else "torchvision"  # the same file under the wrong --inception
    with pytest.raises(DataError, match=f"fc has {classes} classes"):
        fid.load_inception(other, weights_path=tmp_path / "w.pth", device="cpu")


@pytest.mark.parametrize("damage", ["missing", "wrong shape"])
def test_weights_file_refused(weights, tmp_path, damage):
    state = dict(weights[1])
    key = "Mixed_6b.branch7x7_2.conv.weight"
    if damage == "missing":
        del state[key]
        expect = f"missing {key}"
    else:
        state[key] = torch.zeros(128, 128, 7, 1)
        expect = re.escape(f"{key} has shape (128, 128, 7, 1), expected (128, 128, 1, 7)")
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(DataError, match=expect):
        fid.load_inception("tf", weights_path=tmp_path / "w.pth", device="cpu")


def test_no_network_and_no_path_names_url_and_option(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(DataError, match=re.escape(fid.URLS["tf"]) + ".*--inception-weights"):
        fid.load_inception("tf")


@pytest.mark.parametrize("pool, expected", [  # corner output of a 3x3 pool over a 2x2 image: hand computed
    (fid.avg_pool, (1 + 2 + 3 + 4) / 9),   # torchvision counts the 5 padding zeros
    (fid.tf_avg_pool, (1 + 2 + 3 + 4) / 4),  # TF does not (differences 1-3)
    (fid.tf_max_pool, 4.0),                # Mixed_7c max-pools (difference 4)
])
def test_pool_branches(pool, expected):
    assert pool(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))[0, 0, 0, 0].item() == pytest.approx(expected)


def test_tf_variant_uses_the_four_patched_pools():
    m = fid.InceptionV3("tf")
    pools = [m.Mixed_5b.pool, m.Mixed_5d.pool, m.Mixed_6b.pool, m.Mixed_6e.pool, m.Mixed_7b.pool, m.Mixed_7c.pool]
    assert pools == [fid.tf_avg_pool] * 5 + [fid.tf_max_pool]


# ---------------------------------------------------------------- features and statistics

def images(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_float_images_are_quantised_like_files(model, capsys):
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    as_file = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    mu, sigma = fid.feature_stats(model, x, batch_size=2)
    mu_u8, sigma_u8 = fid.feature_stats(model, as_file, batch_size=2)
    assert np.array_equal(mu, mu_u8) and np.array_equal(sigma, sigma_u8)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and mu.dtype == np.float64
    assert "3 images < 2048 features, so the covariance is singular" in capsys.readouterr().err


def test_feature_stats_accepts_a_generator_of_batches(model):
    x = images(3)
    direct = fid.feature_stats(model, x, batch_size=2)
    streamed = fid.feature_stats(model, (x[i:i + 2] for i in (0, 2)))
    assert all(np.array_equal(a, b) for a, b in zip(direct, streamed))


@pytest.mark.parametrize("bad, message", [
    (images(1), "at least 2"),
    (torch.full((2, 3, 8, 8), float("nan")), "NaN"),
    (images(2).astype(np.float32), "uint8"),
])
def test_feature_stats_refuses_bad_input(model, bad, message):
    with pytest.raises(DataError, match=message):
        fid.feature_stats(model, bad)


@pytest.mark.parametrize("before", [True, False])
def test_exact_fp32_turns_tf32_off_and_restores(before):
    flags = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = before
        with fid.exact_fp32():
            assert [f.allow_tf32 for f in flags] == [False, False]
        assert [f.allow_tf32 for f in flags] == [before, before]
    finally:
        for f, value in zip(flags, saved):
            f.allow_tf32 = value


def test_stats_cache_round_trip(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(3.0), np.eye(3)

    path = tmp_path / fid.stats_cache_name("cifar10", "test", 32, 10000, "tf")
    assert path.name == "fid_stats_cifar10_test_32px_n10000_tf.npz"
    first, second = fid.cached_stats(path, compute), fid.cached_stats(path, compute)
    assert len(calls) == 1 and path.exists()
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------- command line

def write_folder(path, x):
    path.mkdir()
    for i, img in enumerate(x):
        Image.fromarray(img).save(path / f"{i:02d}.png")
    return str(path)


def test_cli_matches_direct_statistics(model, weights, tmp_path, monkeypatch, capsys):
    a, b = images(3, seed=1), images(3, size=12, seed=2)
    np.save(tmp_path / "a.npy", a)
    folder = write_folder(tmp_path / "b", b)
    common = ["--inception-weights", str(weights[0]), "--device", "cpu", "--batch-size", "2"]
    assert fid.main([str(tmp_path / "a.npy"), "--save-stats", str(tmp_path / "a_stats.npz"), *common]) == 0
    frechet_distance, recorded = fid.frechet_distance, []  # record what the command line computes with

    def recording(*stats):
        recorded.append((stats, frechet_distance(*stats)))
        return recorded[-1][1]

    monkeypatch.setattr(fid, "frechet_distance", recording)
    capsys.readouterr()
    assert fid.main([str(tmp_path / "a_stats.npz"), folder, *common]) == 0
    (stats, value), = recorded
    direct = fid.feature_stats(model, a, batch_size=2) + fid.feature_stats(model, b, batch_size=2)
    assert all(np.allclose(got, want, rtol=1e-6, atol=1e-9) for got, want in zip(stats, direct))
    assert capsys.readouterr().out == f"{value:.6f}\n" and value > 0


def unreadable_image(p):
    folder = write_folder(p / "images", images(2))
    (p / "images" / "03.png").write_bytes(b"not a png")
    return folder


def junk_npy(p):
    (p / "junk.npy").write_bytes(b"junk")
    return str(p / "junk.npy")


@pytest.mark.parametrize("setup, message", [
    (lambda p: write_folder(p / "one", images(1)), "at least 2"),
    (lambda p: write_folder(p / "empty", images(0)), "no images found"),
    (unreadable_image, "cannot read image .*03.png"),
    (junk_npy, "cannot read .*junk.npy"),
    (lambda p: str(p / "missing.npz"), "missing.npz does not exist"),
])
def test_cli_errors(weights, tmp_path, capsys, setup, message):
    source = setup(tmp_path)
    code = fid.main([source, "--save-stats", str(tmp_path / "s.npz"), "--inception-weights", str(weights[0]),
                     "--device", "cpu"])
    assert code == 1 and re.search(f"^error: .*{message}", capsys.readouterr().err, re.M)


def test_bench_reports_device_and_rate(capsys):
    assert fid.main(["--bench", "--batch-size", "1", "--img-size", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device: cpu") and float(re.search(r"([\d.]+) images/s", out).group(1)) > 0
    assert "batch 1, 8x8 resized to 299x299" in out


@pytest.mark.parametrize("variant", ["channels_last", "compile"])
def test_fast_step_equals_plain_step(variant):
    """The speed settings must not change what is computed: four training steps of the same
    network from the same state give the same losses and weights as a plain fp32 NCHW step."""
    import torch._inductor.config
    args = train.parse_args([*TINY, "--device", "cpu"])
    results = []
    for fmt, compile_ in ((torch.contiguous_format, False), (torch.channels_last, variant == "compile")):
        torch.manual_seed(0)
        model = train.build(vars(args), 1).to(memory_format=fmt)
        opt = train.make_optimizer(model, 1e-3, args.device)
        step = train.make_step(model, opt, argparse.Namespace(**{**vars(args), "compile": compile_}))
        x = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=fmt)
        # compiled code draws its own random numbers unless told to use eager's; with the same
        # noise, the rest of the computation can be compared
        with torch._inductor.config.patch(fallback_random=True):
            results.append(([step(x)[0] for _ in range(4)], model.state_dict()))
    (plain, w_plain), (fast, w_fast) = results
    torch.testing.assert_close(torch.stack(fast), torch.stack(plain), rtol=1e-4, atol=1e-5)
    # body.2 is a conv whose output feeds a batch norm, which removes its bias: the exact gradient of
    # that bias is 0, and Adam scales the round-off left in its place up to +-lr, so it is not compared
    for k in w_plain:
        if not re.search(r"body\.2\.bias$", k):
            torch.testing.assert_close(w_fast[k], w_plain[k], rtol=1e-4, atol=5e-5)


def test_to_uint8_inverts_batches():
    x = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    (batch,) = data.Batches(x, 7, shuffle=False).epoch(0)
    np.testing.assert_array_equal(data.to_uint8(batch), x)


def test_heatmap_cells(tmp_path):
    """Row r, column c of the matrix is the cell at (30 + r * h, 10 + c * w), coloured from dark blue
    (0, an active latent) through teal (0.5) to yellow (1, inactive)."""
    data.save_heatmap(np.array([[0.0, 1.0], [0.5, 0.25]]), tmp_path / "h.png", "title", cell=(3, 2))
    img = np.asarray(Image.open(tmp_path / "h.png"))
    assert [tuple(img[y, x]) for y, x in ((30, 10), (30, 13), (32, 10), (33, 15))] == \
        [(20, 30, 90), (250, 230, 60), (40, 150, 140), (30, 90, 115)]


def test_training_flops_match_a_count_by_layer_shapes():
    """--bench's FLOPs: 2 * multiply-adds of every convolution and dense layer, found from the
    shapes each layer sees; backward costs twice the forward (gradients of input and weight),
    except the first convolution, whose input (the images) needs no gradient."""
    args = train.parse_args(TINY)
    model = train.build(vars(args), 1)
    x = torch.rand(10, 3, 16, 16)
    counts = []
    def count(m, inp, out):
        if isinstance(m, torch.nn.Linear):
            counts.append(2 * m.in_features * m.out_features * len(inp[0]))
        else:  # a transposed convolution does its multiply-adds per input pixel, a convolution per output pixel
            pixels = (inp[0] if isinstance(m, torch.nn.ConvTranspose2d) else out)[0, 0].numel()
            counts.append(2 * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * pixels * len(out))
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            m.register_forward_hook(count)
    flops = train.training_flops(model, x, 1.0)
    assert flops == 3 * sum(counts) - counts[0]


def test_bench_prints_rates_and_flops(capsys):
    train.main([*TINY, "--bench", "--dataset", "folder"])
    out = capsys.readouterr().out
    ips, ms = map(float, re.search(r"([\d.]+) images/s\s+([\d.]+) ms/step", out).groups())
    assert ips == pytest.approx(10 / ms * 1000, rel=0.01)  # batch 10
    model = train.build(vars(train.parse_args(TINY)), 1)
    assert f"{train.training_flops(model, torch.rand(10, 3, 16, 16), 1.0) / 10 / 1e9:.3f} GFLOP/image" in out
    assert "of measured fp32 2048^3 matmul" in out and "speed-up" in out
