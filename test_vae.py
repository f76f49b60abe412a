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
    assert (bn.decay, bn.eps) == (0.999, 1e-5)  # TF's batch_norm


def test_stage2_shapes():
    m = vae.SecondStage(latent_dim=8, dim=32, depth=3)
    z_hat, mu, logsd = m(torch.randn(5, 8))
    assert z_hat.shape == mu.shape == logsd.shape == (5, 8)
    assert m.mu.in_features == 32 + 8  # skip-concatenation of the input


@pytest.mark.parametrize("side,k", [(32, 1.0), (64, 4.0)])
def test_kl_weight_by_pixel_count(side, k):
    assert vae.kl_weight_for(side) == k
    args = train.parse_args(["--dataset", "celeba" if side == 64 else "cifar10"])
    assert train.settle(args, 1)["kl_weight"] == k


def test_variance_law_closed_form():
    mu = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [3.0, 0.0], [-3.0, 0.0]])
    logsd = torch.log(torch.tensor([[0.1, 1.0], [0.1, 1.0], [0.1, 1.0], [0.1, 1.0]]))
    law, e_var = vae.variance_law(mu, logsd)
    torch.testing.assert_close(law, torch.tensor([5.0 + 0.01, 1.0], dtype=torch.float64))
    torch.testing.assert_close(e_var, torch.tensor([0.01, 1.0], dtype=torch.float64))
    # the released code's statistic: E[sigma] in place of E[sigma^2]
    law, e_sd = vae.variance_law(mu, logsd, released=True)
    torch.testing.assert_close(law, torch.tensor([5.0 + 0.1, 1.0], dtype=torch.float64))


def test_latent_summary_counts_both_definitions():
    """A "limbo" latent with sigma 0.85 (E[sigma^2] 0.7225): active by the paper's footnote 3,
    inactive by the released code's E[sigma] >= 0.8; sigma 0.5 is active by both, 1 by neither.
    The inputs are float32, so the sums hold to its precision (~1e-7)."""
    logsd = torch.log(torch.tensor([[0.85, 0.5, 1.0]])).repeat(4, 1)
    mu = torch.tensor([[0.1, 1.0, 0.0], [-0.1, -1.0, 0.0], [0.1, 1.0, 0.0], [-0.1, -1.0, 0.0]])
    row, e_var = vae.latent_summary(mu, logsd)
    assert (row["inactive"], row["inactive_code"]) == (1, 2)
    assert row["var_law"] == pytest.approx((0.01 + 0.7225 + 1 + 0.25 + 1) / 3, rel=1e-6)
    assert row["var_law_code"] == pytest.approx((0.01 + 0.85 + 1 + 0.5 + 1) / 3, rel=1e-6)
    torch.testing.assert_close(e_var, torch.tensor([0.7225, 0.25, 1.0], dtype=torch.float64),
                               rtol=1e-6, atol=0)


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


def test_training_forward_samples_z_with_the_reparametrisation_trick():
    m = vae.VAE(16, 8, 4, 16, 2).eval()  # eval: batch norm deterministic, the noise remains
    x = torch.rand(3, 3, 16, 16)
    torch.manual_seed(5)
    x_hat, mu, logsd = m(x)
    torch.manual_seed(5)
    eps = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(x_hat, m.decode(mu + logsd.exp() * eps))
        assert (x_hat - m.decode(mu)).abs().max() > 1e-3  # the noise matters


def test_stage2_concatenates_its_input_in_both_directions():
    """Dai & Wipf's second stage: [z, mlp(z)] -> mu_u, log sigma_u; [u, mlp(u)] -> z_hat."""
    m = vae.SecondStage(latent_dim=3, dim=5, depth=2)
    z = torch.randn(4, 3)
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


def test_reconstruction_and_sampling_follow_the_released_protocol():
    """REC decodes a sampled z = mu + sigma eps (not mu); GEN-1 decodes z ~ N(0, I); GEN-2 takes
    u ~ N(0, I) through the stage-2 decoder; all from the caller's generator, in that order."""
    m1, m2 = vae.VAE(16, 8, 4, 16, 2).eval(), vae.SecondStage(8, 16, 2).eval()
    x = torch.rand(4, 3, 16, 16)
    r, mu, logsd = vae.reconstruct(m1, x, torch.Generator().manual_seed(1))
    eps = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(r, m1.decode(mu + logsd.exp() * eps))
        g = torch.Generator().manual_seed(2)
        z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
        g = torch.Generator().manual_seed(2)
        torch.testing.assert_close(vae.sample_latents(m1, None, 6, g, "cpu"), z1)
        torch.testing.assert_close(vae.sample_latents(m1, m2, 6, g, "cpu"), m2.decode(z2))


# ------------------------------------------------------------------ training (train.py)
TINY = ["--img-size", "16", "--base-dim", "4", "--fc-dim", "16", "--latent-dim", "8",
        "--num-scale", "2", "--second-dim", "16", "--batch-size", "10", "--lr", "2e-3",
        "--seed", "3", "--sample-every", "2"]
TINY_CFG = dict(img_size=16, latent_dim=8, base_dim=4, fc_dim=16, num_scale=2, block_per_scale=1,
                depth_per_block=2, second_dim=16, second_depth=3, gamma="computed")


def smooth_images(n, rng, side=16):
    yy, xx = np.mgrid[0:side, 0:side] / (side - 1)
    a, b, c = rng.uniform(0, 1, (3, n, 1, 1))
    return (np.stack([a * xx, b * yy, c * (1 - xx)], -1) * 255).round().astype(np.uint8)


def image_folder(root, n_train=60, n_test=30, seed=0, side=16):
    """train/ and test/ subfolders of smooth PNG images (lossless, so pixels are known)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        os.makedirs(root / split)
        for i, im in enumerate(smooth_images(n, rng, side)):
            Image.fromarray(im).save(root / split / f"{i:03d}.png")
    return root


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A run on a folder of 60 smooth 16x16 training images (and 30 test images)."""
    monkeypatch.setattr(train, "STOP", [])
    folder, out = image_folder(tmp_path / "images"), str(tmp_path / "run")
    def run(*argv, data_dir=folder):
        train.main([*TINY, "--dataset", "folder", "--data-dir", str(data_dir), "--out", out,
                    *argv])
    return run, out


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
    for name in ("stage1.pt", "latent_variance.png", "gamma.png", "recon_e0004.png",
                 "samples_e0002.png"):
        assert os.path.exists(os.path.join(out, name)), name
    ck = torch.load(os.path.join(out, "stage1.pt"), weights_only=True)
    assert ck["epoch"] == 4
    assert ck["model"]["gamma.mse_est"].item() == pytest.approx(rows[-1]["gamma"] ** 2, rel=1e-5)


def test_gamma_update_follows_each_step():
    """The first step's loss is at gamma = 1; after it mse_est = 0.99 + 0.01 * its batch mse, and
    the second step's loss uses that estimate (eq. 7 summed over D = 768 values, k = 4)."""
    torch.manual_seed(0)
    model = train.build(TINY_CFG, 1)
    opt = train.make_optimizer(model, 1e-3, torch.device("cpu"))
    args = argparse.Namespace(device=torch.device("cpu"), compile=False, amp="none")
    step = train.make_step(model, opt, dict(kl_weight=4.0, l2=0.0), args)
    x, D, c = torch.rand(10, 3, 16, 16), 768, 0.5 * math.log(2 * math.pi)
    (loss, kl, mse), _, _ = step(x)
    assert loss.item() == pytest.approx(D * mse.item() / 2 + D * c + 4 * kl.item(), rel=1e-5)
    est = 0.99 + 0.01 * mse.item()
    assert model.gamma.mse_est.item() == pytest.approx(est, rel=1e-6)
    (loss, kl, mse), _, _ = step(x)
    expected = D * mse.item() / (2 * est) + D * (0.5 * math.log(est) + c) + 4 * kl.item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert model.gamma.mse_est.item() == pytest.approx(0.99 * est + 0.01 * mse.item(), rel=1e-6)


def test_l2_penalty_is_on_the_resampling_kernels():
    """l2 * sum(w^2) over the stride-2 convolutions' kernels (paper 4.2), biases excluded."""
    losses = []
    for l2 in (0.0, 0.5):
        torch.manual_seed(0)
        model = train.build(TINY_CFG, 1)
        args = argparse.Namespace(device=torch.device("cpu"), compile=False, amp="none")
        step = train.make_step(model, train.make_optimizer(model, 1e-3, args.device),
                               dict(kl_weight=1.0, l2=l2), args)
        torch.manual_seed(1)
        kernels = [m.weight.detach().clone() for m in model.modules() if isinstance(
            m, (nn.Conv2d, nn.ConvTranspose2d)) and m.stride == (2, 2)]
        x = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        losses.append(step(x)[0][0].item())
    assert len(kernels) == 1 + 3  # one down (16 -> 8), three up (2 -> 4 -> 8 -> 16)
    penalty = sum(k.double().square().sum().item() for k in kernels)
    assert losses[1] - losses[0] == pytest.approx(0.5 * penalty, rel=1e-4)


def test_adam_is_tf1s():
    """Two Adam steps on loss = 3p, then -p, by hand with TF1's defaults (beta1 0.9, beta2 0.999,
    eps 1e-8 added to the root of the bias-corrected second moment), paper section 4."""
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


@pytest.mark.parametrize("epoch, lr", [(0, 1e-4), (199, 1e-4), (200, 5e-5), (399, 5e-5),
                                       (400, 2.5e-5), (600, 1.25e-5), (699, 1.25e-5)])
def test_learning_rate_halves_every_200_epochs(epoch, lr):
    """Paper 4.1: 1e-4, halved every 200 epochs; epoch is 0-based (the 201st epoch halves)."""
    assert train.lr_at(dict(lr=1e-4, halve_every=200), epoch) == lr


def test_schedule_reaches_the_optimizer(tiny):
    run, out = tiny
    run("--epochs", "3", "--halve-every", "2")
    assert [r["lr"] for r in metrics(out)] == [2e-3, 2e-3, 1e-3]
    ck = torch.load(os.path.join(out, "stage1.pt"), weights_only=True)
    assert ck["optimizer"]["param_groups"][0]["lr"] == 1e-3


@pytest.mark.parametrize("dataset, side, stage, expected", [
    ("cifar10", 32, 1, dict(epochs=700, lr=1e-4, halve_every=200, kl_weight=1.0, l2=0.0,
                            num_scale=3, second_dim=2048)),
    ("cifar10", 32, 2, dict(epochs=1400, lr=1e-4, halve_every=100, kl_weight=1.0, l2=0.0,
                            num_scale=3, second_dim=2048)),
    ("celeba", 64, 1, dict(epochs=70, lr=5e-5, halve_every=60, kl_weight=4.0, l2=1e-3,
                           num_scale=4, second_dim=4096)),
    ("celeba", 64, 2, dict(epochs=140, lr=5e-5, halve_every=120, kl_weight=1.0, l2=0.0,
                           num_scale=4, second_dim=4096)),
])
def test_defaults_are_the_papers_numbers(dataset, side, stage, expected):
    """Sections 4, 4.1, 4.2 and Fig. 1, as literal numbers (CelebA's halving periods and stage-2
    epochs from the released code's comments)."""
    common = dict(batch_size=100, gamma="computed", latent_dim=64, base_dim=32, fc_dim=512,
                  block_per_scale=1, depth_per_block=2, second_depth=3, seed=0,
                  resize="bilinear", jpeg=None, limit=None)
    assert train.paper_defaults(dataset, side, stage) == {**common, **expected}
    args = train.parse_args(["--dataset", dataset, "--stage", str(stage)])
    cfg = train.settle(args, stage)
    assert {k: cfg[k] for k in expected if k != "epochs"} == {
        k: v for k, v in expected.items() if k != "epochs"} and args.epochs == expected["epochs"]


def test_stage2_trains_on_fresh_latents_each_epoch():
    """z = mu + sigma * eps with new eps every epoch (Dai & Wipf), each row once per epoch."""
    mu = torch.arange(40.0).reshape(20, 2)
    data_ = train.Latents(mu, torch.full((20, 2), math.log(0.01)), 5, seed=0)
    epochs = [torch.cat(list(data_.epoch(e))) for e in (0, 1)]
    for z in epochs:
        order = z[:, 0].round().long() // 2  # which row of mu each sample came from
        assert sorted(order.tolist()) == list(range(20))
        assert (z - mu[order]).abs().max() < 0.06  # sigma 0.01
    noise = [z - mu[z[:, 0].round().long() // 2] for z in epochs]
    assert not torch.allclose(noise[0][noise[0][:, 1].argsort()], noise[1][noise[1][:, 1].argsort()])


def test_stage2_trains_from_stage1_and_eval_writes_table(tiny, capsys):
    run, out = tiny
    run("--epochs", "2")
    run("--stage", "2", "--epochs", "2")
    rows = metrics(out)
    assert [(r["stage"], r["epoch"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert os.path.exists(os.path.join(out, "samples_stage2_e0002.png"))
    capsys.readouterr()
    run("--eval", "--no-fid", "--n-eval", "25")
    res = json.load(open(os.path.join(out, "eval.json")))
    assert res["n"] == 25 and res["rec_fid"] is None and res["inception"] is None
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split()[:5] == ["2", "-", "-", "-", f"{res['mse']:.4f}"]
    assert f"{res['inactive_code']}/8" in printed[2]


def tiles(path, n, side=16, ncol=8, pad=2):
    """The first n images of a grid written by data.save_grid."""
    grid = np.asarray(Image.open(path))
    return np.stack([grid[pad + r * (side + pad):pad + r * (side + pad) + side,
                          pad + c * (side + pad):pad + c * (side + pad) + side]
                     for r, c in (divmod(i, ncol) for i in range(n))])


@pytest.mark.parametrize("latent_norm", [False, True])
def test_eval_follows_the_protocol(tiny, tmp_path, latent_norm):
    """--eval's pictures and numbers against the protocol done by hand: REC decodes
    mu + sigma * eps, GEN-1 z ~ N(0, I), GEN-2 the stage-2 decoder's output (rescaled to the
    variance law with --latent-norm), drawn in that order from a generator seeded with the run's
    seed; mse over the test images; the variance law and inactive counts by both definitions."""
    run, out = tiny
    run("--epochs", "2")
    run("--stage", "2", "--epochs", "1")
    run("--eval", "--no-fid", "--n-eval", "25", *(["--latent-norm"] if latent_norm else []))
    res = json.load(open(os.path.join(out, "eval.json")))
    m1, m2 = (train.load_model(os.path.join(out, f"stage{s}.pt"), s, "cpu")[0].eval()
              for s in (1, 2))  # eval mode: batch norm on its moving averages
    test = np.stack([np.asarray(Image.open(tmp_path / "images" / "test" / f"{i:03d}.png"))
                     for i in range(25)])
    x = torch.from_numpy(test).permute(0, 3, 1, 2).float() / 255
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        mu, logsd = m1.encode(x)
        r = m1.decode(mu + logsd.exp() * torch.randn(25, 8, generator=g))
        gen1 = m1.decode(torch.randn(25, 8, generator=g))
        z = m2.decode(torch.randn(25, 8, generator=g))
    mu, sd = mu.double().numpy(), logsd.double().exp().numpy()
    law = mu.var(0) + (sd ** 2).mean(0)
    if latent_norm:
        z = z * (math.sqrt(law.mean()) / z.std(0).mean())
    gen2 = m1.decode(z).detach()
    u8 = lambda t: (t * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    pairs = tiles(os.path.join(out, "eval_recon.png"), 64)
    pick = np.linspace(0, 24, 32).astype(int)[:8]  # the first row of the spread-out pairs
    for got, want in ((pairs[8:16], u8(r)[pick]), (pairs[:8], test[pick]),
                      (tiles(os.path.join(out, "eval_gen1.png"), 25), u8(gen1)),
                      (tiles(os.path.join(out, "eval_gen2.png"), 25), u8(gen2))):
        assert np.abs(got.astype(int) - want).max() <= 1  # one level of rounding
    assert res["mse"] == pytest.approx(((x - r) ** 2).mean().item(), rel=1e-5)
    assert res["var_law"] == pytest.approx(law.mean(), rel=1e-5)
    assert res["var_law_code"] == pytest.approx((mu.var(0) + sd.mean(0)).mean(), rel=1e-5)
    assert res["inactive"] == int(((sd ** 2).mean(0) >= 0.8).sum())
    assert res["inactive_code"] == int((sd.mean(0) >= 0.8).sum())


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


def test_interrupt_mid_epoch_then_resume(tiny, tmp_path, monkeypatch, capsys):
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
    capsys.readouterr()
    run("--epochs", "2", "--resume")
    assert metrics(out) == straight
    assert "resuming at epoch 2, step 4/6" in capsys.readouterr().out
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).readlines()[-1])
    # the resumed epoch's rate counts the 3 steps of 10 images it trained, not all 6
    assert row["images_per_s"] * row["seconds"] == pytest.approx(30, rel=1e-9)


def test_start_and_progress_lines(tiny, capsys):
    run, out = tiny
    run("--epochs", "1", "--limit", "40")
    o, err = capsys.readouterr()
    assert re.match(r"stage 1 on cpu \(\d+ threads\): folder 40 of 60 \(drawn from seed 3\) train "
                    r"images 16x16, [\d,]+ parameters, computed gamma, lr 0.002, "
                    r"batch 10, new run, 1 epochs in all; out ", o)
    assert re.search(r"stage 1 epoch 1/1 40/40 images, \d+ images/s, ETA 0:00", err)


def test_limit_draws_a_seeded_subset_kept_by_every_stage(tiny, monkeypatch):
    """--limit 20 of 60: the same 20 images, drawn from the seed, for stage 1, a resume and
    stage 2; not the first 20 files."""
    run, out = tiny
    seen = []
    real = data.Batches.__init__
    def spy(self, images, *a, **k):
        seen.append(np.array(images))
        real(self, images, *a, **k)
    monkeypatch.setattr(data.Batches, "__init__", spy)
    run("--epochs", "1", "--limit", "20")
    run("--epochs", "2", "--resume")
    run("--stage", "2", "--epochs", "1")
    full = data.load_split("folder", "train", str(pathlib.Path(out).parent / "images"), 16)
    assert len(seen) == 3 and all(np.array_equal(s, seen[0]) for s in seen)
    assert len(seen[0]) == 20 and not np.array_equal(seen[0], full[:20])
    index = [next(i for i in range(60) if np.array_equal(full[i], im)) for im in seen[0]]
    assert index == sorted(index)


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


@pytest.mark.parametrize("argv, message", [
    (["--img-size", "30"], "--img-size 30: .* power of two"),
    (["--img-size", "48"], "--img-size 48: .* power of two"),
    (["--device", "cuda"], "--device cuda, but this torch has no CUDA device"),
    (["--device", "gpu"], "--device gpu is not a torch device"),
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--sample-every", "0"], "--sample-every must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--eval", "--n-eval", "0"], "--n-eval must be at least 1"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--halve-every", "0"], "--halve-every must be at least 1"),
    (["--lr", "0"], "--lr 0.0: it must be a finite number above 0"),
    (["--lr", "nan"], "--lr nan: it must be a finite number above 0"),
    (["--kl-weight", "-1"], "--kl-weight -1.0: .* at least 0"),
    (["--jpeg", "100"], "--jpeg 100: a JPEG quality is 1..95"),
    (["--resize", "blurry"], "--resize blurry: choose one of"),
    (["--latent-norm"], "--latent-norm applies to --eval only"),
    (["--eval", "--resume"], "--eval evaluates the checkpoints"),
    (["--eval", "--inception-weights", "nowhere.pth"], "--inception-weights nowhere.pth: no "),
    (["--latent-dim", "0"], "--latent-dim must be at least 1"),
])
def test_bad_flags_fail_at_once_with_one_line(tiny, monkeypatch, capsys, argv, message):
    if "cuda" in argv:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    def no_decoding(*a, **k):
        raise AssertionError("decoded data before refusing the flags")
    monkeypatch.setattr(data, "load_split", no_decoding)
    run, out = tiny
    with pytest.raises(SystemExit) as e:
        run(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and re.match(f"error: {message}", err)


def test_clear_errors(tiny, capsys):
    run, out = tiny
    def fails(*argv, **k):
        with pytest.raises(SystemExit):
            run(*argv, **k)
        return capsys.readouterr().err
    assert "train stage 1 first" in fails("--stage", "2", "--epochs", "1")
    assert "train stage 1 first" in fails("--epochs", "1", "--resume")
    assert "train stage 1 first" in fails("--eval", "--no-fid")
    run("--epochs", "1")
    assert "train stage 2 first" in fails("--stage", "2", "--epochs", "1", "--resume")
    assert "--resume" in fails("--epochs", "2")
    assert "trained 1 epochs already" in fails("--epochs", "1", "--resume")
    assert "--latent-norm rescales two-stage samples" in fails("--eval", "--latent-norm")
    path = os.path.join(out, "stage1.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    err = fails("--epochs", "2", "--resume")
    assert "truncated, corrupt" in err and "weights_only" not in err


@pytest.mark.parametrize("argv, message", [
    (["--img-size", "32"], "stage1.pt in .* was made with --img-size 16, not 32"),
    (["--lr", "1e-3"], "made with --lr 0.002, not 0.001"),
    (["--batch-size", "5"], "made with --batch-size 10, not 5"),
    (["--gamma", "learned"], "made with --gamma computed, not learned"),
    (["--limit", "30"], "made with --limit None, not 30"),
    (["--jpeg", "75"], "made with --jpeg None, not 75"),
    (["--kl-weight", "2"], "made with --kl-weight 0.25, not 2.0"),  # k = 16 * 16 / 1024
])
def test_resume_refuses_other_settings(tiny, capsys, argv, message):
    run, out = tiny
    run("--epochs", "1")
    with pytest.raises(SystemExit):
        run("--epochs", "2", "--resume", *argv)
    assert re.search(message, capsys.readouterr().err)


def test_resume_stage2_and_eval_refuse_other_data(tiny, tmp_path, capsys):
    run, out = tiny
    run("--epochs", "1")
    other = image_folder(tmp_path / "dogs", n_train=54, n_test=10, seed=1)
    for argv in (["--epochs", "2", "--resume"], ["--stage", "2", "--epochs", "1"],
                 ["--eval", "--no-fid"]):
        with pytest.raises(SystemExit):
            run(*argv, data_dir=other)
        assert "was trained on other data" in capsys.readouterr().err


def test_stage2_needs_a_finished_stage1_epoch(tiny, monkeypatch, capsys):
    run, out = tiny
    real = vae.ComputedGamma.update
    monkeypatch.setattr(vae.ComputedGamma, "update", lambda self, m: train.STOP.append(2))
    with pytest.raises(SystemExit):
        run("--epochs", "1")
    monkeypatch.setattr(vae.ComputedGamma, "update", real)
    monkeypatch.setattr(train, "STOP", [])
    with pytest.raises(SystemExit):
        run("--stage", "2", "--epochs", "1")
    assert "saved mid-epoch (epoch 1, step 1): finish that epoch" in capsys.readouterr().err


def test_stage2_belongs_to_its_stage1(tiny, capsys):
    """stage2.pt trained on stage 1 at epoch 1; stage 1 trained on to epoch 2: --eval and a
    stage-2 resume refuse the pair and say how to mend it."""
    run, out = tiny
    run("--epochs", "1")
    run("--stage", "2", "--epochs", "1")
    run("--epochs", "2", "--resume")
    for argv in (["--eval", "--no-fid"], ["--stage", "2", "--epochs", "2", "--resume"]):
        with pytest.raises(SystemExit):
            run(*argv)
        err = capsys.readouterr().err
        assert "trained on stage 1 at epoch 1" in err and "now at epoch 2" in err
        assert "train stage 2 afresh" in err


def test_eval_with_fid_on_random_weights(tiny, tmp_path, capsys):
    """Smoke test of --eval's FID path on random Inception weights: it runs, caches the real
    statistics beside the split's cache, and reports finite FIDs (their values are checked in
    the FID tests)."""
    import fid
    run, out = tiny
    weights = tmp_path / "inception.pth"
    torch.manual_seed(0)
    torch.save(fid.InceptionV3().state_dict(), weights)
    run("--epochs", "1")
    run("--eval", "--n-eval", "4", "--inception-weights", str(weights))
    res = json.load(open(os.path.join(out, "eval.json")))
    cached = list((tmp_path / "cache").rglob("fid_stats_*.npz"))
    assert len(cached) == 1
    net = fid.load_inception("torchvision", str(weights), "cpu")
    test = data.load_split("folder", "test", str(tmp_path / "images"), 16)
    np.testing.assert_allclose(fid.load_stats(cached[0])[0], fid.feature_stats(net, test[:4])[0],
                               rtol=1e-5, atol=1e-6)
    assert res["inception"] == "torchvision" and res["gen2_fid"] is None
    assert all(np.isfinite(res[k]) for k in ("rec_fid", "gen1_fid"))


def _save(path, array):
    np.save(path, array)
    return path



@pytest.fixture(autouse=True)
def offline_with_private_cache(monkeypatch, tmp_path):
    """Any download attempt fails as without network; folder caches go to tmp_path/cache."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")
    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))



@pytest.mark.parametrize("variant", ["channels_last", "compile"])
def test_fast_step_equals_plain_step(variant):
    """The speed settings must not change what is computed: four training steps of the same
    network from the same state give the same losses and weights as a plain fp32 NCHW step."""
    import torch._inductor.config
    cfg = dict(kl_weight=1.0, l2=0.0)
    results = []
    for fmt, compile_ in ((torch.contiguous_format, False),
                          (torch.channels_last, variant == "compile")):
        torch.manual_seed(0)
        model = train.build(TINY_CFG, 1).to(memory_format=fmt)
        # body.2 is a conv whose output feeds a batch norm, which removes its bias: the exact
        # gradient of that bias is 0, Adam would scale the round-off left in its place up to
        # +-lr, and the next batch norm's running mean would carry it; so it stays fixed here
        for name, p in model.named_parameters():
            p.requires_grad_(not name.endswith("body.2.bias"))
        opt = train.make_optimizer(model, 1e-3, torch.device("cpu"))
        args = argparse.Namespace(device=torch.device("cpu"), compile=compile_, amp="none")
        step = train.make_step(model, opt, cfg, args)
        x = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        x = x.contiguous(memory_format=fmt)
        # compiled code draws its own random numbers unless told to use eager's; with the same
        # noise, the rest of the computation can be compared
        with torch._inductor.config.patch(fallback_random=True):
            results.append(([step(x)[0] for _ in range(4)], model.state_dict()))
    (plain, w_plain), (fast, w_fast) = results
    # float32 sums in another order: relative round-off ~1e-6 per op, grown over 4 Adam steps
    torch.testing.assert_close(torch.stack(fast), torch.stack(plain), rtol=1e-4, atol=1e-5)
    for k in w_plain:
        torch.testing.assert_close(w_fast[k], w_plain[k], rtol=1e-4, atol=5e-5)


def test_to_uint8_inverts_batches():
    x = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    (batch,) = data.Batches(x, 7, shuffle=False).epoch(0)
    np.testing.assert_array_equal(data.to_uint8(batch), x)


def test_heatmap_cells_and_scale(tmp_path):
    """Row r, column c of the matrix is the cell at HEAT_ORIGIN + (c * w, r * h), coloured from
    dark blue (0, an active latent) through teal (0.5) to yellow (1, inactive); the colour scale
    marks the threshold 0.8 in red at 80% of its height from the bottom."""
    train.save_heatmap(np.array([[0.0, 1.0], [0.5, 0.25]]), tmp_path / "h.png", "title",
                       cell=(3, 2))
    img = np.asarray(Image.open(tmp_path / "h.png").convert("RGB"))
    x0, y0 = train.HEAT_ORIGIN
    assert [tuple(img[y0 + y, x0 + x]) for y, x in ((0, 0), (0, 3), (2, 0), (3, 5))] == \
        [(20, 30, 90), (250, 230, 60), (40, 150, 140), (30, 90, 115)]
    bx, bh = x0 + 2 * 3 + 20, 100
    assert tuple(img[round(y0 + 0.2 * (bh - 1)), bx + 14]) == (255, 0, 0)


@pytest.mark.parametrize("n, ticks", [(1, [1]), (3, [1, 2, 3]), (10, list(range(1, 11))),
                                      (21, [1, 5, 10, 15, 20]), (700, [1, *range(100, 701, 100)])])
def test_epoch_ticks(n, ticks):
    assert train.epoch_ticks(n) == ticks


@pytest.mark.parametrize("lo, hi, ticks", [(0.08, 1.1, [0.1, 0.2, 0.5, 1]),
                                           (0.011, 0.9, [0.02, 0.05, 0.1, 0.2, 0.5]),
                                           (0.11, 0.19, [0.12, 0.14, 0.16, 0.18])])
def test_axis_ticks(lo, hi, ticks):
    """1, 2, 5 per decade; over less than a factor of ~5, evenly spaced round numbers."""
    assert train.axis_ticks(lo, hi) == pytest.approx(ticks)


def test_gamma_plot_spans_the_epochs(tmp_path):
    """Epoch 1 is at the left edge of the frame and epoch n at the right one."""
    train.save_curves({"gamma": [0.5, 0.3, 0.2]}, tmp_path / "g.png", "t", w=300, h=200, m=40)
    red = np.argwhere(np.all(np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
                             == (255, 0, 0), -1))
    # the frame runs from m = 40 to w - m / 2 = 280; each epoch's dot has a radius of 2
    assert (red[:, 1].min(), red[:, 1].max()) == (40 - 2, 280 + 2)


def test_training_flops_match_a_count_by_layer_shapes():
    """--bench's FLOPs: 2 * multiply-adds of every convolution and dense layer, found from the
    shapes each layer sees; backward costs twice the forward (gradients of input and weight),
    except the first convolution, whose input (the images) needs no gradient."""
    model = train.build(TINY_CFG, 1)
    x = torch.rand(10, 3, 16, 16)
    counts = []
    def count(m, inp, out):
        if isinstance(m, torch.nn.Linear):
            counts.append(2 * m.in_features * m.out_features * len(inp[0]))
        else:  # a transposed convolution works per input pixel, a convolution per output pixel
            pixels = (inp[0] if isinstance(m, torch.nn.ConvTranspose2d) else out)[0, 0].numel()
            k = m.kernel_size[0] * m.kernel_size[1]
            counts.append(2 * m.in_channels * m.out_channels * k * pixels * len(out))
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            m.register_forward_hook(count)
    flops = train.training_flops(model, x, 1.0)
    assert flops == 3 * sum(counts) - counts[0]


def test_bench_prints_rates_and_flops(capsys):
    """The printed figures agree with each other: images/s = batch / (ms/step), and the FLOPs per
    image are those of the configured network."""
    train.main([*TINY, "--bench", "--dataset", "folder"])
    out = capsys.readouterr().out
    ips, ms = map(float, re.search(r"([\d.]+) images/s\s+([\d.]+) ms/step", out).groups())
    assert ips == pytest.approx(10 / ms * 1000, rel=0.01)  # batch 10
    model = train.build(TINY_CFG, 1)
    flops = train.training_flops(model, torch.rand(10, 3, 16, 16), 0.25) / 10
    assert f"{flops / 1e9:.3f} GFLOP/image" in out
    assert "of this CPU's fp32 2048^3 matmul rate (not a peak)" in out and "speed-up" in out
