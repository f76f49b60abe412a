"""Train and evaluate the two-stage VAE with computed gamma (Asperti & Trentin 2020).

    python train.py --dataset cifar10 --stage 1     # stage-1 VAE, the paper's settings (4.1)
    python train.py --dataset cifar10 --stage 2     # stage-2 VAE on the stage-1 latents
    python train.py --dataset cifar10 --eval        # REC / GEN-1 / GEN-2 FID, mse, variance law

Every default is the paper's value for the dataset (section 4.1 CIFAR-10, 4.2 CelebA; the table in
REFERENCE.md). Outputs in --out: stage1.pt / stage2.pt (model, optimizer, config, epoch, gamma
state, RNG state), metrics.jsonl (one object per epoch, both stages), sample grids, and
latent_variance.png (paper Fig. 6-7) and gamma.png.

Deviations from the paper and the released code:
- Learning-rate schedule: the paper's halving periods (200/100 for CIFAR-10, 60/120 for CelebA);
  the released code's comments say 250/400.
- Data order: the permutation of epoch e is drawn from (seed, e) and the stage-2 noise likewise,
  so a resumed run repeats an uninterrupted one exactly on the CPU.
- Interrupted runs save mid-epoch (step, partial epoch statistics, RNG state) and resume there.
"""
import argparse
import itertools
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch

import data
import vae
from data import DataError

# Paper settings per dataset: (stage 1, stage 2) epochs, learning rate, halving period (4.1, 4.2).
PAPER = {"cifar10": dict(epochs=(700, 1400), lr=(1e-4, 1e-4), halve_every=(200, 100), l2=0.0, second_dim=2048),
         "celeba": dict(epochs=(70, 140), lr=(5e-5, 5e-5), halve_every=(60, 120), l2=1e-3, second_dim=4096)}


class Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # flags whose default depends on the dataset say so in their help
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Two-stage VAE with computed gamma (Asperti & Trentin 2020).", formatter_class=Help)
    a = p.add_argument
    a("--dataset", default="cifar10", choices=data.DATASETS, help="data set (folder: any image tree, see data.py)")
    a("--data-dir", default="data", help="where data sets and caches live (the image tree for --dataset folder)")
    a("--img-size", type=int, help="image side; default 32 for cifar10, 64 otherwise")
    a("--resize", default="bilinear", choices=sorted(data.RESIZE_MODES), help="PIL filter for celeba/folder (paper Fig. 3)")
    a("--stage", type=int, default=1, choices=(1, 2), help="1: the image VAE; 2: the VAE on stage-1 latents")
    a("--eval", action="store_true", help="evaluate stage1.pt (and stage2.pt) from --out instead of training")
    a("--bench", action="store_true", help="time training steps on synthetic data of the dataset's shape, then exit")
    a("--out", help="output folder; default runs/<dataset>")
    a("--resume", action="store_true", help="continue from the checkpoint of this stage in --out")
    a("--gamma", default="computed", choices=sorted(vae.GAMMAS), help="computed (the paper) or learned (Dai & Wipf)")
    a("--epochs", type=int, help="total epochs of this stage; default 700/1400 (cifar10), 70/140 (celeba)")
    a("--lr", type=float, help="initial Adam learning rate; default 1e-4 (cifar10), 5e-5 (celeba)")
    a("--halve-every", type=int, help="halve the lr every N epochs; default 200/100 (cifar10), 60/120 (celeba)")
    a("--batch-size", type=int, default=100, help="minibatch size (paper 4: 100)")
    a("--kl-weight", type=float, help="KL weight k; default pixels/1024 in stage 1 (paper 4.2), 1 in stage 2")
    a("--l2", type=float, help="l2 weight on down/up-sampling kernels; default 0 (cifar10), 0.001 (celeba)")
    a("--latent-dim", type=int, default=64, help="latent variables (paper 4.1: 64)")
    a("--base-dim", type=int, default=32, help="channels of the first scale")
    a("--fc-dim", type=int, default=512, help="width of the encoder's fc scale block")
    a("--num-scale", type=int, help="encoder scale blocks; default log2(side) - 2 (3 for 32x32, 4 for 64x64)")
    a("--block-per-scale", type=int, default=1, help="res blocks per scale block")
    a("--depth-per-block", type=int, default=2, help="conv layers per res block")
    a("--second-dim", type=int, help="stage-2 dense width; default 2048 for sides <= 32, else 4096")
    a("--second-depth", type=int, default=3, help="stage-2 dense layers")
    a("--limit", type=int, help="train on the first N training images only (quick CPU runs)")
    a("--seed", type=int, default=0, help="random seed")
    a("--device", help="torch device; default cuda if available, else cpu")
    a("--sample-every", type=int, default=50, help="write sample grids every N epochs (and after the last)")
    a("--amp", default="none", choices=("none", "bf16"), help="bf16 autocast of the networks (CUDA); loss and gamma stay fp32")
    a("--compile", action="store_true", help="torch.compile the networks")
    a("--n-eval", type=int, default=10000, help="test images (and samples) for --eval (paper: 10,000)")
    a("--no-fid", action="store_true", help="--eval without Inception: mse, variance law and inactive latents only")
    a("--inception", default="torchvision", choices=("torchvision", "tf"), help="FID weights; tf gives FIDs comparable with the paper")
    a("--inception-weights", help="local Inception weight file (offline machines)")
    a("--latent-norm", action="store_true", help="--eval: rescale two-stage latents to the variance law (paper 4.2)")
    args = p.parse_args(argv)
    args.img_size = args.img_size or data.default_img_size(args.dataset)
    side = args.img_size
    paper = PAPER["celeba" if args.dataset == "celeba" or (args.dataset == "folder" and side >= 64) else "cifar10"]
    s = args.stage - 1
    for key in ("epochs", "lr", "halve_every"):
        if getattr(args, key) is None:
            setattr(args, key, paper[key][s])
    args.l2 = paper["l2"] if args.l2 is None else args.l2
    args.kl_weight = args.kl_weight or (vae.kl_weight_for(side) if args.stage == 1 else 1.0)
    args.num_scale = args.num_scale or max(1, int(math.log2(side)) - 2)
    args.second_dim = args.second_dim or (2048 if side <= 32 else 4096)
    args.out = args.out or os.path.join("runs", args.dataset)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def build(cfg, stage):
    if stage == 1:
        return vae.VAE(cfg["img_size"], cfg["latent_dim"], cfg["base_dim"], cfg["fc_dim"], cfg["num_scale"],
                       cfg["block_per_scale"], cfg["depth_per_block"], cfg["gamma"])
    return vae.SecondStage(cfg["latent_dim"], cfg["second_dim"], cfg["second_depth"], cfg["gamma"])


def load_checkpoint(path, device):
    if not os.path.exists(path):
        raise DataError(f"no checkpoint at {path}: train stage 1 first (python train.py --stage 1 with the same --out).")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise DataError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is truncated or corrupt: "
                        "delete it and train again, or point --out at an intact run.") from None


def load_model(path, stage, device):
    ck = load_checkpoint(path, device)
    model = build(ck["config"], stage).to(device, memory_format=torch.channels_last)
    model.load_state_dict(ck["model"])
    return model.eval(), ck


def save_checkpoint(path, **state):
    data.atomic_write(path, lambda f: torch.save(state, f))


class Latents:
    """Stage-2 data (Dai & Wipf): the training set encoded once by the frozen stage-1 encoder;
    every epoch a fresh z = mu + sigma * eps, shuffled, in minibatches."""

    def __init__(self, mu, logsd, batch_size, seed):
        self.mu, self.sd, self.batch_size, self.seed = mu, logsd.exp(), batch_size, seed

    def __len__(self):
        return len(self.mu) // self.batch_size

    def epoch(self, e):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
        z = self.mu + self.sd * torch.randn(self.mu.shape, generator=g).to(self.mu.device)
        perm = torch.randperm(len(z), generator=g).to(z.device)
        return (z[perm[i * self.batch_size:(i + 1) * self.batch_size]] for i in range(len(self)))


@torch.no_grad()
def encode_all(model, batches):
    mu, logsd = zip(*(model.encode(x) for x in batches))
    return torch.cat(mu), torch.cat(logsd)


def make_step(model, opt, args):
    """One training step: forward (bf16 autocast if asked), eq. 7 + k * eq. 3 (+ l2) in fp32, Adam,
    then the gamma update (a no-op for learned gamma). Returns detached (loss, kl, mse, mu, logsd)
    without reading anything back to the host."""
    net = torch.compile(model) if args.compile else model
    amp = torch.autocast(args.device.type, torch.bfloat16, enabled=args.amp == "bf16")

    def step(x):
        with amp:
            out = net(x)
        loss, mse, kl = model.loss(x, out, args.kl_weight)
        if args.l2:
            loss = loss + args.l2 * model.l2_penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.gamma.update(mse.detach())
        return torch.stack([loss, kl, mse]).detach(), out[1].detach().float(), out[2].detach().float()
    return step


def make_optimizer(model, lr, device):
    # Adam with TF1's defaults (paper 4); the fused kernel on CUDA computes the same update.
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")


STOP = []  # signals received; the loop saves and exits after the step in progress


def train(args):
    torch.manual_seed(args.seed)
    out, stage = args.out, args.stage
    ckpt_path = os.path.join(out, f"stage{stage}.pt")
    cfg = {k: getattr(args, k) for k in ("dataset", "img_size", "resize", "gamma", "latent_dim", "base_dim", "fc_dim", "num_scale",
                                         "block_per_scale", "depth_per_block", "second_dim", "second_depth", "seed", "limit")}
    ck = None
    if args.resume:
        ck = load_checkpoint(ckpt_path, args.device)
        for k in ("dataset", "img_size", "resize", "limit"):
            if ck["config"][k] != cfg[k]:
                raise DataError(f"{ckpt_path} was trained with --{k.replace('_', '-')} {ck['config'][k]}, not {cfg[k]}: "
                                "resume with the same settings, or use another --out.")
        cfg = ck["config"]
    elif os.path.exists(ckpt_path):
        raise DataError(f"{ckpt_path} exists: pass --resume to continue it, or delete it / choose another --out to start over.")

    if stage == 1:
        images = data.load_split(args.dataset, "train", args.data_dir, args.img_size, args.resize)[:args.limit]
        batches = data.Batches(images, args.batch_size, args.device, seed=cfg["seed"])
        fixed = batches.x[:32].permute(0, 3, 1, 2).float().div(255)  # reconstruction grid
    else:
        m1, ck1 = load_model(os.path.join(out, "stage1.pt"), 1, args.device)
        cfg = {**ck1["config"], **{k: cfg[k] for k in ("gamma", "second_dim", "second_depth", "seed")}} if ck is None else cfg
        images = data.load_split(cfg["dataset"], "train", args.data_dir, cfg["img_size"], cfg["resize"])[:cfg["limit"]]
        plain = data.Batches(images, 500, args.device, shuffle=False, drop_last=False)
        batches = Latents(*encode_all(m1, plain.epoch(0)), args.batch_size, cfg["seed"])
    if len(batches) == 0:
        raise DataError(f"fewer training images ({len(images)}) than one batch of {args.batch_size}.")

    model = build(cfg, stage).to(args.device, memory_format=torch.channels_last)
    opt = make_optimizer(model, args.lr, args.device)
    start, skip, partial = 0, 0, None
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, skip, partial = ck["epoch"], ck["step"], ck["partial"]
        torch.set_rng_state(ck["rng"]["cpu"])
        if args.device.type == "cuda" and "cuda" in ck["rng"]:
            torch.cuda.set_rng_state(ck["rng"]["cuda"], args.device)
    history = rewrite_metrics(os.path.join(out, "metrics.jsonl"), stage, start)
    step = make_step(model, opt, args)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: STOP.append(signum))

    def checkpoint(epoch, step_in_epoch=0, partial=None):
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(args.device)} if args.device.type == "cuda" else {})}
        save_checkpoint(ckpt_path, config=cfg, model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch,
                        step=step_in_epoch, partial=partial, rng=rng)

    n = len(batches)
    for epoch in range(start, args.epochs):
        lr = args.lr * 0.5 ** (epoch // args.halve_every)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.time()
        model.train()
        # per-step figures and latent statistics stay on the device; read back once per epoch
        rec = torch.zeros(n, 3, device=args.device)
        mus, logsds = [], []
        if partial is not None:
            rec[:skip] = partial["rec"]
            mus, logsds = [partial["mu"]], [partial["logsd"]]
        for i, x in enumerate(itertools.islice(batches.epoch(epoch), skip, None), skip):
            rec[i], mu, logsd = step(x)
            mus.append(mu)
            logsds.append(logsd)
            if STOP and i + 1 < n:
                check_finite(rec[:i + 1], epoch, ckpt_path)
                checkpoint(epoch, i + 1, dict(rec=rec[:i + 1], mu=torch.cat(mus), logsd=torch.cat(logsds)))
                print(f"interrupted: saved {ckpt_path} at epoch {epoch + 1}, step {i + 1}/{n}; "
                      f"continue with the same command plus --resume", file=sys.stderr)
                sys.exit(128 + STOP[0])
        skip, partial = 0, None
        check_finite(rec, epoch, ckpt_path)
        var_law, e_var = vae.variance_law(torch.cat(mus), torch.cat(logsds))
        loss, kl, mse = rec.mean(0).tolist()
        seconds = time.time() - t0
        row = dict(stage=stage, epoch=epoch + 1, loss=loss, kl=kl, mse=mse, gamma=model.gamma().item(),
                   var_law=var_law.mean().item(), inactive=int((e_var >= 0.8).sum()), lr=lr, seconds=seconds,
                   images_per_s=n * args.batch_size / seconds, latent_var=[round(v, 5) for v in e_var.tolist()])
        checkpoint(epoch + 1)  # checkpoint first, then the metrics line (see rewrite_metrics)
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        history.append(row)
        print(f"stage {stage} epoch {epoch + 1}/{args.epochs}  loss {loss:.2f}  mse {mse:.5f}  kl {kl:.2f}  gamma {row['gamma']:.4f}  "
              f"var_law {row['var_law']:.3f}  inactive {row['inactive']}/{len(e_var)}  lr {lr:.2e}  "
              f"{row['images_per_s']:.0f} img/s  {seconds:.1f}s", flush=True)
        draw_latent_variance(history, os.path.join(out, f"latent_variance{'' if stage == 1 else '2'}.png"))
        draw_gamma(history, os.path.join(out, f"gamma{'' if stage == 1 else '2'}.png"))
        if (epoch + 1) % args.sample_every == 0 or epoch + 1 == args.epochs:
            model.eval()
            if stage == 1:
                write_samples(model, None, fixed, out, f"e{epoch + 1:04d}", cfg["seed"])
            else:
                write_samples(m1, model, None, out, f"stage2_e{epoch + 1:04d}", cfg["seed"])
        if STOP:
            print(f"interrupted: saved {ckpt_path} after epoch {epoch + 1}; continue with the same command plus --resume", file=sys.stderr)
            sys.exit(128 + STOP[0])


def check_finite(rec, epoch, ckpt_path):
    bad = (~torch.isfinite(rec[:, 0])).nonzero()
    if len(bad):
        raise DataError(f"non-finite loss at epoch {epoch + 1}, step {bad[0].item() + 1}; training stopped. The last good "
                        f"checkpoint {ckpt_path} is kept (if any); try a lower --lr or --amp none.")


def rewrite_metrics(path, stage, epoch):
    """Keep the metric lines that precede (stage, epoch) and return this stage's. The checkpoint is
    written before its metrics line, so a kill between the two leaves a line missing, never one
    extra; lines past the checkpoint (or of a stage being redone) are dropped, so none repeats."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    keep = [r for r in rows if r["stage"] < stage or (r["stage"] == stage and r["epoch"] <= epoch)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data.atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in keep).encode()))
    return [r for r in keep if r["stage"] == stage]


# ---------------------------------------------------------------------------------------------
# Sampling and pictures
# ---------------------------------------------------------------------------------------------
def to_uint8(x):
    """(N, 3, H, W) floats in [0, 1] -> (N, H, W, 3) uint8 on the host, as images are stored."""
    return (x.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def randn(g, *shape, device):
    return torch.randn(shape, generator=g).to(device)  # drawn on the CPU: the same numbers on any device


@torch.no_grad()
def reconstruct(m1, x, g):
    """Decode a sampled z = mu + sigma * eps with the networks in eval mode, as the released code's REC."""
    mu, logsd = m1.encode(x)
    return m1.decode(mu + logsd.exp() * randn(g, *mu.shape, device=x.device)), mu, logsd


@torch.no_grad()
def sample_latents(m1, m2, n, g, device):
    """GEN-1: z ~ N(0, I). GEN-2: u ~ N(0, I), z ~ N(f2(u), gamma_z^2 I), as Dai & Wipf's generate()."""
    z = randn(g, n, m1.mu.out_features, device=device)
    return z if m2 is None else m2.decode(z) + m2.gamma() * randn(g, *z.shape, device=device)


@torch.no_grad()
def decode_all(m1, z, batch=500):
    return np.concatenate([to_uint8(m1.decode(c)) for c in z.split(batch)])


def side_by_side(orig, recon, ncol=8):
    """Rows of originals alternating with rows of their reconstructions (whole rows only)."""
    n, shape = len(orig) // ncol * ncol, (-1, ncol, *orig.shape[1:])
    return np.stack([orig[:n].reshape(shape), recon[:n].reshape(shape)], 1).reshape(-1, *orig.shape[1:])


def write_samples(m1, m2, fixed, out, tag, seed):
    g = torch.Generator().manual_seed(seed)  # the same noise every time: grids change only with the model
    if fixed is not None:
        grid = side_by_side(to_uint8(fixed), to_uint8(reconstruct(m1, fixed, g)[0]))
        data.save_grid(grid, os.path.join(out, f"recon_{tag}.png"))
    dev = next(m1.parameters()).device
    data.save_grid(decode_all(m1, sample_latents(m1, m2, 64, g, dev)), os.path.join(out, f"samples_{tag}.png"))


def colormap(v):
    """Values in [0, 1] -> RGB uint8 from dark blue (active latent, 0) to yellow (inactive, 1)."""
    anchors = np.array([[20, 30, 90], [40, 150, 140], [250, 230, 60]], float)
    t = np.clip(v, 0, 1) * 2
    lo = np.minimum(t.astype(int), 1)
    return (anchors[lo] + (t - lo)[..., None] * (anchors[lo + 1] - anchors[lo])).astype(np.uint8)


def draw_latent_variance(history, path):
    """Fig. 6-7 as a heatmap: E_X[sigma^2] of each latent (rows) after each epoch (columns). Rows are
    ordered by the epoch at which the latent first left the limbo (E[sigma^2] < 0.8), so latents
    being put to work one by one show as a staircase."""
    from PIL import Image, ImageDraw
    v = np.array([r["latent_var"] for r in history]).T  # (latents, epochs)
    first = np.where(v < 0.8, np.arange(v.shape[1]), v.shape[1]).min(1)
    v = v[np.lexsort((v[:, -1], first))]
    cw, ch = max(1, 600 // v.shape[1]), 6
    heat = Image.fromarray(colormap(v)).resize((v.shape[1] * cw, v.shape[0] * ch), Image.NEAREST)
    img = Image.new("RGB", (max(heat.width, 420) + 20, heat.height + 40), "white")
    img.paste(heat, (10, 30))
    ImageDraw.Draw(img).text((10, 4), f"E[sigma^2] per latent (rows) over {v.shape[1]} epochs; blue 0 = active, "
                             f"yellow 1 = inactive", fill="black")
    data.atomic_write(path, lambda f: img.save(f, format="PNG"))


def draw_gamma(history, path, w=480, h=300, m=40):
    """gamma and sqrt(mse) per epoch on a log scale: with computed gamma they coincide (eq. 8's
    minimum gamma^2 = mse), i.e. a constant balance between eq. 7 and the KL (eq. 9)."""
    from PIL import Image, ImageDraw
    series = {"gamma": [r["gamma"] for r in history], "sqrt(mse)": [math.sqrt(r["mse"]) for r in history]}
    logs = np.log10([v for s in series.values() for v in s])
    lo, hi = logs.min() - 0.05, logs.max() + 0.05
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m // 2, w - m // 2, h - m], outline="black")
    for k in range(math.floor(lo * 4), math.ceil(hi * 4) + 1):  # gridlines every quarter decade
        y = h - m - (k / 4 - lo) / (hi - lo) * (h - 1.5 * m)
        if m // 2 < y < h - m:
            d.line([m, y, w - m // 2, y], fill=(220, 220, 220))
            d.text((2, y - 5), f"{10 ** (k / 4):.3f}", fill="black")
    for (name, s), color, ty in zip(series.items(), ("red", "blue"), (m // 2 + 4, m // 2 + 16)):
        xs = [m + (i + 1) / len(s) * (w - 1.5 * m) for i in range(len(s))]
        ys = [h - m - (math.log10(v) - lo) / (hi - lo) * (h - 1.5 * m) for v in s]
        d.line(list(zip(xs, ys)) if len(s) > 1 else [xs[0] - 1, ys[0], xs[0], ys[0]], fill=color, width=2)
        d.text((w - 120, ty), name, fill=color)
    d.text((m, h - m + 8), f"epoch 1 .. {len(history)}", fill="black")
    data.atomic_write(path, lambda f: img.save(f, format="PNG"))


# ---------------------------------------------------------------------------------------------
# Evaluation (paper section 4: REC, GEN-1, GEN-2 FID on 10,000 test images, mse, eq. 6, footnote 3)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(args):
    dev = args.device
    m1, ck = load_model(os.path.join(args.out, "stage1.pt"), 1, dev)
    p2 = os.path.join(args.out, "stage2.pt")
    m2, ck2 = load_model(p2, 2, dev) if os.path.exists(p2) else (None, None)
    cfg = ck["config"]
    test = data.load_split(cfg["dataset"], "test", args.data_dir, cfg["img_size"], cfg["resize"])[:args.n_eval]
    g = torch.Generator().manual_seed(cfg["seed"])
    recon, mus, logsds, sse = [], [], [], 0.0
    for x in data.Batches(test, 500, dev, shuffle=False, drop_last=False).epoch(0):
        r, mu, logsd = reconstruct(m1, x, g)
        sse += (x - r).square().sum().item()
        recon.append(to_uint8(r)), mus.append(mu), logsds.append(logsd)
    recon = np.concatenate(recon)
    var_law, e_var = vae.variance_law(torch.cat(mus), torch.cat(logsds))
    gen1 = decode_all(m1, sample_latents(m1, None, len(test), g, dev))
    gen2 = None
    if m2 is not None:
        z = sample_latents(m1, m2, len(test), g, dev)
        if args.latent_norm:  # paper 4.2: average per-latent std of generated z := sqrt(variance law)
            z = z * (var_law.mean().sqrt().float() / z.std(0).mean())
        gen2 = decode_all(m1, z)
    res = dict(rec_fid=None, gen1_fid=None, gen2_fid=None, mse=sse / test[:len(recon)].size,
               var_law=var_law.mean().item(), inactive=int((e_var >= 0.8).sum()), n=len(test),
               inception=None if args.no_fid else args.inception, latent_norm=args.latent_norm,
               epochs=ck["epoch"], epochs2=ck2["epoch"] if ck2 else None)
    if not args.no_fid:
        import fid
        net = fid.load_inception(args.inception, args.inception_weights, dev)
        key = f"{cfg['dataset']}_test_{cfg['img_size']}_{cfg['resize']}_{len(test)}_{fid.weights_tag(args.inception, args.inception_weights)}"
        real = fid.cached_stats(os.path.join(args.data_dir, "fid_stats", key + ".npz"),
                                lambda: fid.feature_stats(net, test, desc="FID real"))
        for name, imgs in (("rec_fid", recon), ("gen1_fid", gen1), ("gen2_fid", gen2)):
            if imgs is not None:
                res[name] = fid.frechet_distance(*real, *fid.feature_stats(net, imgs, desc=f"FID {name[:-4]}"))
    for name, imgs in (("recon", side_by_side(test[:32], recon[:32])), ("gen1", gen1), ("gen2", gen2)):
        if imgs is not None:
            data.save_grid(imgs[:64], os.path.join(args.out, f"eval_{name}.png"))
    data.atomic_write(os.path.join(args.out, "eval.json"), lambda f: f.write(json.dumps(res, indent=1).encode()))
    f = lambda v: "-" if v is None else f"{v:.1f}"
    print(f"{'epochs':>8} {'REC':>6} {'GEN-1':>6} {'GEN-2':>6} {'mse':>7} {'var.law':>8} {'inactive':>9}   (n={len(test)}, "
          f"FID: {res['inception'] or 'skipped'}{', latent norm' if args.latent_norm else ''})")
    print(f"{res['epochs']:>8} {f(res['rec_fid']):>6} {f(res['gen1_fid']):>6} {f(res['gen2_fid']):>6} "
          f"{res['mse']:7.4f} {res['var_law']:8.3f} {res['inactive']:>6}/{len(e_var)}")
    return res


# ---------------------------------------------------------------------------------------------
# --bench: training speed on synthetic data of the dataset's shape (no download)
# ---------------------------------------------------------------------------------------------
PEAKS = {"H100": (989e12, 67e12), "H200": (989e12, 67e12), "A100": (312e12, 19.5e12)}  # dense bf16, fp32


def bench(args, warmup=3, steps=10):
    from torch.utils.flop_counter import FlopCounterMode
    dev, cfg = args.device, vars(args)
    model = build(cfg, args.stage).to(dev, memory_format=torch.channels_last)
    opt = make_optimizer(model, args.lr, dev)
    shape = (args.batch_size, 3, args.img_size, args.img_size) if args.stage == 1 else (args.batch_size, args.latent_dim)
    x = torch.rand(shape, device=dev)
    x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    step = make_step(model, opt, args)
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    for _ in range(warmup):
        step(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x)
    sync()
    dt = (time.perf_counter() - t0) / steps
    with FlopCounterMode(display=False) as counter:  # forward + backward of one step, uncompiled
        model.loss(x, model(x), args.kl_weight)[0].backward()
    flops = counter.get_total_flops() / args.batch_size
    if dev.type == "cpu":  # reference peak: best of 5 float32 2048x2048 matrix multiplications
        a = torch.randn(2048, 2048)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t)
        peak, peak_name = 2 * 2048 ** 3 / min(times), "measured fp32 2048^3 matmul"
    else:
        name = torch.cuda.get_device_name(dev)
        peaks = next((v for k, v in PEAKS.items() if k in name), None)
        peak = peaks and peaks[0 if args.amp == "bf16" else 1]
        peak_name = f"{name} dense {'bf16' if args.amp == 'bf16' else 'fp32'} peak"
    achieved = flops * args.batch_size / dt
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"stage {args.stage}, {args.dataset} {args.img_size}x{args.img_size}, batch {args.batch_size}, amp {args.amp}, "
          f"compile {args.compile}")
    print(f"{args.batch_size / dt:.1f} images/s  {dt * 1e3:.1f} ms/step  {flops / 1e9:.3f} GFLOP/image (training)  "
          f"{achieved / 1e12:.3f} TFLOP/s" + (f"  = {achieved / peak:.0%} of {peak_name} ({peak / 1e12:.2f} TFLOP/s)" if peak else ""))


def main(argv=None):
    args = parse_args(argv)
    try:
        evaluate(args) if args.eval else bench(args) if args.bench else train(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
