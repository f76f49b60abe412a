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



@pytest.fixture(autouse=True)
def offline_with_private_cache(monkeypatch, tmp_path):
    """Any download attempt fails as without network; folder caches go to tmp_path/cache."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")
    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))



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


