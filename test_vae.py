"""Tests for the whole project: pytest, CPU only, no network. Run: python -m pytest -q

Expected values come from hand computations, closed forms, torch.distributions, numpy/scipy,
files of known contents, torchvision and pytorch-fid. A rule's test names its source; others
read the rule, not restate it. Read-only checks share one trained run, the others copy it.

INDEX: paper (or released code) behaviour -> test
eq. 7 + k eq. 3 loss (eq. 9 up to constants)    -> test_loss_equals_hand_computation
settings of 4.1, 4.2; k by pixel count, 4.2     -> test_defaults_are_the_papers_numbers
computed gamma = sqrt(mse estimate), section 3  -> test_computed_gamma_follows_the_rule
... a constant in eq. 9; learned gamma (D & W)  -> test_computed_gamma_follows_the_rule
gamma updated after each minibatch; l2, 4.2     -> test_a_step_is_eq_7_plus_k_eq_3_plus_l2_at_...
stage-1 network, Fig. 1                         -> test_stage1_shapes_and_the_reference_layout
stage-2 network (Dai & Wipf)                    -> test_stage2_concatenates_its_input_in_both_...
TF1 batch norm, debiased averages (D & W)       -> test_batch_norm_moving_averages_are_debiased
z = mu + sigma eps; REC, GEN-1, GEN-2 sampling  -> test_sampling_in_training_and_evaluation
variance law eq. 6, inactive footnote 3         -> test_variance_law_and_inactive_latents_by_...
Adam with TF1's defaults, 4; lr halving, 4.1    -> test_adam_is_tf1s_and_the_lr_halves_every_...
stage 2 on fresh z = mu + sigma eps (D & W)     -> test_each_epoch_draws_new_noise
... of the frozen stage-1 encoder (D & W)       -> test_limit_draws_a_seeded_subset_kept_by_...
evaluation protocol, 4-5; latent norm., 4.2     -> test_eval_follows_the_protocol
REC, GEN-1, GEN-2 FID against the test images   -> test_eval_scores_each_set_against_the_test_...
E[sigma^2] per latent and epoch, Fig. 6-7       -> test_grids_say_what_they_show_and_the_...
CIFAR-10 (4.1) and CelebA (4.2) official files  -> test_cifar_pixels_exact_and_cached
CelebA, 4.2: crop 45:173 x 25:153, 64x64, split -> test_celeba_crop_resize_and_split_by_sorted_...
the reference's JPEG round trip (quality 75)    -> test_jpeg_round_trip_comes_after_crop_and_...
resize filter matters, Fig. 3                   -> test_each_resize_mode_is_its_pil_filter_...
FID (Heusel et al.; pytorch-fid)                -> test_frechet_distance_closed_forms, ..._sqrtm
Inception features (torchvision, the TF graph)  -> test_features_match_torchvision_and_pytorch_fid
the TF graph's four pools (pytorch-fid)         -> test_each_block_pools_as_its_variant
float64 statistics; FID depends on N (10,000)   -> test_statistics_are_float64_mean_over_images_...
TF32 off for FID features                       -> test_features_are_computed_without_tf32_...
real statistics cached per variant and N        -> test_real_statistics_cache_keeps_inception_...
Table 1 row by row; GEN-2 after 2E, Fig. 2      -> test_table1_row_by_row_as_the_readme_says
"""
import argparse
import builtins
import contextlib
import hashlib
import io
import json
import math
import os
import pathlib
import pickle
import re
import shlex
import shutil
import tarfile
import time
import types
import urllib.error
import warnings

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


# === shared helpers and fixtures =================================================================
def no_network(*args, **kwargs):
    raise urllib.error.URLError("no network")


def offline(monkeypatch, cache):
    """Any download attempt fails as without network; folder caches go to `cache`."""
    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    data.list_images.cache_clear()  # a folder is listed once a process: each test is one


@pytest.fixture(autouse=True)
def offline_with_private_cache(monkeypatch, tmp_path):
    """Every test offline, with its folder caches in tmp_path/cache."""
    offline(monkeypatch, tmp_path / "cache")


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


class Gadget:
    """Unpickling it calls func(*args): what a tampered file would do."""
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# === vae.py: the loss, eq. 3, 7, 9 ===============================================================
def test_loss_equals_hand_computation():
    """eq. 7 over a sample's D values plus k eq. 3 (eq. 9 up to constants), batch-averaged; mse
    the mean of all values, kl eq. 3's batch mean; eq. 3 also against torch.distributions."""
    x = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    x_hat = torch.tensor([[0.2, 0.6], [0.5, 0.75]])
    mu = torch.tensor([[0.0], [1.0]])
    logsd = torch.tensor([[0.0], [math.log(0.5)]])
    gamma, k = torch.tensor(0.5), 3.0
    loss, mse, kl = vae.vae_loss(x, x_hat, mu, logsd, gamma, k)
    # by hand: squared errors 0.04 + 0.16 = 0.2 and 0 + 0.25 = 0.25, D = 2 values per sample
    gen = [s / (2 * 0.25) + 2 * math.log(0.5) + 2 * 0.5 * math.log(2 * math.pi)
           for s in (0.2, 0.25)]
    kls = [0.0, 0.5 * (1 + 0.25 - math.log(0.25) - 1)]
    assert mse.item() == pytest.approx((0.2 + 0.25) / 4, abs=1e-7)
    assert kl.item() == pytest.approx(sum(kls) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(sum(g + k * q for g, q in zip(gen, kls)) / 2, abs=1e-5)
    for seed in (0, 1, 2):
        g = torch.Generator().manual_seed(seed)
        mu, logsd = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
        ref = kl_divergence(Normal(mu, logsd.exp()), Normal(0.0, 1.0)).sum(1)
        torch.testing.assert_close(vae.kl_divergence(mu, logsd), ref)


# === vae.py: gamma, section 3 ====================================================================
def test_computed_gamma_follows_the_rule():
    """Section 3 (0.99, 0.01, start 1.0: the released code's): gamma = sqrt(mse_est), never
    rising; a constant in eq. 9. Dai & Wipf's learned log gamma: d loss / d log gamma, eq. 8."""
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
    for batch_mse in torch.rand(500, generator=torch.Generator().manual_seed(0)) * 2:
        before = g().item()
        g.update(batch_mse)
        assert g().item() <= before
    # eq. 9: the computed gamma is a constant in the loss (no parameter, no gradient through it)
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


# === vae.py: the networks, Fig. 1 (Dai & Wipf's) =================================================
@pytest.mark.parametrize("side,num_scale", [(16, 2), (32, 3), (64, 4)])
def test_stage1_shapes_and_the_reference_layout(side, num_scale):
    """Fig. 1: sigmoid images, mu and log sigma; num_scale - 1 convs down, log2(side) - 1 up.
    Dai & Wipf's layout at 32x32, base 32: 512 (2x2) -> ... -> 32 up, 32 -> 128 down; TF's BN."""
    m = vae.VAE(side, latent_dim=8, base_dim=4, fc_dim=16, num_scale=num_scale)
    x = torch.rand(3, 3, side, side)
    x_hat, mu, logsd = m(x)
    assert x_hat.shape == x.shape and mu.shape == logsd.shape == (3, 8)
    assert 0 < x_hat.min() and x_hat.max() < 1  # sigmoid output
    # the down- and up-sampling convolutions
    assert len(m.resample) == (num_scale - 1) + (int(math.log2(side)) - 1)
    m = vae.VAE(32)
    ups = [mod for mod in m.decoder.modules() if isinstance(mod, torch.nn.ConvTranspose2d)]
    assert m.fc0.out_features == 4 * 512 and [u.out_channels for u in ups] == [256, 128, 64, 32]
    downs = [mod for mod in m.encoder.modules()
             if isinstance(mod, torch.nn.Conv2d) and mod.stride == (2, 2)]
    assert [d.out_channels for d in downs] == [64, 128]
    bn = next(mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    assert (bn.decay, bn.eps) == (0.999, 1e-5)  # TF's batch_norm


def test_stage2_concatenates_its_input_in_both_directions():
    """Dai & Wipf's second stage: [z, mlp(z)] -> mu_u, log sigma_u; [u, mlp(u)] -> z_hat."""
    m = vae.SecondStage(latent_dim=3, dim=5, depth=3)
    z = torch.randn(4, 3)
    z_hat, mu, logsd = m(z)
    assert z_hat.shape == mu.shape == logsd.shape == (4, 3)
    assert m.mu.in_features == 5 + 3  # skip-concatenation of the input

    def mlp(seq, v):
        for lin in seq[::2]:
            v = torch.relu(v @ lin.weight.T + lin.bias)
        return v
    h = torch.cat([z, mlp(m.enc, z)], 1)
    mu, logsd = m.encode(z)
    torch.testing.assert_close(mu, h @ m.mu.weight.T + m.mu.bias)
    torch.testing.assert_close(logsd, h @ m.logsd.weight.T + m.logsd.bias)
    h = torch.cat([z, mlp(m.dec, z)], 1)
    torch.testing.assert_close(m.decode(z), h @ m.z_hat.weight.T + m.z_hat.bias)


def test_batch_norm_moving_averages_are_debiased():
    """TF1's assign_moving_average with zero_debias (Dai & Wipf's batch_norm): after t steps the
    estimate is sum_i (1 - d) d^(t-i) s_i / (1 - d^t); the first step gives the batch's own."""
    bn = vae.VAE(16, 8, 4, 16, 2).encoder[1][0].body[0]
    assert isinstance(bn, vae.BatchNorm) and bn.eps == 1e-5
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 4, 3, 3, generator=g) * (t + 1) + t for t in range(3)]
    d = 0.999
    for t, x in enumerate(batches, 1):
        bn.train()(x)
        w = [(1 - d) * d ** (t - i) / (1 - d ** t) for i in range(1, t + 1)]
        mean = sum(wi * b.mean((0, 2, 3)) for wi, b in zip(w, batches))
        var = sum(wi * b.var((0, 2, 3)) for wi, b in zip(w, batches))  # n/(n-1), as PyTorch
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    # eval mode normalises with those estimates
    x = batches[0]
    y = (x - mean[:, None, None]) / (var[:, None, None] + 1e-5).sqrt()
    torch.testing.assert_close(bn.eval()(x), y, rtol=1e-4, atol=1e-5)


def test_sampling_in_training_and_evaluation():
    """Training decodes z = mu + sigma eps. The released code's eval: REC a sampled z (not mu),
    GEN-1 z ~ N(0, I), GEN-2 u ~ N(0, I) through stage 2's decoder, in that order."""
    m1, m2 = vae.VAE(16, 8, 4, 16, 2).eval(), vae.SecondStage(8, 16, 2).eval()  # eval: no BN noise
    x = torch.rand(4, 3, 16, 16)
    torch.manual_seed(5)
    x_hat, mu, logsd = m1(x)
    torch.manual_seed(5)
    eps = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(x_hat, m1.decode(mu + logsd.exp() * eps))
        assert (x_hat - m1.decode(mu)).abs().max() > 1e-3  # the noise matters
    r, mu, logsd = vae.reconstruct(m1, x, torch.Generator().manual_seed(1))
    eps = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(r, m1.decode(mu + logsd.exp() * eps))
        g = torch.Generator().manual_seed(2)
        z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
        g = torch.Generator().manual_seed(2)
        torch.testing.assert_close(vae.sample_latents(m1, None, 6, g, "cpu"), z1)
        torch.testing.assert_close(vae.sample_latents(m1, m2, 6, g, "cpu"), m2.decode(z2))


# === vae.py: latent statistics, eq. 6, footnote 3 ================================================
def test_variance_law_and_inactive_latents_by_both_definitions():
    """eq. 6: Var[mu] + E[sigma^2]; inactive at E[sigma^2] >= 0.8 (footnote 3); the released
    code's E[sigma]: sigma 0.85 active by the paper only, 0.5 by both, 1 by neither."""
    mu = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [3.0, 0.0], [-3.0, 0.0]])
    logsd = torch.log(torch.tensor([[0.1, 1.0], [0.1, 1.0], [0.1, 1.0], [0.1, 1.0]]))
    law, e_var = vae.variance_law(mu, logsd)
    torch.testing.assert_close(law, torch.tensor([5.0 + 0.01, 1.0], dtype=torch.float64))
    torch.testing.assert_close(e_var, torch.tensor([0.01, 1.0], dtype=torch.float64))
    law, e_sd = vae.variance_law(mu, logsd, released=True)
    torch.testing.assert_close(law, torch.tensor([5.0 + 0.1, 1.0], dtype=torch.float64))
    logsd = torch.log(torch.tensor([[0.85, 0.5, 1.0]])).repeat(4, 1)
    mu = torch.tensor([[0.1, 1.0, 0.0], [-0.1, -1.0, 0.0], [0.1, 1.0, 0.0], [-0.1, -1.0, 0.0]])
    row, e_var = vae.latent_summary(mu, logsd)
    assert (row["inactive"], row["inactive_code"]) == (1, 2)
    assert row["var_law"] == pytest.approx((0.01 + 0.7225 + 1 + 0.25 + 1) / 3, rel=1e-6)
    assert row["var_law_code"] == pytest.approx((0.01 + 0.85 + 1 + 0.5 + 1) / 3, rel=1e-6)
    torch.testing.assert_close(e_var, torch.tensor([0.7225, 0.25, 1.0], dtype=torch.float64),
                               rtol=1e-6, atol=0)


# === train.py: the tiny run, shared by the tests that only read it ===============================

build = vae.build
save_grid = data.save_grid

TINY_FLAGS = dict(img_size=16, base_dim=4, fc_dim=16, latent_dim=8, num_scale=2, second_dim=16,
                  lr=2e-3, halve_every=1, batch_size=10, seed=3)  # lr halved after each epoch
TINY = [*(a for k, v in TINY_FLAGS.items() for a in (f"--{k.replace('_', '-')}", f"{v:g}")),
        "--sample-every", "2"]
TINY_CFG = train.paper_defaults("folder", 16, 1) | TINY_FLAGS  # the tiny stage-1 network's
CPU = argparse.Namespace(device=torch.device("cpu"), compile=False, amp="none")
EPOCHS = {1: 3, 2: 2}  # the shared run's, per stage; 6 steps an epoch (60 images, batch 10)


def image_folder(root, n_train=60, n_test=30, seed=0, side=16):
    """train/ and test/ subfolders of smooth PNG images (lossless, so pixels are known)."""
    rng, (yy, xx) = np.random.default_rng(seed), np.mgrid[0:side, 0:side] / (side - 1)
    for split, n in (("train", n_train), ("test", n_test)):
        os.makedirs(root / split)
        a, b, c = rng.uniform(0, 1, (3, n, 1, 1))
        smooth = (np.stack([a * xx, b * yy, c * (1 - xx)], -1) * 255).round().astype(np.uint8)
        for i, im in enumerate(smooth):
            Image.fromarray(im).save(root / split / f"{i:03d}.png")
    return root


def bare(out, *argv):
    train.main(["--out", out, *argv])


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """60 + 30 16x16 images (`folder`); stage 1 with TINY's flags, then stage 2 (`out`; `one`:
    stage 1 alone); their output (`log`, `err`). Read only: tests that change a run copy it."""
    root = tmp_path_factory.mktemp("shared")
    folder, out, one = image_folder(root / "images"), str(root / "run"), str(root / "stage1")
    log, err = io.StringIO(), io.StringIO()
    with (pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(log),
          contextlib.redirect_stderr(err)):
        offline(m, root / "cache")
        train.main([*TINY, "--dataset", "folder", "--data-dir", str(folder), "--out", out,
                    "--epochs", str(EPOCHS[1])])
        shutil.copytree(out, one)
        bare(out, "--stage", "2", "--epochs", str(EPOCHS[2]), "--second-dim", "16",
             "--batch-size", "10")
    return types.SimpleNamespace(folder=folder, out=out, one=one, log=log.getvalue(),
                                 err=err.getvalue())


def copy_run(src, tmp_path, name="run"):
    """A copy of a shared run (shared.out or shared.one), by default at tiny's --out."""
    return str(shutil.copytree(src, tmp_path / name))


@pytest.fixture
def tiny(shared, tmp_path):
    """run(*argv): train.py with TINY's flags on the shared folder, --out tmp_path/run."""
    out = str(tmp_path / "run")

    def run(*argv):
        train.main([*TINY, "--dataset", "folder", "--data-dir", str(shared.folder), "--out", out,
                    *argv])
    return run, out


def load_model(out, stage):
    ck = train.load_checkpoint(out, stage, "cpu")
    return build(ck["config"], stage, "cpu", ck["model"]).eval()


def metrics(out, stage=1):
    with open(os.path.join(out, f"metrics_stage{stage}.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        del r["seconds"], r["images_per_s"]
    return rows


def as_batch(images):
    """uint8 (N, H, W, 3) as the networks take them: float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255


def tiles(path, n, recon=False, side=16, ncol=8, pad=2):
    """A save_grid grid's first n images (below the title, right of row names), at 1x."""
    grid, s = np.asarray(Image.open(path))[20 + pad:, 60 * recon + pad:], 4 * side + pad
    return np.stack([grid[r * s:r * s + 4 * side:4, c * s:c * s + 4 * side:4]
                     for r, c in (divmod(i, ncol) for i in range(n))])


# === train.py: settings, 4.1/4.2 =================================================================
@pytest.mark.parametrize("dataset, side, stage, numbers", [
    # epochs, lr, halve_every, kl_weight, l2, num_scale, second_dim
    ("cifar10", 32, 1, (700, 1e-4, 200, 1.0, 0.0, 3, 2048)),
    ("cifar10", 32, 2, (1400, 1e-4, 100, 1.0, 0.0, 3, 2048)),
    ("celeba", 64, 1, (70, 5e-5, 60, 4.0, 1e-3, 4, 4096)),
    ("celeba", 64, 2, (140, 5e-5, 120, 1.0, 0.0, 4, 4096)),
    ("folder", 16, 1, (700, 1e-4, 200, 0.25, 0.0, 2, 2048)),
    ("folder", 64, 1, (70, 5e-5, 60, 4.0, 1e-3, 4, 4096)),
])
def test_defaults_are_the_papers_numbers(dataset, side, stage, numbers):
    """Sections 4, 4.1, 4.2, Fig. 1 (CelebA's halvings and stage-2 epochs: the released code's
    comments): CelebA's for sides >= 64, else CIFAR-10's; k by pixel count (4.2); 1 in stage 2."""
    common = dict(paper="CelebA" if side >= 64 else "CIFAR-10", dataset=dataset, img_size=side,
                  batch_size=100, gamma="computed", latent_dim=64, base_dim=32, fc_dim=512,
                  block_per_scale=1, depth_per_block=2, second_depth=3, seed=0,
                  resize="bilinear", jpeg=None, limit=None)
    expected = dict(zip(("epochs", "lr", "halve_every", "kl_weight", "l2", "num_scale",
                         "second_dim"), numbers))
    assert train.paper_defaults(dataset, side, stage) == {**common, **expected}
    assert stage == 2 or vae.kl_weight_for(side) == expected["kl_weight"]


def test_adam_is_tf1s_and_the_lr_halves_every_200_epochs():
    """Paper 4: two Adam steps by hand with TF1's defaults (eps added to the root of the second
    moment). Paper 4.1: 1e-4, halved every 200 epochs; epoch is 0-based."""
    epochs = (0, 199, 200, 399, 400, 600, 699)
    assert [train.lr_at(dict(lr=1e-4, halve_every=200), e) for e in epochs] == [
        1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5, 1.25e-5, 1.25e-5]
    p = nn.Parameter(torch.zeros((), dtype=torch.float64))
    opt = train.make_optimizer(nn.ParameterList([p]), 0.1, torch.device("cpu"))
    want, m, v = 0.0, 0.0, 0.0
    for t, grad in enumerate((3.0, -1.0), 1):
        opt.zero_grad()
        (grad * p).backward()
        opt.step()
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad ** 2
        want -= 0.1 * (m / (1 - 0.9 ** t)) / (math.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        assert p.item() == pytest.approx(want, rel=1e-12)


def test_a_new_run_takes_the_papers_settings_then_the_flags_given(shared, tmp_path):
    """Stage 1: paper_defaults, then the flags; stage 2: the paper's, stage 1's data and
    network, then its flags; a resume the checkpoint's, then --epochs; the start line says so."""
    cfg1, cfg2 = (torch.load(os.path.join(shared.out, f"stage{s}.pt"), weights_only=True)["config"]
                  for s in (1, 2))
    want = train.paper_defaults("folder", 16, 1) | TINY_FLAGS | dict(epochs=EPOCHS[1])
    assert {k: cfg1[k] for k in want} == want
    assert cfg1["images"] == {"train": 60, "test": 30} and cfg1["stage1_epoch"] is None
    paper2 = train.paper_defaults("folder", 16, 2)
    assert {k: cfg2[k] for k in ("lr", "halve_every", "kl_weight", "l2", "second_depth")} == {
        k: paper2[k] for k in ("lr", "halve_every", "kl_weight", "l2", "second_depth")}
    same = ("dataset", "img_size", "resize", "jpeg", "limit", "seed", "latent_dim", "base_dim",
            "fc_dim", "num_scale", "images", "data_dir")
    assert {k: cfg2[k] for k in same} == {k: cfg1[k] for k in same}
    assert (cfg2["second_dim"], cfg2["batch_size"], cfg2["stage1_epoch"]) == (16, 10, EPOCHS[1])
    # Dai & Wipf learn both gammas: a new stage 2 takes stage 1's policy, unless --gamma says
    learned = copy_run(shared.one, tmp_path, "learned")
    ck = torch.load(os.path.join(learned, "stage1.pt"), weights_only=True)
    ck["config"]["gamma"] = "learned"
    torch.save(ck, os.path.join(learned, "stage1.pt"))
    for given, gamma in (([], "learned"), (["--gamma", "computed"], "computed")):
        args = train.parse_args(["--out", learned, "--stage", "2", *given])
        assert train.configure(args)[0]["gamma"] == gamma
    # the start line says what is trained, on what, and whence the settings come
    paper = train.paper_defaults("folder", 16, 1)["paper"]
    assert re.search(
        r"stage 1 on cpu \(\d+ threads\): folder 60 train images 16x16, [\d,]+ parameters, "
        r"computed gamma, lr 0.002, batch 10, 6 steps an epoch; new run, 3 epochs in all; "
        "settings: the paper's "
        f"{paper} settings, --dataset folder, --img-size 16, --seed 3, --latent-dim 8, .*, "
        "--lr 0.002, --halve-every 1, --batch-size 10, --epochs 3; out ", shared.log)
    assert (f"; settings: the paper's {paper} settings and {shared.out}/stage1.pt's data, "
            "network and gamma, --second-dim 16, --batch-size 10, --epochs 2; out ") in shared.log
    args = train.parse_args(["--out", shared.one, "--epochs", "4", "--resume"])
    assert train.configure(args)[2] == f"{shared.one}/stage1.pt's, --epochs 4"
    args = train.parse_args([*TINY, "--dataset", "folder", "--data-dir", str(shared.folder),
                             "--img-size", "64", "--out", str(tmp_path / "run64")])
    paper = train.paper_defaults("folder", 64, 1)["paper"]
    assert train.configure(args)[2].startswith(
        f"the paper's {paper} settings, --dataset folder, --img-size 64, ")
    assert re.search(r"stage 1 epoch 1/3 60/60 images, \d+ images/s, ETA 0:00", shared.err)
    row = json.loads(open(os.path.join(shared.out, "metrics_stage1.jsonl")).readline())
    assert row["images_per_s"] * row["seconds"] == pytest.approx(60, rel=1e-9)  # 6 steps of 10


def test_a_start_lists_the_image_folder_once(shared, tmp_path, monkeypatch):
    """One listing serves a new run's side, counts and cache key, a relative path's too."""
    walked, walk = [], os.walk
    monkeypatch.setattr(os, "walk", lambda root, *a: walked.append(root) or walk(root, *a))
    monkeypatch.chdir(shared.folder.parent)
    train.main([*TINY[2:], "--dataset", "folder", "--data-dir", "images", "--epochs", "1",
                "--out", str(tmp_path / "run")])
    assert walked == [str(shared.folder)]


# === train.py: the training loop =================================================================
def test_training_lowers_mse_and_writes_outputs(shared):
    """Per epoch a metrics row, mse and gamma falling (Table 1), train.lr_at's lr; the checkpoint;
    grids every 2nd and the last epoch, originals spread over the split; stage 2's apart."""
    out, rows = shared.out, metrics(shared.out)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["mse"] < rows[0]["mse"]
    assert all(r["gamma"] <= 1 for r in rows) and rows[-1]["gamma"] < rows[0]["gamma"]
    lrs = [train.lr_at(TINY_FLAGS, e) for e in range(3)]
    assert [r["lr"] for r in rows] == lrs and len(set(lrs)) == 3  # halved after each epoch
    for name in ("stage1.pt", "latent_variance.png", "recon_e0003.png", "samples_e0002.png",
                 "stage2.pt", "latent_variance2.png", "samples_stage2_e0002.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert not os.path.exists(os.path.join(out, "samples_e0001.png"))  # every 2nd and the last
    ck = torch.load(os.path.join(out, "stage1.pt"), weights_only=True)
    assert ck["epoch"] == 3 and [r["mse"] for r in ck["history"]] == [r["mse"] for r in rows]
    assert ck["model"]["gamma.mse_est"].item() == pytest.approx(rows[-1]["gamma"] ** 2, rel=1e-5)
    assert ck["optimizer"]["param_groups"][0]["lr"] == lrs[-1]
    assert [r["epoch"] for r in metrics(out, 2)] == [1, 2] and len(metrics(out)) == 3
    # the originals: training images linspace(0, 59, 32), rows alternating with reconstructions
    pairs = tiles(os.path.join(shared.out, "recon_e0002.png"), 64, True)
    want = np.linspace(0, 59, 32).astype(int)
    files = [np.asarray(Image.open(shared.folder / "train" / f"{i:03d}.png")) for i in want]
    for row in range(4):
        np.testing.assert_array_equal(pairs[16 * row:16 * row + 8], files[8 * row:8 * row + 8])


def test_a_step_is_eq_7_plus_k_eq_3_plus_l2_at_the_gamma_before_it():
    """eq. 7 (D = 768) at the earlier batches' gamma + k eq. 3 + l2 sum(w^2) of stride-2 kernels
    (4.2); then the step's mse updates gamma (section 3; the released code's order)."""
    torch.manual_seed(0)
    model = build(TINY_CFG, 1)
    step = train.make_step(model, train.make_optimizer(model, 1e-3, CPU.device),
                           dict(kl_weight=4.0, l2=0.5), CPU)
    kernels = [m.weight for m in model.modules() if isinstance(
        m, (nn.Conv2d, nn.ConvTranspose2d)) and m.stride == (2, 2)]
    assert len(kernels) == 1 + 3  # one down (16 -> 8), three up (2 -> 4 -> 8 -> 16)
    x, D, c = torch.rand(10, 3, 16, 16), 768, 0.5 * math.log(2 * math.pi)
    rule = vae.ComputedGamma()  # the rule, fed the same batch mses
    for _ in range(2):
        est = rule.mse_est.item()  # gamma^2 before the step: the start, then the first update
        penalty = sum(k.detach().double().square().sum().item() for k in kernels)
        (loss, mse, kl), _, _ = step(x)
        gen = D * mse.item() / (2 * est) + D * (0.5 * math.log(est) + c)
        assert loss.item() == pytest.approx(gen + 4 * kl.item() + 0.5 * penalty, rel=1e-5)
        rule.update(mse)
        assert model.gamma.mse_est.item() == pytest.approx(rule.mse_est.item(), rel=1e-6)


def test_each_epoch_draws_new_noise(shared, tmp_path, monkeypatch):
    """Stage 2 trains on z = mu + sigma eps, new eps every epoch (Dai & Wipf), each row once, in
    whole batches; epoch 2's steps never redraw epoch 1's noise (seeded per epoch)."""
    mu = torch.arange(40.0).reshape(20, 2)
    images = np.arange(20, dtype=np.uint8)[:, None, None, None].repeat(3, 3)  # image i holds i
    m1 = types.SimpleNamespace(encode=lambda x: (mu[(x[:, 0, 0, 0] * 255).round().long()],
                                                 torch.full((len(x), 2), math.log(0.01))))
    epoch, todo = data.latent_batches(m1, images, 5, 0, torch.device("cpu"))
    epochs = [torch.cat(list(epoch(e))) for e in (0, 1)]
    assert todo == 20
    for z in epochs:
        order = z[:, 0].round().long() // 2  # which row of mu each sample came from
        assert sorted(order.tolist()) == list(range(20))
        assert (z - mu[order]).abs().max() < 0.06  # sigma 0.01
    noise = [z - mu[z[:, 0].round().long() // 2] for z in epochs]
    assert not torch.allclose(*[e[e[:, 1].argsort()] for e in noise])
    epoch, todo = data.latent_batches(m1, images[:17], 5, 0, torch.device("cpu"))
    assert todo == 15 and [len(b) for b in epoch(0)] == [5, 5, 5]  # 17 rows: 3 whole batches
    out, seen, real = copy_run(shared.one, tmp_path), [], torch.randn_like
    monkeypatch.setattr(torch, "randn_like", lambda t, **k: seen.append(real(t, **k)) or seen[-1])
    bare(out, "--stage", "2", "--epochs", "2", "--second-dim", "16", "--batch-size", "10")
    assert len(seen) == 2 * 6  # one draw a step, 6 steps an epoch
    assert not any(torch.equal(a, b) for a, b in zip(seen[:6], seen[6:]))


def test_limit_draws_a_seeded_subset_kept_by_every_stage(shared, tiny, monkeypatch, capsys):
    """--limit 20 of 60: the same seeded 20 in stage 1, a resume and stage 2; stage 2 on mu, sigma
    from the stage-1 encoder in evaluation mode (Dai & Wipf: batch norm's moving averages)."""
    run, out = tiny
    seen, encoded = [], []
    real_init, real_latents = data.Batches.__init__, data.latent_batches

    def spy(self, images, *a, **k):
        seen.append(np.array(images))
        real_init(self, images, *a, **k)

    def latents(m1, images, *a):
        with torch.no_grad():
            encoded.append((m1.training, *m1.encode(as_batch(images))))
        return real_latents(m1, images, *a)
    monkeypatch.setattr(data.Batches, "__init__", spy)
    monkeypatch.setattr(data, "latent_batches", latents)
    run("--epochs", "1", "--limit", "20")
    assert "folder 20 of 60 (drawn from seed 3) train images 16x16" in capsys.readouterr().out
    run("--epochs", "2", "--resume")
    run("--stage", "2", "--epochs", "1")
    full = data.load_split("folder", "train", str(shared.folder), 16)
    assert len(seen) == 3 and all(np.array_equal(s, seen[0]) for s in seen)
    assert len(seen[0]) == 20 and not np.array_equal(seen[0], full[:20])
    index = [next(i for i in range(60) if np.array_equal(full[i], im)) for im in seen[0]]
    assert index == sorted(index)
    with torch.no_grad():
        mu, logsd = load_model(out, 1).encode(as_batch(data.subset(full, 20, 3)))
    ((training, seen_mu, seen_logsd),) = encoded
    assert training is False
    torch.testing.assert_close(seen_mu, mu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen_logsd, logsd, rtol=1e-4, atol=1e-5)


# === train.py: resume and Ctrl-C =================================================================
@pytest.mark.parametrize("stage, again, lose_line", [(1, False, False), (2, False, False),
                                                     (1, True, True)])
def test_resume_equals_the_uninterrupted_run(shared, tiny, tmp_path, stage, again, lose_line):
    """--resume takes the checkpoint's settings (equal flags allowed) and ends where the
    uninterrupted run does; a metrics file that lost its last line is whole again."""
    run, out = tiny
    if stage == 1:
        run("--epochs", str(EPOCHS[1] - 1))
    else:
        copy_run(shared.one, tmp_path)
        bare(out, "--stage", "2", "--epochs", "1", "--second-dim", "16", "--batch-size", "10")
    if lose_line:
        path = os.path.join(out, f"metrics_stage{stage}.jsonl")
        lines = open(path).readlines()
        open(path, "w").writelines(lines[:-1])
    if again:  # every flag of TINY given again
        run("--epochs", str(EPOCHS[1]), "--resume")
    else:
        bare(out, "--stage", str(stage), "--epochs", str(EPOCHS[stage]), "--resume")
    assert metrics(out, stage) == metrics(shared.out, stage)


@pytest.mark.parametrize("cut, at, resume", [("ctrl-c", 3, False), ("ctrl-c", 9, False),
                                             ("ctrl-c", 3, True), ("nan", 8, False)])
def test_a_cut_run_keeps_the_last_epoch_and_says_how_to_go_on(shared, tiny, tmp_path, monkeypatch,
                                                              capsys, cut, at, resume):
    """Ctrl-C: exit 130, the command to start again or go on (--resume once), on a fresh line; a
    NaN loss: one line. The last finished epoch is kept; --resume ends as if uninterrupted."""
    run, out = tiny
    if resume:
        copy_run(shared.one, tmp_path)
    calls, real_update, real_loss = [], vae.ComputedGamma.update, vae.vae_loss

    def update(self, batch_mse):
        real_update(self, batch_mse)
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt

    def loss(*a, **k):
        value, mse, kl = real_loss(*a, **k)
        calls.append(1)
        return (value * float("nan") if len(calls) == at else value), mse, kl
    if cut == "nan":
        monkeypatch.setattr(vae, "vae_loss", loss)
    else:
        monkeypatch.setattr(vae.ComputedGamma, "update", update)
    capsys.readouterr()
    argv = ["--epochs", str(EPOCHS[1] + resume)] + ["--resume"] * resume
    with pytest.raises(SystemExit) as e:
        run(*argv)
    command = shlex.join(["python", "train.py", *TINY, "--dataset", "folder", "--data-dir",
                          str(shared.folder), "--out", out, *argv])
    kept = EPOCHS[1] if resume else at // 6  # the epochs finished before the cut
    want = (f"interrupted: {out}/stage1.pt keeps the last finished epoch; continue with\n  "
            f"{command}{' --resume' * (not resume)}" if kept else
            f"interrupted: nothing was saved; start again with\n  {command}")
    err = capsys.readouterr().err
    if cut == "nan":
        assert e.value.code == 1 and "error: non-finite loss in epoch 2" in err
    else:
        assert e.value.code == 130 and err.endswith(want + "\n")
        assert re.split("[\r\n]", err[:-len(want) - 1])[-1] == ""  # at the start of a line
    assert not [f for f in files_under(out) if ".tmp" in f]
    if not kept:
        assert not os.path.exists(os.path.join(out, "stage1.pt"))
        return
    assert torch.load(os.path.join(out, "stage1.pt"), weights_only=True)["epoch"] == kept
    assert metrics(out) == metrics(shared.out)[:kept]
    if not resume:
        monkeypatch.setattr(vae.ComputedGamma, "update", real_update)
        monkeypatch.setattr(vae, "vae_loss", real_loss)
        run("--epochs", str(EPOCHS[1]), "--resume")
        assert metrics(out) == metrics(shared.out)


def test_table1_row_by_row_as_the_readme_says(shared, tmp_path):
    """README's Table 1 recipe, rows E = 3, 4: stage 1 to E, a copy, stage 2 for 2E (Fig. 2) and
    --eval; each eval.json holds its epochs and settings; the run goes on untouched."""
    out = copy_run(shared.one, tmp_path)
    for e in (EPOCHS[1], EPOCHS[1] + 1):
        if e > EPOCHS[1]:
            bare(out, "--resume", "--epochs", str(e))
        row = copy_run(out, tmp_path, f"e{e}")
        bare(row, "--stage", "2", "--epochs", str(2 * e), "--second-dim", "16",
             "--batch-size", "10")
        bare(row, "--eval", "--no-fid")
        res = json.load(open(os.path.join(row, "eval.json")))
        cks = [train.load_checkpoint(row, s, "cpu") for s in (1, 2)]
        assert (res["epochs"], res["epochs2"], cks[1]["config"]["stage1_epoch"]) == (e, 2 * e, e)
        assert res["settings"] == json.loads(json.dumps(
            {f"stage{s}": ck["config"] for s, ck in zip((1, 2), cks)}))
        assert metrics(row) == metrics(out)
    assert not os.path.exists(os.path.join(out, "stage2.pt"))


# === train.py: refusals ==========================================================================
RESUME, EVAL = ["--epochs", "4", "--resume"], ["--eval", "--no-fid"]
CONTRADICTIONS = [  # a flag given against stage1.pt (TINY's flags, the paper's k at 16x16)
    (["--img-size", "32"], "--img-size 32 contradicts .*stage1.pt, made with --img-size 16: "
                           "leave the flag out"),
    (["--lr", "1e-3"], "--lr 0.001 contradicts .*, made with --lr 0.002"),
    (["--batch-size", "5"], "--batch-size 5 contradicts .*, made with --batch-size 10"),
    (["--gamma", "learned"], "--gamma learned contradicts .*, made with --gamma computed"),
    (["--limit", "30"], "--limit 30 contradicts .*, made with all images"),
    (["--jpeg", "75"], "--jpeg 75 contradicts .*, made with no JPEG round trip"),
    (["--kl-weight", "2"],
     f"--kl-weight 2 contradicts .*, made with --kl-weight {vae.kl_weight_for(16):g}"),
    (["--dataset", "cifar10"], "--dataset cifar10 contradicts .*, made with --dataset folder"),
]
COUNTS = ("img-size", "batch-size", "sample-every", "epochs", "limit", "halve-every", "latent-dim")
REFUSALS = [  # (what --out holds, the flags, the error); a new run is given TINY's flags too
    ("nothing", ["--img-size", "30"],
     "image side 30: .*power of two >= 4.*: choose another --img-size"),
    ("nothing", ["--img-size", "2"], "image side 2: .*power of two >= 4"),
    ("nothing", ["--num-scale", "6"], r"image side 16: .*>= 2\^\(num_scale - 1\) = 32: choose"),
    ("nothing", ["--device", "cuda"], "--device cuda: this torch sees 0 CUDA devices"),
    *[("nothing", [f"--{k}", "0"], f"--{k} 0 is out of range: give a number from 1 to")
      for k in COUNTS],
    ("nothing", ["--eval", "--n-eval", "0"], "--n-eval 0 is out of range"),
    ("nothing", ["--lr", "0"], "--lr 0.0 is out of range: give a number from 1e-12 to"),
    ("nothing", ["--lr", "nan"], "--lr nan is out of range"),
    ("nothing", ["--kl-weight", "-1"], "--kl-weight -1.0 is out of range: give a number from 0"),
    ("nothing", ["--jpeg", "100"], "--jpeg 100 is out of range: give a number from 1 to 95"),
    ("nothing", ["--latent-norm"],
     "--no-fid, --latent-norm and --inception-weights apply to --eval only"),
    *[("nothing", argv, "no checkpoint at .*stage1.pt: train stage 1 first")
      for argv in (["--stage", "2", "--epochs", "1"], ["--epochs", "1", "--resume"], EVAL)],
    ("stage 1", ["--stage", "2", "--epochs", "1", "--resume"],
     "no checkpoint at .*stage2.pt: train stage 2 first"),
    ("stage 1", ["--epochs", "4"], ".*stage1.pt exists: add --resume"),
    ("stage 1", ["--epochs", "3", "--resume"], ".*stage1.pt has trained 3 epochs already"),
    ("stage 1", ["--eval", "--latent-norm"], "--latent-norm rescales two-stage samples, but"),
    ("stage 1", ["--eval"],  # offline, no --inception-weights: before any image is generated
     f"cannot load {re.escape(fid.URLS['torchvision'])} .*--inception-weights PATH"),
    *[("stage 1", [*mode, *flag], message) for mode in (RESUME, EVAL)
      for flag, message in CONTRADICTIONS],
    *[("stage 1", [*argv, "--data-dir", "{dogs}"],
       r".*stage1.pt was trained on 60 train and 30 test images, but .*dogs has 54 and 10: give "
       "--data-dir the run's data") for argv in (RESUME, ["--stage", "2", "--epochs", "1"], EVAL)],
    ("both stages", RESUME,
     ".*stage2.pt was trained on stage 1 as it is now: move stage2.pt away first"),
    *[("stage 1 trained on", argv, ".*stage2.pt was trained on stage 1 at epoch 3, but "
       ".*stage1.pt is now at epoch 4: move stage2.pt away") for argv in (
        EVAL, ["--stage", "2", "--epochs", "3", "--resume"])],
    ("truncated stage 1", RESUME, ".*stage1.pt cannot be read .*: it is truncated, corrupt"),
    # weights_only=True: a pickle that would run code is refused, unrun; no weights_only advice
    ("stage 1 that runs code", RESUME, ".*stage1.pt cannot be read .*: it is truncated, corrupt"),
    ("stage 1 of an earlier version", EVAL, r".*stage1.pt was made by an earlier version of "
     r"train.py \(its settings lack images\): train again"),  # before the image counts
    ("nothing", ["--dataset", "folder", "--data-dir", "{bad}"],  # no --img-size: the first's
     "cannot decode image .*bad/test/000.png"),
]


@pytest.mark.parametrize("holds, argv, message", REFUSALS)
def test_refusals_come_first_in_one_line_and_change_nothing(shared, tmp_path, monkeypatch,
                                                            capsys, holds, argv, message):
    """Exit 1, one line "error: ...", no weights_only advice, before any decoding; --out kept."""
    out = str(tmp_path / "run")
    if holds != "nothing":
        copy_run(shared.out if holds in ("both stages", "stage 1 trained on") else shared.one,
                 tmp_path)  # the others: stage 1 alone
    stage1 = os.path.join(out, "stage1.pt")
    if holds == "stage 1 trained on":  # its epoch past stage 2's, as after training it on
        torch.save(torch.load(stage1, weights_only=True) | dict(epoch=4), stage1)
    if holds == "truncated stage 1":
        with open(stage1, "r+b") as f:
            f.truncate(os.path.getsize(stage1) // 2)
    if holds == "stage 1 that runs code":
        torch.save(dict(epoch=Gadget(os.system, f"touch {out}/ran")), stage1)
    if holds == "stage 1 of an earlier version":
        ck = torch.load(stage1, weights_only=True)
        del ck["config"]["images"]
        torch.save(ck, stage1)
    if "{dogs}" in argv:  # other data: 54 train and 10 test images
        dogs = str(image_folder(tmp_path / "dogs", n_train=54, n_test=10, seed=1))
        argv = [dogs if a == "{dogs}" else a for a in argv]
    bad = "{bad}" in argv  # a folder whose first image in sorted order cannot be read
    if bad:
        folder = image_folder(tmp_path / "bad", n_train=2, n_test=1)
        (folder / "test" / "000.png").write_bytes(b"not a png")
        argv = [str(folder) if a == "{bad}" else a for a in argv]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as without a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(data, "load_split", lambda *a, **k: pytest.fail("decoded data first"))
    monkeypatch.setattr(vae, "reconstruct", lambda *a: pytest.fail("generated images first"))
    before = files_under(out)
    new = [*TINY, "--dataset", "folder", "--data-dir", str(shared.folder)]
    new = new if holds == "nothing" and not bad else []
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main([*new, "--out", out, *argv])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1, err  # one line, nothing else
    assert re.match(f"error: {message}", err) and "weights_only" not in err
    assert files_under(out) == before


def test_flag_syntax_errors_are_argparses_and_errors_start_a_fresh_line(tiny, monkeypatch,
                                                                        capsys):
    """argparse's usage line and error, exit 2; an error during a progress line starts a line."""
    for argv, message in ((["--epochs", "2.5"], "argument --epochs: invalid int value: '2.5'"),
                          (["--resize", "blurry"], "argument --resize: invalid choice: 'blurry'"),
                          (["--nonsense"], "unrecognized arguments: --nonsense")):
        with pytest.raises(SystemExit) as e:
            tiny[0](*argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("usage: python train.py [flags]; --help lists")
        assert message in err and err.count("\n") == 2

    def images():
        yield [1]
        time.sleep(0.3)  # the progress line is drawn at most 4 times a second
        yield [2]
        raise DataError("cannot decode image x.png")
    monkeypatch.setattr(train, "train", lambda args: list(data.progress(images(), 9, "decoding")))
    with pytest.raises(SystemExit):
        train.main(["--epochs", "1"])
    assert re.search(r"\rdecoding 2/9 images, .*\nerror: cannot decode image x.png\n$",
                     capsys.readouterr().err)


def test_moved_and_linked_data_is_the_same_data(shared, tmp_path):
    """The data is its settings and counts, not its path: a symlink or moved copy serves."""
    images = shutil.copytree(shared.folder, tmp_path / "images")  # copy2 keeps the mtimes
    out = copy_run(shared.one, tmp_path)
    data.load_split("folder", "train", str(images), 16)  # the cache, made at the real path
    caches = sorted((tmp_path / "cache").rglob("*train*.npy"))
    os.symlink(images, tmp_path / "link")
    bare(out, "--epochs", "4", "--resume", "--data-dir", str(tmp_path / "link"))
    shutil.move(images, tmp_path / "moved")
    bare(out, "--stage", "2", "--epochs", "1", "--data-dir", str(tmp_path / "moved"),
         "--second-dim", "16", "--batch-size", "10")
    bare(out, "--eval", "--no-fid", "--data-dir", str(tmp_path / "moved"))
    assert sorted((tmp_path / "cache").rglob("*train*.npy")) == caches and len(caches) == 1
    assert len(metrics(out, 2)) == 1 and os.path.exists(os.path.join(out, "eval.json"))


# === train.py: evaluation, sections 4-5 ==========================================================
@pytest.mark.parametrize("latent_norm", [False, True])
def test_eval_follows_the_protocol(shared, tmp_path, capsys, latent_norm):
    """--eval by hand (paper 4-5, the released code's sampling): REC, GEN-1, GEN-2 (--latent-norm
    scales to the variance law, 4.2) from the run's seed; mse, eq. 6, footnote 3, the table."""
    out = copy_run(shared.out, tmp_path)
    capsys.readouterr()
    bare(out, "--eval", "--no-fid", "--n-eval", "25", *(["--latent-norm"] if latent_norm else []))
    res = json.load(open(os.path.join(out, "eval.json")))
    assert res["n"] == 25 and res["rec_fid"] is None and res["inception"] is None
    assert (res["epochs"], res["epochs2"]) == (EPOCHS[1], EPOCHS[2])
    printed, err = capsys.readouterr()
    assert all(f"{k} 25/25 images" in err for k in ("REC", "GEN-1", "GEN-2"))  # progress lines
    table = printed.splitlines()[1:]  # after the short run's note
    assert table[1].split()[:5] == [str(EPOCHS[1]), "-", "-", "-", f"{res['mse']:.4f}"]
    assert table[1].split()[6] == f"{res['inactive']}/8" and f"{res['inactive_code']}/8" in table[2]
    m1, m2 = (load_model(out, s) for s in (1, 2))
    # 25 of the 30 test images, drawn from the run's seed 3 (in their order)
    drawn = np.sort(np.random.default_rng(3).choice(30, 25, replace=False))
    test = np.stack([np.asarray(Image.open(shared.folder / "test" / f"{i:03d}.png"))
                     for i in drawn])
    x, g = as_batch(test), torch.Generator().manual_seed(3)
    with torch.no_grad():
        mu, logsd = m1.encode(x)
        r = m1.decode(mu + logsd.exp() * torch.randn(25, 8, generator=g))
        gen1 = m1.decode(torch.randn(25, 8, generator=g))
        z = m2.decode(torch.randn(25, 8, generator=g))
    stats = vae.latent_summary(mu, logsd)[0]  # eq. 6 and footnote 3: their own tests' rules
    if latent_norm:
        z = z * (math.sqrt(stats["var_law"]) / z.std(0).mean())
    gen2 = m1.decode(z).detach()
    u8 = lambda t: (t * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    pairs = tiles(os.path.join(out, "eval_recon.png"), 64, True)
    pick = np.linspace(0, 24, 32).astype(int)[:8]  # the first row of the spread-out pairs
    for got, want in ((pairs[8:16], u8(r)[pick]), (pairs[:8], test[pick]),
                      (tiles(os.path.join(out, "eval_gen1.png"), 25), u8(gen1)),
                      (tiles(os.path.join(out, "eval_gen2.png"), 25), u8(gen2))):
        assert np.abs(got.astype(int) - want).max() <= 1  # one level of rounding
    assert res["mse"] == pytest.approx(((x - r) ** 2).mean().item(), rel=1e-5)
    for k in ("var_law", "var_law_code", "inactive", "inactive_code"):
        assert res[k] == pytest.approx(stats[k], rel=1e-5), k


@pytest.mark.parametrize("epoch", [2, 166, 167])
def test_eval_after_fewer_than_1000_steps_says_the_moving_averages_lag(shared, tmp_path, capsys,
                                                                       epoch):
    """Below 1,000 steps a note: batch norm's averages (decay 0.999, TF1's in Dai & Wipf) lag."""
    out = copy_run(shared.one, tmp_path)
    path = os.path.join(out, "stage1.pt")
    torch.save(torch.load(path, weights_only=True) | dict(epoch=epoch), path)
    capsys.readouterr()
    bare(out, "--eval", "--no-fid", "--n-eval", "10")
    lines = [s for s in capsys.readouterr().out.splitlines() if s.startswith("note:")]
    assert lines == [f"note: stage 1 has trained {6 * epoch} steps; batch norm's moving averages "
                     "(decay 0.999) weigh all of them almost alike, the untrained first ones too, "
                     "so the mse and pictures here lag far behind training's until about "
                     "1,000-3,000 steps"] * (epoch < 167)


def test_eval_scores_each_set_against_the_test_images(shared, tiny, tmp_path, monkeypatch):
    """--eval's FIDs (paper 4-5), stand-in network: each set against n seeded test images, whose
    statistics are cached per protocol (lossless, --jpeg 75); n = 4 fits each grid."""
    run, loads = tiny[0], []
    monkeypatch.setattr(fid, "load_inception", lambda *a: loads.append(a[:2]) or Pixels())
    runs = copy_run(shared.out, tmp_path, "lossless"), str(tmp_path / "jpeg")
    run("--epochs", "1", "--out", runs[1], "--jpeg", "75")
    for out in runs:
        bare(out, "--eval", "--n-eval", "4", "--inception-weights", "w.pth")
    assert loads == [("torchvision", "w.pth")] * 2
    drawn = np.sort(np.random.default_rng(3).choice(30, 4, replace=False))  # seed 3
    test = np.stack([np.asarray(Image.open(shared.folder / "test" / f"{i:03d}.png"))
                     for i in drawn])
    files = sorted((tmp_path / "cache").rglob("fid_stats_*.npz"), key=lambda f: "jpeg" in f.name)
    assert [("jpeg75" in f.name) for f in files] == [False, True]
    for f, q in zip(files, (None, 75)):
        pixels = np.stack([jpeg_round_trip(p, q) for p in test]) if q else test
        feats = pixel_features(pixels.transpose(0, 3, 1, 2))
        mu, sigma = fid.load_stats(f)
        np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-6)
        want = np.cov(feats, rowvar=False)  # float32 features: round-off ~1e-7 of each, so
        np.testing.assert_allclose(sigma, want, rtol=0, atol=1e-5 * np.abs(want).max())  # scale
    res = json.load(open(os.path.join(runs[0], "eval.json")))
    # the grid's rows alternate originals and reconstructions of 32 picks spread over the 4
    pick = list(np.linspace(0, 3, 32).astype(int))
    at = [(2 * (pick.index(k) // 8) + r) * 8 + pick.index(k) % 8 for k in range(4) for r in (0, 1)]
    pairs = tiles(os.path.join(runs[0], "eval_recon.png"), 64, True)[at]
    assert np.array_equal(pairs[::2], test)
    gen1, gen2 = (tiles(os.path.join(runs[0], f"eval_gen{k}.png"), 4) for k in (1, 2))
    with torch.no_grad():  # the features as --eval computes them
        a = Pixels()(as_batch(test)).double().numpy()
        for key, imgs in (("rec_fid", pairs[1::2]), ("gen1_fid", gen1), ("gen2_fid", gen2)):
            b = Pixels()(as_batch(imgs)).double().numpy()
            want, largest = fid_of_features(a, b)  # 4 images a side
            assert res[key] == pytest.approx(want, abs=2 * root_tol(6, largest)), key
    assert len({round(res[k], 3) for k in ("rec_fid", "gen1_fid", "gen2_fid")}) == 3


# === pictures (train.py) =========================================================================
def test_grids_say_what_they_show_and_the_heatmap_is_fig_6(tmp_path):
    """Titles, recon row names, 2x tiles. Heatmap (Fig. 6-7): latent r, epoch c at (8 + c * 600
    // epochs, 36 + 6 r), rows by the epoch below 0.8, blue-teal-yellow; footnote 3's 0.8 red."""
    imgs = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), np.uint8)
    for recon in (False, True):
        save_grid(imgs, tmp_path / "g.png", "GEN-1 samples", imgs[::-1] if recon else None)
        g = np.asarray(Image.open(tmp_path / "g.png"))
        rows, left = 4 if recon else 2, 60 * recon
        assert g.shape == (20 + rows * 66 + 2, left + 8 * 66 + 2, 3)
        np.testing.assert_array_equal(g[22:86:2, left + 2:left + 66:2], imgs[0])
        ink = (g < 100).all(-1)  # black text on white
        assert ink[:20].sum() > 50  # the title
        names = [ink[20 + r * 66:86 + r * 66, :60].sum() for r in range(rows)] if recon else [0]
        # the row names: "original" has more ink than "recon"
        assert names == [0] or (names[0] == names[2] > names[1] == names[3] > 0)
    history = [dict(stage=1, latent_var=[1.0, 0.25, 0.9]),
               dict(stage=1, latent_var=[0.0, 0.5, 1.0])]
    train.write_pictures(history, None, None, None, str(tmp_path), 0, grids=False)
    img = np.asarray(Image.open(tmp_path / "latent_variance.png").convert("RGB"))
    # latent 1 is active from epoch 1, latent 0 from epoch 2, latent 2 never
    cells = [tuple(img[36 + 6 * r, 2 + 300 * c]) for r in range(3) for c in range(2)]
    # 0.25: halfway from (20, 30, 90) to (40, 150, 140); 0.9: 80% from there to (250, 230, 60)
    assert cells == [(30, 90, 115), (40, 150, 140), (250, 230, 60), (20, 30, 90),
                     (208, 214, 76), (250, 230, 60)]
    assert tuple(img[round(36 + 0.2 * 99), 2 + 600 + 25]) == (255, 0, 0)


# === data.py: CIFAR-10 ===========================================================================
def cifar_image(k):
    """Image k (row, column, channel), unlike its transposed or plane-swapped self."""
    y, x, c = np.indices((32, 32, 3))
    return ((7 * k + 3 * y + 5 * x + 80 * c) % 256).astype(np.uint8)


COUNTS = {**{f"data_batch_{i}": 2 for i in range(1, 6)}, "test_batch": 3}
TRAIN = np.stack([cifar_image(k) for k in range(10)])
TEST = np.stack([cifar_image(k) for k in range(10, 13)])


def cifar_tarball(path, module="numpy._core", replace=None):
    """An official-format tarball (numpy's module `module`) and its MD5; `replace`: batches."""
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


class FakeResponse(io.BytesIO):
    """What urlopen returns; with `drop`, the connection breaks after the first read."""
    def __init__(self, payload, drop=False):
        super().__init__(payload)
        self.drop, self.reads = drop, 0

    def read(self, n=-1):
        self.reads += 1
        if self.drop and self.reads > 1:
            raise ConnectionResetError("connection reset by peer")
        return super().read(n)


@pytest.mark.parametrize("outcome, module", [("ok", "numpy.core"), ("corrupt", "numpy._core"),
                                             ("cut short", "numpy._core"),
                                             ("dropped", "numpy._core")])
def test_cifar_pixels_exact_and_cached(tmp_path, monkeypatch, capsys, outcome, module):
    """The official files' facts (paper 4.1, 4.2): CIFAR-10's URL, MD5 and sizes, CelebA's
    partition; a download verified before use; the official format's pixels exact, cached."""
    assert data.CIFAR_MD5 == "c58f30108f718f92721af3b95e74349a"
    assert data.CIFAR_URL == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert data.CELEBA_SPLITS == {"train": (0, 162770), "valid": (162770, 182637),
                                  "test": (182637, 202599)}
    sizes = {("cifar10", "train"): 50000, ("cifar10", "test"): 10000, ("celeba", "train"): 162770,
             ("celeba", "valid"): 19867, ("celeba", "test"): 19962}
    assert {k: data.split_size(*k, "nowhere") for k in sizes} == sizes
    src, root = tmp_path / "official.tar.gz", tmp_path / "data"
    monkeypatch.setattr(data, "CIFAR_MD5", cifar_tarball(src, module))
    good = src.read_bytes()
    payload = {"corrupt": good[:-1] + bytes([good[-1] ^ 1]),
               "cut short": good[:-100]}.get(outcome, good)  # as http.client's read may end
    monkeypatch.setattr(data.urllib.request, "urlopen",
                        lambda url, timeout: FakeResponse(payload, drop=outcome == "dropped"))
    if outcome != "ok":
        match = {"corrupt": "has MD5", "cut short": "has MD5", "dropped": "connection reset"}
        with pytest.raises(data.DataError, match=match[outcome]) as e:
            data.load_split("cifar10", "train", root)
        assert data.CIFAR_URL in str(e.value)
        assert files_under(root) == []  # neither a bad download nor a cache
        monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: FakeResponse(good))
    for split, expected in [("train", TRAIN), ("test", TEST)]:  # downloaded (again) once
        x = data.load_split("cifar10", split, root)
        assert isinstance(x, np.memmap) and not x.flags.writeable
        assert x.filename == str(root / f"cifar10_{split}.npy")  # train.py puts FID stats there
        np.testing.assert_array_equal(x, expected)
    assert (root / "cifar-10-python.tar.gz").read_bytes() == good
    # the final count is drawn even when the whole file came within 0.25 s
    assert f"\rdownloading {data.CIFAR_URL} 0/163 MiB, " in capsys.readouterr().err
    os.remove(root / "cifar-10-python.tar.gz")  # the caches alone now serve both splits
    np.testing.assert_array_equal(data.load_split("cifar10", "train", root), TRAIN)
    assert files_under(root) == ["cifar10_test.npy", "cifar10_train.npy"]


# === data.py: CelebA =============================================================================
QUADRANTS = ((0, 0), (0, 64), (64, 0), (64, 64))  # top-left corners inside the 128x128 window


def celeba_colours(k):
    return np.array([(10 * k, 20, 30), (40, 10 * k + 5, 60),
                     (70, 80, 10 * k + 9), (200, 210, 220 - k)], np.uint8)


def assert_celeba(x, ks):
    """Each 32x32 quadrant exact (the rim too: green means a shifted crop) but 4 px at borders."""
    assert x.shape == (len(ks), 64, 64, 3)
    far = np.ones(64, bool)
    far[28:36] = False
    for img, k in zip(x, ks):
        for (r, c), colour in zip(QUADRANTS, celeba_colours(k)):
            rows, cols = np.arange(r // 2, r // 2 + 32), np.arange(c // 2, c // 2 + 32)
            assert (img[np.ix_(rows[far[rows]], cols[far[cols]])] == colour).all()


def make_celeba(root, n=5):
    """n 178x218 files 000001.jpg... (PNG), green but for the window's quadrants; scrambled."""
    for k in sorted(range(n), key=lambda k: (k * 3) % n):
        a = np.full((218, 178, 3), (0, 255, 0), np.uint8)
        for (r, c), colour in zip(QUADRANTS, celeba_colours(k)):
            a[45 + r:45 + r + 64, 25 + c:25 + c + 64] = colour
        save_png(root / "celeba" / "img_align_celeba" / f"{k + 1:06d}.jpg", a)


SMALL_CELEBA = {"train": (0, 3), "valid": (3, 4), "test": (4, 5)}  # splits of 5 files


def test_celeba_crop_resize_and_split_by_sorted_index(tmp_path, monkeypatch):
    """Paper 4.2: rows 45:173, columns 25:153 resized to 64x64, split by sorted file index; a
    cache per size and filter serves without the files."""
    monkeypatch.setattr(data, "CELEBA_SPLITS", SMALL_CELEBA)
    make_celeba(tmp_path)
    for split, ks in {"train": [0, 1, 2], "valid": [3], "test": [4]}.items():
        x = data.load_split("celeba", split, tmp_path)
        assert_celeba(x, ks)
        assert x.filename == str(tmp_path / "celeba" / f"{split}_64_bilinear.npy")
    assert_celeba(data.load_split("celeba", "test", tmp_path, resize="lanczos"), [4])
    assert data.load_split("celeba", "test", tmp_path, 32).shape == (1, 32, 32, 3)
    os.rename(tmp_path / "celeba" / "img_align_celeba", tmp_path / "moved")
    data.list_images.cache_clear()  # a new run lists the folder anew
    assert_celeba(data.load_split("celeba", "test", tmp_path, resize="lanczos"), [4])  # cached
    for size, mode in [(64, "nearest"), (16, "lanczos")]:
        with pytest.raises(data.DataError, match="found 0 of CelebA's 202,599 images"):
            data.load_split("celeba", "test", tmp_path, size, mode)


# === data.py: folders ============================================================================
# Sorted by path relative to the root; created in another order. Index 9 is the test image.
NESTED = ["a/0.png", "a/b/1.bmp", "a/b/c/2.PNG", "a/z.png", "b.png", "c/0.png", "c/1.png",
          "d.png", "e.png", "f/x.png", "g.png", "h.png"]


def make_folder(root, rels, start=0):
    """Image k: 50x30 or 30x50, its centred 30x30 square colour k, the rest white."""
    for k, rel in reversed(list(enumerate(rels, start))):
        a = np.full((30, 50, 3) if k % 2 == 0 else (50, 30, 3), 255, np.uint8)
        (a[:, 10:40] if k % 2 == 0 else a[10:40])[:] = (k, 100 + k, 200 - k)
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        Image.fromarray(a).save(root / rel, format="BMP" if rel.endswith(".bmp") else "PNG")
    (root / "notes.txt").write_text("not an image")


def colours(ks):
    """The expected 15x15 images: centre colour k, uniform (exact in every resize mode)."""
    centres = np.array([(k, 100 + k, 200 - k) for k in ks], np.uint8)
    return np.broadcast_to(centres[:, None, None], (len(ks), 15, 15, 3))


def cache_dirs(tmp_path):
    return sorted(os.listdir(tmp_path / "cache" / "balancing-vae"))


@pytest.mark.parametrize("rels, train, test, modes", [
    (NESTED, [k for k in range(12) if k != 9], [9], ["bilinear"]),  # a nested tree
    ([f"{k:02d}.png" for k in range(25)], [k for k in range(25) if k % 10 != 9], [9, 19],
     ["bilinear"]),
    (["train/cat/0.png", "train/dog/1.png", "test/2.png", "other/3.png",
      "trainer/4.png"], [0, 1], [2], list(data.RESIZE_MODES)),  # trainer/ is not train/
    (["train/a/0.png", "train/1.png", "train/2.png", "test/3.png", "test/b/4.png", "x.png"],
     [1, 2, 0], [3, 4], ["bilinear"]),  # sorted by path
])
def test_folder_splits_are_train_and_test_or_every_10th(tmp_path, monkeypatch, rels, train,
                                                        test, modes):
    """train/ and test/ if both exist, else every 10th by sorted path; counted undecoded; keyed."""
    root = tmp_path / "imgs"
    make_folder(root, rels)
    before = files_under(root)
    with monkeypatch.context() as m:  # counted, not decoded
        no_image_opens(m)
        assert [data.split_size("folder", s, root) for s in ("train", "test")] == [
            len(train), len(test)]
    assert not (tmp_path / "cache").exists()
    for mode in modes:
        np.testing.assert_array_equal(data.load_split("folder", "train", root, 15, mode),
                                      colours(train))
        x = data.load_split("folder", "test", root, 15, mode)
        np.testing.assert_array_equal(x, colours(test))
    assert files_under(root) == before  # the caches live elsewhere
    (key,) = cache_dirs(tmp_path)
    assert re.fullmatch("folder-[0-9a-f]{16}", key)
    assert x.filename == str(tmp_path / "cache" / "balancing-vae" / key / f"test_15_{mode}.npy")


def test_folder_cache_is_keyed_by_its_files_not_its_path(tmp_path, monkeypatch):
    """The same files elsewhere (a copy keeping mtimes, a symlink, the folder moved): the same
    cache, nothing decoded. A file changed (same size), renamed or added: a new cache each."""
    imgs, moved = tmp_path / "imgs", tmp_path / "moved"
    make_folder(imgs, NESTED)
    first = data.load_split("folder", "test", imgs, 15)
    shutil.copytree(imgs, tmp_path / "copy")  # copy2 keeps each mtime
    os.symlink(imgs, tmp_path / "link")
    with monkeypatch.context() as m:
        no_image_opens(m)
        for other in ("copy", "link", "moved"):
            if other == "moved":
                os.rename(imgs, moved)
                data.list_images.cache_clear()  # a new run lists the folder anew
            again = data.load_split("folder", "test", tmp_path / other, 15)
            assert again.filename == first.filename
            np.testing.assert_array_equal(again, colours([9]))
    assert cache_dirs(tmp_path) == [os.path.basename(os.path.dirname(first.filename))]
    size, want = os.path.getsize(moved / "a/b/1.bmp"), [0, 51, *range(2, 9), 10, 11]
    make_folder(moved, ["a/b/1.bmp"], start=51)  # new content, same size (BMP: uncompressed)
    os.utime(moved / "a/b/1.bmp", ns=(1, 1))  # and surely another mtime
    assert os.path.getsize(moved / "a/b/1.bmp") == size
    data.list_images.cache_clear()  # a new run lists the folder anew
    np.testing.assert_array_equal(data.load_split("folder", "train", moved, 15), colours(want))
    assert len(cache_dirs(tmp_path)) == 2
    os.rename(moved / "a/z.png", moved / "a/y.png")  # same place in the order, same pixels
    data.list_images.cache_clear()  # a new run lists the folder anew
    np.testing.assert_array_equal(data.load_split("folder", "train", moved, 15), colours(want))
    assert len(cache_dirs(tmp_path)) == 3
    make_folder(moved, ["zz.png"], start=60)  # an added image, last in the order
    data.list_images.cache_clear()  # a new run lists the folder anew
    np.testing.assert_array_equal(data.load_split("folder", "train", moved, 15),
                                  colours(want + [60]))
    assert len(cache_dirs(tmp_path)) == 4


@pytest.mark.parametrize("mode, pil, interior", [
    (None, Image.BILINEAR, 128), ("bilinear", Image.BILINEAR, 128), ("box", Image.BOX, 128),
    ("nearest", Image.NEAREST, 255), ("bicubic", Image.BICUBIC, None),
    ("lanczos", Image.LANCZOS, None), ("hamming", Image.HAMMING, None)])
def test_each_resize_mode_is_its_pil_filter_and_default_bilinear(tmp_path, mode, pil, interior):
    """Fig. 3: each mode is PIL's filter of that name, none given bilinear; a checkerboard
    halved: nearest keeps one phase (the jaggies), the filters average."""
    args = () if mode is None else (mode,)
    a = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    save_png(str(tmp_path / "random" / "0.png"), a)
    expected = np.asarray(Image.fromarray(a[:, 5:35]).resize((17, 17), pil))
    np.testing.assert_array_equal(
        data.load_split("folder", "train", tmp_path / "random", 17, *args)[0], expected)
    assert set(data.RESIZE_MODES) == {m.name.lower() for m in Image.Resampling}
    if interior is not None:
        y, x = np.indices((64, 64))
        board = np.where((x + y) % 2 == 0, 255, 0).astype(np.uint8)
        save_png(str(tmp_path / "board" / "0.png"), np.stack([board] * 3, axis=-1))
        out = data.load_split("folder", "train", tmp_path / "board", 32, *args)
        assert (out[0, 1:-1, 1:-1] == interior).all()


def test_undecodable_image_is_named_and_no_cache_is_left(tmp_path):
    """An undecodable file is named, no cache left; grey and RGBA files become RGB."""
    make_folder(tmp_path / "imgs", NESTED)
    (tmp_path / "imgs" / "c" / "1.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(data.DataError, match=r"cannot decode image .*c.1\.png"):
        data.load_split("folder", "train", tmp_path / "imgs", 15)
    assert not any(f.endswith(".npy") or ".tmp-" in f for f in files_under(tmp_path / "cache"))
    make_folder(tmp_path / "imgs", NESTED)  # repaired: the next call prepares a good cache
    x = data.load_split("folder", "train", tmp_path / "imgs", 15)
    np.testing.assert_array_equal(x, colours([0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11]))
    save_png(str(tmp_path / "modes" / "0.png"), np.full((8, 8), 77, np.uint8))  # grey
    save_png(str(tmp_path / "modes" / "1.png"), np.full((8, 8, 4), (1, 2, 3, 0), np.uint8))
    x = data.load_split("folder", "train", tmp_path / "modes", 8)
    np.testing.assert_array_equal(x[:, 0, 0], [[77, 77, 77], [1, 2, 3]])


# === data.py: the JPEG round trip (CIFAR-10, CelebA, folders) ====================================
@pytest.mark.parametrize("dataset", ["cifar10", "celeba", "folder"])
def test_jpeg_round_trip_comes_after_crop_and_resize(tmp_path, monkeypatch, dataset):
    """--jpeg q: the released preprocessing's imsave(.jpg) + imread (quality 75 there) after crop
    and resize; lossy, a cache per quality; lossless by default."""
    root = tmp_path / "data"
    if dataset == "cifar10":
        monkeypatch.setattr(data, "CIFAR_MD5", cifar_tarball(root / "cifar-10-python.tar.gz"))
        size, want = 32, {"train": TRAIN, "test": TEST}
    elif dataset == "celeba":
        monkeypatch.setattr(data, "CELEBA_SPLITS", SMALL_CELEBA)
        make_celeba(root)
        size = 64  # the lossless images' crop and resize: test_celeba_crop_resize_and_split_...
        want = {"train": np.array(data.load_split("celeba", "train", root))}
    else:
        rng = np.random.default_rng(2)
        smooth = np.cumsum(rng.integers(0, 9, (2, 16, 16, 3)), axis=2).astype(np.uint8)
        flat = np.full((16, 16, 3), (200, 30, 90), np.uint8)  # 8x8-aligned blocks of one colour
        wide = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
        for k, a in enumerate([smooth[0], smooth[1], flat, wide]):
            save_png(str(root / f"{k}.png"), a)
        square = Image.fromarray(wide[:, 5:35]).resize((16, 16), Image.BILINEAR)
        size, want = 16, {"train": np.stack([*smooth, flat, np.asarray(square)])}
    x = {q: {s: data.load_split(dataset, s, root, size, jpeg=q) for s in want} for q in (75, 95)}
    for q, s in ((q, s) for q in x for s in want):
        np.testing.assert_array_equal(x[q][s], np.stack([jpeg_round_trip(a, q) for a in want[s]]))
        assert np.abs(x[q][s].astype(int) - want[s]).max() > 0  # lossy indeed
        assert not np.array_equal(x[75][s], x[95][s])
        np.testing.assert_array_equal(data.load_split(dataset, s, root, size), want[s])
    if dataset == "folder":
        assert np.abs(x[75]["train"][2].astype(int) - flat).max() <= 2  # survives almost exactly
    names = [f"cifar10_{s}" if dataset == "cifar10" else f"{s}_{size}_bilinear" for s in want]
    caches = [os.path.basename(f) for f in files_under(tmp_path) if f.endswith(".npy")]
    kinds = ("", "_jpeg75", "_jpeg95")
    assert sorted(caches) == sorted(f"{n}{j}.npy" for n in names for j in kinds)


# === data.py: sizes and bad input ================================================================
def test_default_sizes_are_the_papers_or_a_folders_first_images(tmp_path):
    """The paper's 32 and 64; a folder's first image's side if a square power of two, else 64."""
    assert data.choose_img_size("cifar10") == 32
    assert data.choose_img_size("celeba", "anywhere") == 64
    for w, h, side in ((32, 32, 32), (30, 30, 64), (32, 16, 64)):
        save_png(str(tmp_path / f"{w}x{h}" / "a.png"), np.zeros((h, w, 3), np.uint8))
        save_png(str(tmp_path / f"{w}x{h}" / "b" / "0.png"), np.zeros((8, 8, 3), np.uint8))
        assert data.choose_img_size("folder", tmp_path / f"{w}x{h}") == side
    for k in range(3):
        save_png(str(tmp_path / "8" / f"b{k}.png"), np.full((8, 8, 3), k, np.uint8))
    assert data.load_split("folder", "train", tmp_path / "8").shape == (3, 8, 8, 3)  # not 64
    save_png(str(tmp_path / "8" / "a.png"), np.full((16, 16, 3), 3, np.uint8))  # the new first
    data.list_images.cache_clear()  # a new run lists the folder anew
    assert data.load_split("folder", "train", tmp_path / "8").shape == (4, 16, 16, 3)


@pytest.mark.parametrize("setup, call, message", [
    (None, ("cifar10", "train", "{tmp}", 64), "CIFAR-10 images are 32x32, not 64x64"),
    (None, ("cifar10", "train", "{tmp}"),
     "could not download {url} .*; put it at {tmp}/cifar-10-python.tar.gz"),  # offline
    ("no download", ("cifar10", "train", "{tmp}"),
     "{tmp}/cifar-10-python.tar.gz not found; download {url} and put it there"),
    *[(gadget, ("cifar10", "test", "{tmp}"),  # a batch that would run code: refused, unrun
       r"no CIFAR-10 batch holds (posix|io)\.(system|open); get {url}")
      for gadget in ("os.system", "builtins.open")],
    ("tarball by hand", ("cifar10", "train", "{tmp}"),  # a truncated copy
     "{tmp}/cifar-10-python.tar.gz has MD5 {md5}, not {official}: put the official {url} .*"
     "or use --dataset folder"),
    (None, ("folder", "train", "{tmp}/nowhere"), "no images in any split of .*nowhere"),
    ("one image", ("folder", "train", "{tmp}/0.png"), "no images in any split of .*0.png"),
    (None, ("folder", "train", "{tmp}", 8), "no images in any split of"),
    ("one image", ("folder", "test", "{tmp}", 8),
     r"no images in test split of .* \(train/, test/, each 10th\)"),
    (None, ("celeba", "train", "{tmp}"),
     r"found 0 of CelebA's 202,599 images; unzip img_align_celeba.zip from .* in .*celeba"),
    ("celeba", ("celeba", "train", "{tmp}"), "found 5 of CelebA's 202,599 images"),
])
def test_bad_input_gives_clear_error(tmp_path, monkeypatch, setup, call, message):
    """One line: the problem, the path, what to do; nothing left behind; a tarball put there by
    hand kept."""
    if setup == "one image":
        make_folder(tmp_path, ["0.png"])
    elif setup == "celeba":
        make_celeba(tmp_path)
    elif setup == "tarball by hand":
        (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"truncated")
    elif setup in ("os.system", "builtins.open"):  # a tampered tarball, its MD5 official
        marker = tmp_path / "ran"
        evil = (Gadget(os.system, f"touch {marker}") if setup == "os.system"
                else Gadget(builtins.open, str(marker), "w"))
        md5 = cifar_tarball(tmp_path / "cifar-10-python.tar.gz", replace={"test_batch": evil})
        monkeypatch.setattr(data, "CIFAR_MD5", md5)
    elif setup == "no download":  # not even tried
        monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: pytest.fail("fetched"))
    before = files_under(tmp_path)
    args = [a.format(tmp=tmp_path) if isinstance(a, str) else a for a in call]
    message = message.format(tmp=re.escape(str(tmp_path)), url=re.escape(data.CIFAR_URL),
                             md5=hashlib.md5(b"truncated").hexdigest(), official=data.CIFAR_MD5)
    with pytest.raises(data.DataError, match=message) as e:
        data.load_split(*args, download=setup != "no download")
    assert "\n" not in str(e.value)
    assert files_under(tmp_path) == before and not (tmp_path / "cache").exists()


# === data.py: batches, subsets, uint8, progress, atomic writes ===================================
IMAGES = np.random.default_rng(0).integers(0, 256, (10, 4, 5, 3), dtype=np.uint8)
IMAGES[:, 0, 0, 0] = np.arange(10)  # each image's id


def ids(batch):
    return (batch[:, 0, 0, 0] * 255).round().long().tolist()


@pytest.mark.parametrize("drop_last, sizes", [(True, [3, 3, 3]), (False, [3, 3, 3, 1])])
def test_batches_cover_each_image_once_exactly(drop_last, sizes):
    """Each image once an epoch, float32 channels-last in [0, 1]; too few for a batch refused."""
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
    n = 10 if drop_last else 0
    with pytest.raises(data.DataError, match=f"{n} images do not make one batch of 11"):
        data.Batches(IMAGES[:n], 11, drop_last=drop_last)


def test_subset_and_batch_order_depend_only_on_the_seed(tmp_path):
    """--limit's subset and each epoch's order are drawn from (seed, epoch) as documented; the
    subset of 1000 'images' sorted by class spreads over the classes, in order, and is checked."""
    images = np.arange(1000)[:, None]
    got = data.subset(images, 100, seed=3)[:, 0]
    expected = np.sort(np.random.default_rng(3).choice(1000, 100, replace=False))
    np.testing.assert_array_equal(got, expected)  # the documented draw, so resumes agree
    assert (np.diff(got) > 0).all() and set(got // 100) == set(range(10))  # every class
    np.testing.assert_array_equal(data.subset(images, 100, seed=3)[:, 0], got)
    assert not np.array_equal(data.subset(images, 100, seed=4)[:, 0], got)
    assert data.subset(images, None, seed=3) is images
    np.testing.assert_array_equal(data.subset(images, 1000, seed=3), images)
    for bad in (0, 1001):
        with pytest.raises(data.DataError, match=f"--limit {bad} is not between 1 and 1000"):
            data.subset(images, bad, seed=3)

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
    np.save(tmp_path / "x.npy", IMAGES)  # from a read-only memmap, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = data.Batches(np.load(tmp_path / "x.npy", mmap_mode="r"), 10, shuffle=False)
    assert torch.equal(b.x, torch.from_numpy(IMAGES))


def test_to_uint8_inverts_batches_rounds_and_saturates():
    """Batches' inverse; rounded as the real images' files are quantised (0.7 levels give 1, 0.5
    rounds to 128); outside [0, 1] saturated at 0 and 255, not wrapped modulo 256."""
    x = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    (batch,) = data.Batches(x, 7, shuffle=False).epoch(0)
    np.testing.assert_array_equal(data.to_uint8(batch), x)
    x = torch.full((1, 3, 1, 2), 0.7 / 255)
    x[0, :, 0, 1] = 200.2 / 255
    assert data.to_uint8(x).tolist() == [[[[1, 1, 1], [200, 200, 200]]]]
    x = torch.tensor([-0.5, 1.7, 1.0, 0.5, -2.0, 3.0]).view(1, 1, 1, 6)
    assert data.to_uint8(x).ravel().tolist() == [0, 255, 255, 128, 0, 255]


@pytest.mark.parametrize("leave", [True, False])
def test_progress_draws_the_final_count_then_ends_or_wipes_the_line(capsys, monkeypatch, leave):
    """The final count drawn, the line ended or wiped; at most 4 redraws a second."""
    items = [[1, 2], [3], [4, 5, 6]]
    assert list(data.progress(iter(items), 6, "x", "cats", leave=leave)) == items
    m = re.search(r"\r(x 6/6 cats, \d+ cats/s, ETA 0:00 *)(\n|\r( +)\r)$", capsys.readouterr().err)
    assert m and (m[2] == "\n") == leave and (leave or len(m[3]) >= len(m[1]))
    clock = iter(np.arange(0, 100, 0.1))  # each call to time.time() advances 0.1 s
    monkeypatch.setattr(data.time, "time", lambda: next(clock))
    list(data.progress(range(20), 20, "x", count=lambda _: 1, leave=leave))
    draws, wipe = capsys.readouterr().err.count("\r"), 0 if leave else 2  # "\r" spaces "\r"
    assert 2 + wipe <= draws <= 1 + 20 * 2 * 0.1 / 0.25 + wipe  # the end's, + 1 per 0.25 s
    assert list(data.progress([], 0, "x")) == [] and capsys.readouterr().err == ""


def test_atomic_write_replaces_whole_or_keeps_old(tmp_path):
    """A write cut short (Ctrl-C) keeps the old file; no temporary file is left either way."""
    path = tmp_path / "x.npy"
    path.write_bytes(b"old")

    def write(f, fail):
        f.write(b"half")
        if fail:
            raise KeyboardInterrupt
        f.write(b" and whole")
    with pytest.raises(KeyboardInterrupt):
        data.atomic_write(path, lambda f: write(f, True))
    assert files_under(tmp_path) == ["x.npy"] and path.read_bytes() == b"old"
    data.atomic_write(path, lambda f: write(f, False))
    assert files_under(tmp_path) == ["x.npy"] and path.read_bytes() == b"half and whole"


# === fid.py: Frechet distance ====================================================================
def spd(rng, d, n=None):
    """A covariance: from n samples (singular when n <= d), else well conditioned."""
    x = rng.standard_normal((n or 3 * d, d)) @ rng.standard_normal((d, d))
    return np.cov(x, rowvar=False)


def root_tol(d, lmax):
    """Error bound of tr sqrtm(s1 s2), d x d, eigenvalues <= lmax: each moves by ~eps lmax at
    most (Weyl), its root by sqrt(eps lmax) at most (worst at 0, as N < d round-off ones are)."""
    return d * np.sqrt(np.finfo(np.float64).eps * lmax)


def fid_of_features(x, y):
    """Closed-form FID of two n-row feature sets, and a bound on |s1 s2|_2: tr sqrtm(s1 s2) is
    the sum of a b' / (n-1)'s singular values (a, b centred), no round-off eigenvalues."""
    n = len(x)
    a, b = x - x.mean(0), y - y.mean(0)
    tr_covmean = np.linalg.svd(a @ b.T / (n - 1), compute_uv=False).sum()
    distance = (np.sum((x.mean(0) - y.mean(0)) ** 2) + (np.sum(a ** 2) + np.sum(b ** 2)) / (n - 1)
                - 2 * tr_covmean)
    return distance, (np.linalg.norm(a, 2) * np.linalg.norm(b, 2)) ** 2 / (n - 1) ** 2


def _closed_form_cases():
    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2, s = rng.standard_normal(d), rng.standard_normal(d), spd(rng, d)
    a, b = rng.random(d) + 0.1, rng.random(d) + 0.1
    singular = spd(rng, d, n=10)  # N < dimension: rank 9, 55 eigenvalues at round-off
    dmu2, zero = np.sum((mu1 - mu2) ** 2), np.zeros(2)
    return {  # (mu1, sigma1, mu2, sigma2, expected FID)
        "equal covariances: squared mean distance": (mu1, s, mu2, s, dmu2),
        "diagonal covariances": (mu1, np.diag(a), mu2, np.diag(b),
                                 np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + dmu2),
        "FID(A, A) = 0": (mu1, s, mu1, s, 0.0),
        "equal singular covariances": (mu1, singular, mu2, singular, dmu2),
        # an eigenvalue -1e-9 of the largest (as float32-stored statistics) is round-off: its
        # root counts as 0; by hand: traces 4 - 4e-9 and 2, tr sqrtm(s1 s2) = sqrt(4) + 0
        "round-off below 0 in s1": (zero, np.diag([4.0, -4e-9]), zero, np.eye(2), 2 - 4e-9),
        "round-off below 0 in s2": (zero, np.eye(2), zero, np.diag([4.0, -4e-9]), 2 - 4e-9),
    }


@pytest.mark.parametrize("case", list(_closed_form_cases()))
def test_frechet_distance_closed_forms(case):
    """|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr sqrtm(s1 s2) (Heusel et al. 2017, pytorch-fid)."""
    mu1, s1, mu2, s2, expected = _closed_form_cases()[case]
    lmax = np.linalg.eigvalsh(s1)[-1] * np.linalg.eigvalsh(s2)[-1]  # |s1 s2| <= |s1| |s2|
    tol = 2 * root_tol(len(s1), lmax)  # the FID holds -2 tr sqrtm(s1 s2)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=0, abs=tol)


@pytest.mark.parametrize("n", [10, 200])  # singular (N < dimension) and full rank
def test_frechet_distance_matches_sqrtm_and_is_symmetric(n):
    """pytorch-fid's route (scipy's sqrtm of s1 s2) where valid; two computations, each within 2
    root_tol of the true FID, differ by 4 root_tol at most (3.6e-3 at n=10)."""
    rng = np.random.default_rng(n)
    mu1, mu2, s1, s2 = rng.standard_normal(64), rng.standard_normal(64), spd(rng, 64, n), spd(
        rng, 64, n)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(
        scipy.linalg.sqrtm(s1 @ s2)).real
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    tol = 4 * root_tol(64, np.linalg.eigvalsh(s1)[-1] * np.linalg.eigvalsh(s2)[-1])
    assert np.isfinite(got) and got == pytest.approx(expected, rel=0, abs=tol)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=0, abs=tol)


def test_frechet_distance_of_rank_deficient_inception_like_statistics():
    """300 x 2048 Inception-like features (scales 1e-2..3e3), which pytorch-fid 0.3.0 refuses
    ("Imaginary component"): against fid_of_features, within 2 root_tol (~356 of 1e8)."""
    rng = np.random.default_rng(0)
    scale = np.exp(rng.uniform(np.log(1e-2), np.log(3e3), 2048))
    x, y = (np.abs(rng.standard_normal((300, 2048))) * scale for _ in range(2))
    expected, largest = fid_of_features(x, y)
    got = fid.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0),
                               np.cov(y, rowvar=False))
    assert np.isfinite(got) and got == pytest.approx(expected, rel=0,
                                                     abs=2 * root_tol(2048, largest))


# === fid.py: Inception v3 and its weights ========================================================
@pytest.fixture(scope="module")
def testdata():
    """testdata/: inception_features.npz, its meta, and Inception3(aux_logits=True)'s names and
    shapes; read when needed, not on import (make_testdata.py imports this module)."""
    root = pathlib.Path(fid.__file__).resolve().parent / "testdata"
    with np.load(root / "inception_features.npz") as f:
        ref = dict(f)
    manifest = json.loads((root / "inception_manifest.json").read_text())
    return ref, json.loads(str(ref["meta"])), manifest


def meta_inception(variant="torchvision"):
    with torch.device("meta"):  # names and shapes without the random initialisation
        return fid.InceptionV3(variant)


def fixture_state(seed):
    """The random weights of testdata/inception_features.npz (testdata/make_testdata.py imports
    this): for each key of torchvision's Inception3 without fc and num_batches_tracked, in sorted
    order, drawn in float64 from one default_rng(seed) and cast to float32."""
    shapes = {k: v.shape for k, v in meta_inception().state_dict().items()
              if not k.endswith("_tracked")}
    rng, state = np.random.default_rng(seed), {}
    for k in sorted(shapes):
        shape = tuple(shapes[k])
        if k.endswith(".conv.weight"):  # He-normal: std sqrt(2 / fan_in), features stay O(1)
            v = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
        elif k.endswith((".bn.weight", ".bn.running_var")):
            v = rng.uniform(0.5, 1.5, shape)
        else:
            assert k.endswith((".bn.bias", ".bn.running_mean")), k
            v = rng.normal(0, 0.1, shape)
        state[k] = torch.from_numpy(v.astype(np.float32))
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory, testdata):
    """fixture_state as a torchvision file, with classifier heads that loading must ignore."""
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    heads = {k: torch.randn(shape) for k, shape in testdata[2].items() if k.startswith(fid.IGNORED)}
    state = {**fixture_state(testdata[1]["seed"]), **heads}
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("variant", ["torchvision", "tf"])
def test_features_match_torchvision_and_pytorch_fid(weights, testdata, variant):
    """Pool features of 3 random 32x32 images under fixture_state(20200), against torchvision's
    Inception3 and pytorch-fid's (the TF graph's port) in testdata/inception_features.npz.
    Tolerance: float32 accumulation, ~sqrt(4032) 2^-24 per layer over ~20 layers: 1e-4 x rms
    (measured: 3.5e-6 x rms); [0, 1] input, a resize to 298 or a torchvision pool fail it."""
    ref, meta, _ = testdata
    assert meta["seed"] == 20200 and meta["image_seed"] == 7
    net = meta_inception(variant).to_empty(device="cpu")
    fid.load_weights(net, {k: v for k, v in weights[1].items() if not k.startswith(fid.IGNORED)},
                     variant)
    images = np.random.default_rng(7).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        got = net.eval()(x).double().numpy()
    norm = ref[f"{variant}_norm"]
    tol = 1e-4 * norm / np.sqrt(2048)  # 1e-4 x rms per feature, for each image
    want = ref[f"{variant}_features"].astype(np.float64)
    assert np.all(np.abs(got[:, ref["dims"]] - want) <= tol[:, None])
    assert np.all(np.abs(np.linalg.norm(got, axis=1) - norm) <= tol * np.sqrt(2048))
    assert np.all(np.abs(got.sum(1) - ref[f"{variant}_sum"]) <= tol * 2048)


@pytest.mark.parametrize("variant, url, classes", [
    ("torchvision", "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth", 1000),
    ("tf", "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
           "pt_inception-2015-12-05-6726825d.pth", 1008),
])
def test_weights_load_from_a_file_or_the_published_url(weights, testdata, tmp_path,
                                                       monkeypatch, variant, url, classes):
    """Both files: torchvision's names and shapes, a 1000- or 1008-way classifier telling them
    apart; the download: the published URL, hash-checked, weights_only."""
    manifest = testdata[2]
    want = {k: s for k, s in manifest.items() if not k.startswith(("AuxLogits.", "fc."))}
    assert len(want) == len(manifest) - 16
    assert {k: list(v.shape) for k, v in meta_inception(variant).state_dict().items()} == want
    state = {**weights[1], "fc.weight": torch.zeros(classes, 2048), "fc.bias": torch.zeros(classes)}
    torch.save(state, tmp_path / "w.pth")
    net = fid.load_inception(variant, weights_path=tmp_path / "w.pth", device="cpu")
    assert net.variant == variant and not net.training
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded if not k.endswith("_tracked"))
    assert all(loaded[k].item() == 0 for k in loaded if k.endswith("_tracked"))
    other = "tf" if variant == "torchvision" else "torchvision"  # the file under the wrong flag
    with pytest.raises(DataError, match=f"fc has {classes} classes, not {2008 - classes}"):
        fid.load_inception(other, weights_path=tmp_path / "w.pth", device="cpu")
    calls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or state)
    assert fid.load_inception(variant, device="cpu").variant == variant
    assert calls == [((url,), dict(map_location="cpu", check_hash=True, weights_only=True))]


KEY = "Mixed_6b.branch7x7_2.conv.weight"


def damaged(change):
    """Writes the fixture's weights, without the classifier and changed, to p."""
    def write(p, state):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        change(state)
        torch.save(state, p)
    return write


@pytest.mark.parametrize("write, start", [
    (lambda p, s: p.write_bytes(b"not a checkpoint"), "cannot load {path} (not weights"),
    (lambda p, s: p.write_bytes(b""), "cannot load {path} (not weights"),
    (lambda p, s: p.write_bytes(b"U"), "cannot load {path} (index out of range"),
    (lambda p, s: p.write_bytes(b"X"), "cannot load {path} (unpack requires a buffer of 4 bytes"),
    (lambda p, s: torch.save(nn.Linear(2, 2), p), "cannot load {path} (not weights"),  # code
    (lambda p, s: None, "cannot load {path} ([Errno 2] No such file"),
    (None, "cannot load {url} (<urlopen error no network>"),  # no file given: the download
    # a state dict of other names or shapes: load_state_dict's own diagnosis, on one line
    (damaged(lambda s: s.pop(KEY)), f'these are not the tf Inception v3 weights (Missing '
                                    f'key(s) in state_dict: "{KEY}"'),
    (damaged(lambda s: s.update({"Mixed_6b.extra.weight": torch.zeros(1)})),
     'these are not the tf Inception v3 weights (Unexpected key(s) in state_dict: '
     '"Mixed_6b.extra.weight"'),
    (damaged(lambda s: s.update({KEY: torch.zeros(128, 128, 7, 1)})),
     f"these are not the tf Inception v3 weights (size mismatch for {KEY}: copying a param "
     "with shape torch.Size([128, 128, 7, 1]) from checkpoint, the shape in current model is "
     "torch.Size([128, 128, 1, 7])"),
], ids=["text", "empty", "IndexError", "struct.error", "pickled module", "missing", "offline",
        "missing key", "stray key", "wrong shape"])
def test_unusable_weights_are_refused_in_one_line(weights, tmp_path, write, start):
    """One line naming the right file's URL, never torch.load's advice of weights_only=False;
    junk raises anything (one-byte files an IndexError, a struct.error)."""
    path = tmp_path / "w.pth" if write else None
    if write:
        write(path, weights[1])
    with pytest.raises(DataError) as e:
        fid.load_inception("tf", weights_path=path, device="cpu")
    message = str(e.value)
    assert message.startswith(start.format(path=path, url=fid.URLS["tf"])), message
    assert fid.URLS["tf"] in message and "--inception-weights" in message
    assert start.startswith("these") or message.endswith(" --inception-weights PATH")
    assert "\n" not in message and "weights_only" not in message


@pytest.mark.parametrize("variant", ["torchvision", "tf"])
def test_each_block_pools_as_its_variant(variant):
    """The TF graph (pytorch-fid's patches): A, C and the first E blocks average without the
    padding, Mixed_7c max-pools; by hand, the corner of a 3x3 pool over a 2x2 image."""
    corner = [pool(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))[0, 0, 0, 0].item()
              for pool in (fid.avg_pool, fid.tf_avg_pool, fid.tf_max_pool)]
    # torchvision counts the 5 padding zeros; TF does not; Mixed_7c's max
    assert corner == pytest.approx([(1 + 2 + 3 + 4) / 9, (1 + 2 + 3 + 4) / 4, 4.0])
    tv = variant == "torchvision"
    patched = fid.avg_pool if tv else fid.tf_avg_pool
    want = {**{f"Mixed_{b}": [patched] for b in ("5b", "5c", "5d", "6b", "6c", "6d", "6e", "7b")},
            "Mixed_6a": [fid.max_pool], "Mixed_7a": [fid.max_pool],
            "Mixed_7c": [fid.avg_pool if tv else fid.tf_max_pool]}
    got = {name: [f for branch in block.branches for f in branch
                  if not isinstance(f, (fid.Conv, list))]
           for name, block in meta_inception(variant).named_children() if name.startswith("Mix")}
    assert got == want


# === fid.py: features, statistics and their files ================================================
def images(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


class Pixels(nn.Module):
    """A stand-in network: the first 6 input values (+ offset) as float32 features."""

    def __init__(self, offset=0.0, variant="torchvision"):
        super().__init__()
        self.variant = variant  # fid.InceptionV3's: names the statistics' cache
        self.offset = nn.Parameter(torch.tensor(offset))  # also tells feature_stats the device
        self.batches = []

    def forward(self, x):
        self.batches.append(len(x))
        return x.flatten(1)[:, :6] + self.offset


def pixel_features(u8_nchw, offset=0.0):
    """Pixels' features by hand, in numpy: the same float32 operations, then float64."""
    f = u8_nchw.reshape(len(u8_nchw), -1)[:, :6].astype(np.float32) / np.float32(255)
    return (f + np.float32(offset)).astype(np.float64)


def test_statistics_are_float64_mean_over_images_and_covariance_over_n_minus_1(capsys):
    """pytorch-fid's float64 mean (features ~1000, batches 3, 3, 1) and np.cov (N - 1). FID
    depends on N (the released code's 10,000): N <= features warns of a singular covariance."""
    x = images(7, size=4, seed=3)
    mu, sigma = fid.feature_stats(Pixels(1000.0), x, batch_size=3, desc="FID real")
    assert "FID real 7/7 images" in capsys.readouterr().err  # progress, with the total
    f = pixel_features(x.transpose(0, 3, 1, 2), 1000.0)
    c = f - f.sum(0) / 7
    assert mu.dtype == sigma.dtype == np.float64
    assert mu == pytest.approx(f.sum(0) / 7, rel=0, abs=1e-9)
    assert sigma == pytest.approx(c.T @ c / 6, rel=0, abs=1e-12)  # N - 1 (np.cov), entries ~0.08
    streamed = fid.feature_stats(Pixels(1000.0), (x[i:i + 2] for i in range(0, 7, 2)),
                                 desc="gen", total=7)
    assert "gen 7/7 images" in capsys.readouterr().err
    assert all(np.array_equal(a, b) for a, b in zip((mu, sigma), streamed))
    for n in (6, 7):  # Pixels has 6 features, the network 2048; N - 1 is the rank at most
        fid.feature_stats(Pixels(), images(n, size=4), desc="FID real")
        warned = re.findall("^warning: .*", capsys.readouterr().err, re.M)
        assert warned == (["warning: FID real: 6 images <= 6 features, so the covariance is "
                           "singular and the FID biased up: compare only at equal N (the "
                           "paper's 10,000)"] if n == 6 else [])


@pytest.mark.parametrize("other", [("tf", 30), ("torchvision", 20)], ids=["variant", "n"])
def test_real_statistics_cache_keeps_inception_variants_and_n_apart(tmp_path, other):
    """FID depends on the network and on N: with torchvision's statistics of 30 images cached,
    a tf score or one of 20 images computes its own, so each set against itself gives 0."""
    real = images(30, size=4)
    for variant, n in (("torchvision", 30), other):
        net = Pixels(float(variant == "tf"), variant)
        got = fid.score(net, real[:n], {"self": real[:n]}, str(tmp_path), ["cifar10", "test"])
        largest = np.linalg.eigvalsh(fid.feature_stats(net, real[:n])[1])[-1] ** 2
        assert got["self"] == pytest.approx(0, abs=2 * root_tol(6, largest))
    assert len(list(tmp_path.glob("fid_stats_cifar10_test_n*.npz"))) == 2


@pytest.mark.parametrize("before", [True, False])
def test_features_are_computed_without_tf32_and_the_settings_restored(before):
    """The network sees both TF32 switches off; after feature_stats (an error too) the caller's."""
    flags, seen = (torch.backends.cudnn, torch.backends.cuda.matmul), []

    class Recording(Pixels):  # what the switches are while the network runs
        def forward(self, x):
            seen.append([f.allow_tf32 for f in flags])
            return super().forward(x)
    saved = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = before
        fid.feature_stats(Recording(), images(3))
        assert seen == [[False, False]] and [f.allow_tf32 for f in flags] == [before] * 2
        with pytest.raises(TypeError):  # restored after an error too
            fid.feature_stats(Recording(), [images(2), np.array(["junk"])])
        assert seen == [[False, False]] * 2 and [f.allow_tf32 for f in flags] == [before] * 2
    finally:
        for f, value in zip(flags, saved):
            f.allow_tf32 = value


def test_stats_cache_miss_computes_and_saves_then_hit_reads(tmp_path):
    """A miss computes and saves (mu, sigma) only, a hit reads them back; saving is atomic."""
    calls = []

    def compute():
        calls.append(1)
        return np.arange(3.0), np.eye(3)
    path = tmp_path / "stats.npz"
    first = fid.cached_stats(path, compute)  # miss: computed and saved
    with np.load(path) as f:  # mu and sigma only
        assert sorted(f.files) == ["mu", "sigma"]
        assert np.array_equal(f["mu"], np.arange(3.0)) and np.array_equal(f["sigma"], np.eye(3))
    second = fid.cached_stats(path, compute)  # hit: read back
    assert len(calls) == 1 and all(np.array_equal(a, b) for a, b in zip(first, second))
    assert files_under(tmp_path) == ["stats.npz"]

    class Unwritable:  # np.savez fails at sigma after mu: no half-written file is left
        def __array__(self, *args, **kwargs):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        fid.save_stats(tmp_path / "other.npz", np.zeros(3), Unwritable())
    assert files_under(tmp_path) == ["stats.npz"]


# === fid.py: command line ========================================================================
def write_folder(path, x, extra={}):
    """x as PNG files 00.png, 01.png, ... in path, then `extra` files: {name: bytes or image}."""
    path.mkdir()
    for i, img in enumerate(x):
        Image.fromarray(img).save(path / f"{i:02d}.png")
    for name, v in extra.items():
        if isinstance(v, bytes):
            (path / name).write_bytes(v)
        else:
            Image.fromarray(v).save(path / name)
    return str(path)


def test_cli_computes_statistics_with_its_network_options(tmp_path, monkeypatch, capsys):
    """Network flags reach load_inception, --batch-size the reads; statistics saved or compared."""
    x, y = images(5, size=4, seed=4), images(3, size=12, seed=2)
    folder, other = write_folder(tmp_path / "x", x), write_folder(tmp_path / "y", y)
    out, loads, net = tmp_path / "x.npz", [], Pixels()
    monkeypatch.setattr(fid, "load_inception", lambda *args: loads.append(args) or net)
    assert fid.main([folder, "--save-stats", str(out), "--inception", "tf", "--inception-weights",
                     "w.pth", "--device", "cpu", "--batch-size", "2"]) == 0
    assert loads == [("tf", "w.pth", "cpu")] and net.batches == [2, 2, 1]
    f = pixel_features(x.transpose(0, 3, 1, 2))
    c = f - f.mean(0)
    mu, sigma = fid.load_stats(out)
    assert mu == pytest.approx(f.mean(0), rel=0, abs=1e-12)
    assert sigma == pytest.approx(c.T @ c / 4, rel=0, abs=1e-12)
    recorded = []  # what the command line computes with (the distance itself is tested above)
    monkeypatch.setattr(fid, "frechet_distance", lambda *stats: recorded.append(stats) or 12.5)
    capsys.readouterr()
    assert fid.main([str(out), other]) == 0
    assert loads[1] == ("torchvision", None, "cuda" if torch.cuda.is_available() else "cpu")
    assert net.batches[3:] == [3]  # --batch-size 200 by default
    g = pixel_features(y.transpose(0, 3, 1, 2))
    want = mu, sigma, g.mean(0), np.cov(g, rowvar=False)
    assert len(recorded) == 1 and all(np.allclose(got, w, rtol=1e-6, atol=1e-12)
                                      for got, w in zip(recorded[0], want))
    printed, err = capsys.readouterr()
    assert printed == "12.500000\n" and f"{other} 3/3 images" in err


def npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def bad_npz(name, write):  # a statistics file that fid.load_stats refuses
    def setup(p):
        write(p / name)
        return str(p / name)
    return setup


@pytest.mark.parametrize("setup, message", [
    (lambda p: write_folder(p / "one", images(1)), ".*one: 1 image; a covariance needs at least 2"),
    (lambda p: write_folder(p / "empty", images(0)), ".*empty: neither .* nor a folder of images"),
    (lambda p: write_folder(p / "images", images(2), {"03.png": b"not a png"}),
     "cannot decode image .*03.png"),
    (lambda p: write_folder(p / "images", images(2), {"03.png": images(1, size=12)[0]}),
     "cannot read the images from .*00.png on: .*same shape"),
    (bad_npz("junk.npz", lambda p: p.write_bytes(b"junk")),
     r"cannot read statistics \(mu, sigma\) from .*junk.npz: .*pickle"),
    (bad_npz("mu.npz", lambda p: np.savez(p, mu=np.zeros(2))),
     "cannot read statistics .* from .*mu.npz: .*sigma"),
    (bad_npz("empty.npz", lambda p: p.write_bytes(b"")),
     "cannot read statistics .* from .*empty.npz: No data left in file"),
    (bad_npz("array.npz", lambda p: p.write_bytes(npy_bytes(np.zeros(2)))),  # np.save's format
     "cannot read statistics .* from .*array.npz: .*ndarray"),
    (bad_npz("x.npy", lambda p: np.save(p, images(3))), ".*x.npy: neither a statistics .npz"),
    (lambda p: str(p / "missing.npz"), ".*missing.npz: neither"),
], ids=["one image", "empty folder", "unreadable image", "mixed sizes", "junk npz",
        "npz without sigma", "empty npz", "npy format npz", "npy", "missing npz"])
def test_cli_errors(weights, tmp_path, capsys, setup, message):
    """Exit 1, one line naming the bad input, no statistics file written."""
    source = setup(tmp_path)
    code = fid.main([source, "--save-stats", str(tmp_path / "s.npz"), "--inception-weights",
                     str(weights[0]), "--device", "cpu"])
    err = capsys.readouterr().err
    error = err[err.index("error: "):]
    assert code == 1 and re.match(f"error: {message}", error) and error.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "s.npz")


def test_cli_needs_two_inputs_or_save_stats_and_documents_every_argument(tmp_path, monkeypatch,
                                                                         capsys):
    """Two statistics files: by hand |(1, 0)|^2 + (4 + 1) + 2 - 2 (sqrt(4) + sqrt(1)) = 2."""
    np.savez(tmp_path / "a.npz", mu=np.array([1.0, 0.0]), sigma=np.diag([4.0, 1.0]))
    np.savez(tmp_path / "b.npz", mu=np.zeros(2), sigma=np.eye(2))
    assert fid.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]) == 0
    assert capsys.readouterr() == ("2.000000\n", "")
    np.savez(tmp_path / "c.npz", mu=np.zeros(3), sigma=np.eye(3))  # another network's, say
    assert fid.main([str(tmp_path / "a.npz"), str(tmp_path / "c.npz")]) == 1
    assert capsys.readouterr().err == (
        "error: statistics of different sizes: mu (2,) and (3,), sigma (2, 2) and (3, 3); "
        "compute both sides with the same Inception\n")
    with pytest.raises(SystemExit) as e:
        fid.main(["a.npz"])
    assert e.value.code == 2 and "--save-stats OUT.npz" in capsys.readouterr().err
    parsers = []

    def capture(parser, argv=None):
        parsers.append(parser)
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        fid.main([])
    options = [a for a in parsers[0]._actions if a.dest != "help"]
    assert {a.dest for a in options} == {"a", "b", "save_stats", "inception",
                                         "inception_weights", "batch_size", "device"}
    assert all(a.help and len(a.help.split()) >= 2 for a in options)


# === speed: the fast paths compute what the plain one does; --bench ==============================
@pytest.mark.parametrize("variant", ["channels_last", "compile"])
def test_fast_step_equals_plain_step(variant):
    """Four fast training steps give a plain fp32 NCHW step's losses and weights."""
    import torch._inductor.config
    cfg = dict(kl_weight=1.0, l2=0.0)
    results = []
    for fmt, compile_ in ((torch.contiguous_format, False),
                          (torch.channels_last, variant == "compile")):
        torch.manual_seed(0)
        model = build(TINY_CFG, 1).to(memory_format=fmt)
        # body.2's bias feeds a batch norm: its gradient is 0 but for round-off, which Adam
        # would scale up to +-lr into the next running mean; so it stays fixed here
        for name, p in model.named_parameters():
            p.requires_grad_(not name.endswith("body.2.bias"))
        opt = train.make_optimizer(model, 1e-3, torch.device("cpu"))
        args = argparse.Namespace(device=torch.device("cpu"), compile=compile_, amp="none")
        step = train.make_step(model, opt, cfg, args)
        x = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        x = x.contiguous(memory_format=fmt)
        # compiled code draws its own random numbers unless told to use eager's
        with torch._inductor.config.patch(fallback_random=True):
            results.append(([step(x)[0] for _ in range(4)], model.state_dict()))
    (plain, w_plain), (fast, w_fast) = results
    # float32 sums in another order: relative round-off ~1e-6 per op, grown over 4 Adam steps
    torch.testing.assert_close(torch.stack(fast), torch.stack(plain), rtol=1e-4, atol=1e-5)
    for k in w_plain:
        torch.testing.assert_close(w_fast[k], w_plain[k], rtol=1e-4, atol=5e-5)


def test_bench_prints_rates_and_speed_up(capsys):
    """images/s = batch / (ms/step); the speed-up is the plain step's time over the other's."""
    train.main([*TINY, "--bench", "--dataset", "folder"])
    out = capsys.readouterr().out
    rates = re.findall(r"batch 10, (.*): ([\d.]+) images/s, ([\d.]+) ms/step", out)
    assert [r[0] for r in rates] == ["plain fp32 NCHW step", "amp none, compile False"]
    for _, ips, ms in rates:
        assert float(ips) == pytest.approx(10 / float(ms) * 1000, rel=0.01)
    speedup = float(re.search(r"speed-up of the configured step: ([\d.]+)x", out).group(1))
    assert speedup == pytest.approx(float(rates[0][2]) / float(rates[1][2]), rel=0.02)
