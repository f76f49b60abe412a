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
