"""Train and evaluate the two-stage VAE with computed gamma (Asperti & Trentin 2020).

    python train.py --dataset cifar10 --stage 1     # stage-1 VAE, the paper's settings (4.1)
    python train.py --dataset cifar10 --stage 2     # stage-2 VAE on the stage-1 latents
    python train.py --dataset cifar10 --eval        # REC / GEN-1 / GEN-2 FID, mse, variance law

Every default is the paper's value for the dataset (section 4.1 CIFAR-10, 4.2 CelebA, and the authors'
released code). Outputs in --out: stage1.pt / stage2.pt (model, optimizer, config, epoch, gamma
state, RNG state, metric rows), metrics.jsonl (one object per epoch, both stages), sample grids, and
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
PAPER = {"cifar10": dict(epochs=(700, 1400), lr=(1e-4, 1e-4), halve_every=(200, 100), l2=0.0),
         "celeba": dict(epochs=(70, 140), lr=(5e-5, 5e-5), halve_every=(60, 120), l2=1e-3)}


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
    a("--amp", default="none", choices=("none", "bf16"), help="bf16 autocast of the networks (GPUs, AMX CPUs); loss and gamma stay fp32")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the networks (with CUDA graphs on "
      "CUDA); default on for stage 1 on CUDA, where it was measured, else off")
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
    args.kl_weight = (vae.kl_weight_for(side) if args.stage == 1 else 1.0) if args.kl_weight is None else args.kl_weight
    args.num_scale = args.num_scale or max(1, int(math.log2(side)) - 2)
    args.second_dim = args.second_dim or (2048 if side <= 32 else 4096)
    args.out = args.out or os.path.join("runs", args.dataset)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # measured on an H200 for stage 1: 3x the images/s at batch 100, mse and gamma within run-to-run noise (README)
    args.compile = args.device.type == "cuda" and args.stage == 1 if args.compile is None else args.compile
    return args


def build(cfg, stage):
    if stage == 1:
        return vae.VAE(cfg["img_size"], cfg["latent_dim"], cfg["base_dim"], cfg["fc_dim"], cfg["num_scale"],
                       cfg["block_per_scale"], cfg["depth_per_block"], cfg["gamma"])
    return vae.SecondStage(cfg["latent_dim"], cfg["second_dim"], cfg["second_depth"], cfg["gamma"])


def load_checkpoint(path, device):
    if not os.path.exists(path):
        stage = "2" if path.endswith("stage2.pt") else "1"
        raise DataError(f"no checkpoint at {path}: train stage {stage} first (python train.py --stage {stage} with "
                        "the same --out and data options).")
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


class Latents:
    """Stage-2 data (Dai & Wipf): the training set encoded once by the frozen stage-1 encoder;
    every epoch a fresh z = mu + sigma * eps, shuffled, in minibatches."""

    def __init__(self, mu, logsd, batch_size, seed):
        self.mu, self.sd, self.batch_size, self.seed = mu, logsd.exp(), batch_size, seed

    def __len__(self):
        return len(self.mu) // self.batch_size

    def epoch(self, e):
        g = data.epoch_generator(self.seed, e)
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
    # On CUDA a batch of 100 small images is bound by kernel launches, not arithmetic: CUDA graphs
    # ("reduce-overhead") replay the compiled forward and backward with one launch each.
    cuda = args.device.type == "cuda"
    net = torch.compile(model, mode="reduce-overhead" if cuda else None) if args.compile else model
    amp = torch.autocast(args.device.type, torch.bfloat16, enabled=args.amp == "bf16")

    def step(x):
        if args.compile and cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be reused
        with amp:
            out = net(x)
        loss, mse, kl = model.loss(x, out, args.kl_weight)
        if args.l2:
            loss = loss + args.l2 * model.l2_penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.gamma.update(mse.detach())
        # copies: a CUDA graph's outputs are overwritten by its next replay
        return torch.stack([loss, kl, mse]).detach(), out[1].detach().float().clone(), out[2].detach().float().clone()
    return step


def make_optimizer(model, lr, device):
    # Adam with TF1's defaults (paper 4); the fused kernel on CUDA computes the same update.
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")


STOP = []  # signals received; the loop saves and exits after the step in progress


def train(args):
    torch.manual_seed(args.seed)
    out, stage, dev = args.out, args.stage, args.device
    path = os.path.join(out, f"stage{stage}.pt")
    cfg = {k: getattr(args, k) for k in ("dataset", "img_size", "resize", "limit", "gamma", "latent_dim", "base_dim", "fc_dim",
                                         "num_scale", "block_per_scale", "depth_per_block", "second_dim", "second_depth", "seed")}
    ck = None
    if args.resume:  # the model is rebuilt from the config stored in the checkpoint
        ck = load_checkpoint(path, dev)
        for k in ("dataset", "img_size", "resize", "limit"):
            if ck["config"][k] != cfg[k]:
                raise DataError(f"{path} was trained with --{k.replace('_', '-')} {ck['config'][k]}, not {cfg[k]}: "
                                "resume with the same settings, or use another --out.")
        cfg = ck["config"]
    elif os.path.exists(path):
        raise DataError(f"{path} exists: pass --resume to continue it, or delete it / choose another --out to start over.")
    m1, fixed = None, None
    if stage == 2:  # the stage-1 model, frozen; its settings (architecture, data) are the ones to use
        m1, ck1 = load_model(os.path.join(out, "stage1.pt"), 1, dev)
        cfg = {**ck1["config"], **{k: cfg[k] for k in ("gamma", "second_dim", "second_depth", "seed")}} if ck is None else cfg
    images = data.load_split(cfg["dataset"], "train", args.data_dir, cfg["img_size"], cfg["resize"])[:cfg["limit"]]
    if stage == 1:
        batches = data.Batches(images, args.batch_size, dev, seed=cfg["seed"])
        fixed = batches.x[:32].permute(0, 3, 1, 2).float().div(255)  # for the reconstruction grids
    else:
        plain = data.Batches(images, 500, dev, shuffle=False, drop_last=False).epoch(0)
        batches = Latents(*encode_all(m1, plain), args.batch_size, cfg["seed"])
        if len(batches) == 0:
            raise DataError(f"{len(images)} training images do not make one batch of {args.batch_size}.")

    model = build(cfg, stage).to(dev, memory_format=torch.channels_last)
    opt = make_optimizer(model, args.lr, dev)
    start, skip, partial = 0, 0, None
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, skip, partial = ck["epoch"], ck["step"], ck["partial"]
        torch.set_rng_state(ck["rng"]["cpu"])
        if dev.type == "cuda" and "cuda" in ck["rng"]:
            torch.cuda.set_rng_state(ck["rng"]["cuda"], dev)
    history = ck["history"] if ck else []
    rewrite_metrics(os.path.join(out, "metrics.jsonl"), stage, history)
    step = make_step(model, opt, args)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: STOP.append(signum))

    def checkpoint(epoch, step_in_epoch=0, partial=None):
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(dev)} if dev.type == "cuda" else {})}
        state = dict(config=cfg, model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch, step=step_in_epoch,
                     partial=partial, rng=rng, history=history)
        data.atomic_write(path, lambda f: torch.save(state, f))  # a kill at any moment leaves the last complete one

    def interrupted(where):
        print(f"interrupted: saved {path} {where}; continue with the same command plus --resume", file=sys.stderr)
        sys.exit(128 + STOP[0])

    n = len(batches)
    if start >= args.epochs:
        print(f"{path} has already trained {start} epochs; pass a larger --epochs to train more", file=sys.stderr)
    for epoch in range(start, args.epochs):
        lr = args.lr * 0.5 ** (epoch // args.halve_every)  # halved every --halve-every epochs (paper 4.1)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.time()
        model.train()
        # per-step figures and encodings stay on the device and are read back once per epoch
        rec = torch.zeros(n, 3, device=dev)
        mus, logsds = [], []
        if partial is not None:  # resuming mid-epoch: the steps already done
            rec[:skip], mus, logsds = partial["rec"], [partial["mu"]], [partial["logsd"]]
        for i, x in enumerate(itertools.islice(batches.epoch(epoch), skip, None), skip):
            rec[i], mu, logsd = step(x)
            mus.append(mu)
            logsds.append(logsd)
            if STOP and i + 1 < n:
                check_finite(rec[:i + 1], epoch, path)
                checkpoint(epoch, i + 1, dict(rec=rec[:i + 1], mu=torch.cat(mus), logsd=torch.cat(logsds)))
                interrupted(f"at epoch {epoch + 1}, step {i + 1}/{n}")
        skip, partial = 0, None
        check_finite(rec, epoch, path)
        var_law, e_var = vae.variance_law(torch.cat(mus), torch.cat(logsds))  # over the epoch's training encodings
        loss, kl, mse = rec.mean(0).tolist()
        seconds = time.time() - t0
        row = dict(stage=stage, epoch=epoch + 1, loss=loss, kl=kl, mse=mse, gamma=model.gamma().item(),
                   var_law=var_law.mean().item(), inactive=int((e_var >= 0.8).sum()), lr=lr, seconds=seconds,
                   images_per_s=n * args.batch_size / seconds, latent_var=[round(v, 5) for v in e_var.tolist()])
        history.append(row)
        checkpoint(epoch + 1)  # first the checkpoint, which holds the row too, then the metrics line
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"stage {stage} epoch {epoch + 1}/{args.epochs}  loss {loss:.2f}  mse {mse:.5f}  kl {kl:.2f}  "
              f"gamma {row['gamma']:.4f}  var_law {row['var_law']:.3f}  inactive {row['inactive']}/{len(e_var)}  "
              f"lr {lr:.2e}  {row['images_per_s']:.0f} img/s  {seconds:.1f}s", flush=True)
        model.eval()
        write_pictures(history, m1 or model, model if m1 else None, fixed, out, f"{'stage2_' if m1 else ''}e{epoch + 1:04d}",
                       cfg["seed"], (epoch + 1) % args.sample_every == 0 or epoch + 1 == args.epochs)
        if STOP:
            interrupted(f"after epoch {epoch + 1}")


def check_finite(rec, epoch, ckpt_path):
    bad = (~torch.isfinite(rec[:, 0])).nonzero()
    if len(bad):
        raise DataError(f"non-finite loss at epoch {epoch + 1}, step {bad[0].item() + 1}; training stopped. The last good "
                        f"checkpoint {ckpt_path} is kept (if any); try a lower --lr or --amp none.")


def rewrite_metrics(path, stage, history):
    """metrics.jsonl := the lines of earlier stages + this stage's history from the checkpoint. The
    checkpoint is written before each line is appended, so a kill between the two, or a line past
    the checkpoint, can leave neither a gap nor a duplicate after a resume."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [r for r in map(json.loads, filter(str.strip, f)) if r["stage"] < stage]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data.atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows + history).encode()))


# --- Sampling and pictures ---
@torch.no_grad()
def decode_all(m1, z, batch=500):
    return np.concatenate([data.to_uint8(m1.decode(c)) for c in z.split(batch)])


def side_by_side(orig, recon, ncol=8):
    """Rows of originals alternating with rows of their reconstructions (whole rows only)."""
    n, shape = len(orig) // ncol * ncol, (-1, ncol, *orig.shape[1:])
    return np.stack([orig[:n].reshape(shape), recon[:n].reshape(shape)], 1).reshape(-1, *orig.shape[1:])


def write_pictures(history, m1, m2, fixed, out, tag, seed, grids):
    """Every epoch: the latent-variance heatmap (Fig. 6-7) and gamma vs sqrt(mse); every few epochs
    the sample grids, drawn with the same noise each time so they change only with the model."""
    s = "" if m2 is None else "2"
    v = np.array([r["latent_var"] for r in history]).T  # (latents, epochs)
    first = np.where(v < 0.8, np.arange(v.shape[1]), v.shape[1]).min(1)  # epoch it left the limbo
    data.save_heatmap(v[np.lexsort((v[:, -1], first))], os.path.join(out, f"latent_variance{s}.png"),
                      f"E[sigma^2] per latent (rows, by epoch of activation) over {v.shape[1]} epochs: "
                      "blue 0 active, yellow 1 inactive", cell=(max(1, 600 // v.shape[1]), 6))
    # with computed gamma the two coincide: eq. 8's minimum gamma^2 = mse, a constant balance (eq. 9)
    data.save_curves({"gamma": [r["gamma"] for r in history], "sqrt(mse)": [math.sqrt(r["mse"]) for r in history]},
                     os.path.join(out, f"gamma{s}.png"), f"stage {1 if m2 is None else 2}: gamma and sqrt(mse) per epoch")
    if not grids:
        return
    g, dev = torch.Generator().manual_seed(seed), fixed.device if fixed is not None else next(m1.parameters()).device
    if fixed is not None:
        recon = data.to_uint8(vae.reconstruct(m1, fixed, g)[0])
        data.save_grid(side_by_side(data.to_uint8(fixed), recon), os.path.join(out, f"recon_{tag}.png"))
    data.save_grid(decode_all(m1, vae.sample_latents(m1, m2, 64, g, dev)), os.path.join(out, f"samples_{tag}.png"))


# --- Evaluation (paper section 4: REC, GEN-1, GEN-2 FID on 10,000 test images, mse, eq. 6, footnote 3) ---
@torch.no_grad()
def evaluate(args):
    dev = args.device
    m1, ck = load_model(os.path.join(args.out, "stage1.pt"), 1, dev)
    p2 = os.path.join(args.out, "stage2.pt")
    m2, ck2 = load_model(p2, 2, dev) if os.path.exists(p2) else (None, None)
    cfg = ck["config"]
    split = data.load_split(cfg["dataset"], "test", args.data_dir, cfg["img_size"], cfg["resize"])
    test = split[:args.n_eval]
    g = torch.Generator().manual_seed(cfg["seed"])
    recon, mus, logsds, sse = [], [], [], 0
    for x in data.Batches(test, 500, dev, shuffle=False, drop_last=False).epoch(0):
        r, mu, logsd = vae.reconstruct(m1, x, g)
        sse = sse + (x - r).square().sum()  # on the device; read once below
        recon.append(data.to_uint8(r)), mus.append(mu), logsds.append(logsd)
    recon = np.concatenate(recon)
    var_law, e_var = vae.variance_law(torch.cat(mus), torch.cat(logsds))
    gen1 = decode_all(m1, vae.sample_latents(m1, None, len(test), g, dev))
    gen2 = None
    if m2 is not None:
        z = vae.sample_latents(m1, m2, len(test), g, dev)
        if args.latent_norm:  # paper 4.2: average per-latent std of generated z := sqrt(variance law)
            z = z * (var_law.mean().sqrt().float() / z.std(0).mean())
        gen2 = decode_all(m1, z)
    res = dict(rec_fid=None, gen1_fid=None, gen2_fid=None, mse=sse.item() / test[:len(recon)].size,
               var_law=var_law.mean().item(), inactive=int((e_var >= 0.8).sum()), n=len(test),
               inception=None if args.no_fid else args.inception, latent_norm=args.latent_norm,
               epochs=ck["epoch"], epochs2=ck2["epoch"] if ck2 else None)
    if not args.no_fid:
        import fid
        net = fid.load_inception(args.inception, args.inception_weights, dev)
        weights = os.path.basename(args.inception_weights) if args.inception_weights else args.inception
        key = fid.stats_cache_name(cfg["dataset"], f"test-{cfg['resize']}", cfg["img_size"], len(test), weights)
        # cached beside the split's own cache (never inside a user's image folder)
        real = fid.cached_stats(os.path.join(os.path.dirname(split.filename), key), lambda: fid.feature_stats(net, test, desc="FID real"))
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


# --- --bench: training speed on synthetic data of the dataset's shape (no download) ---
PEAKS = {"H100": (989e12, 67e12), "H200": (989e12, 67e12), "A100": (312e12, 19.5e12)}  # dense bf16, fp32


def training_flops(model, x, kl_weight):
    """FLOPs of one training step's forward and backward, as torch.utils.flop_counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        model.loss(x, model(x), kl_weight)[0].backward()
    return counter.get_total_flops()


def bench(args, warmup=3, steps=10):
    """Time the training step as configured and, side by side, a plain fp32 step of the same network
    (NCHW memory, no autocast, no compile); count its FLOPs; compare with a reference peak."""
    dev = args.device
    shape = (args.batch_size, 3, args.img_size, args.img_size) if args.stage == 1 else (args.batch_size, args.latent_dim)
    x = torch.rand(shape, device=dev)

    def seconds_per_step(fmt, a):
        model = build(vars(args), args.stage).to(dev, memory_format=fmt)
        step = make_step(model, make_optimizer(model, args.lr, dev), a)
        xf = x.contiguous(memory_format=fmt) if x.dim() == 4 else x
        data.seconds_per_call(lambda: step(xf), warmup, dev)
        return data.seconds_per_call(lambda: step(xf), steps, dev), model
    plain, _ = seconds_per_step(torch.contiguous_format, argparse.Namespace(**{**vars(args), "amp": "none", "compile": False}))
    dt, model = seconds_per_step(torch.channels_last, args)
    flops = training_flops(model, x, args.kl_weight) / args.batch_size
    if dev.type == "cpu":  # reference peak: the best of 5 float32 2048x2048 matrix multiplications
        a = torch.randn(2048, 2048)
        peak, peak_name = 2 * 2048 ** 3 / min(data.seconds_per_call(lambda: a @ a, 1) for _ in range(5)), "measured fp32 2048^3 matmul"
    else:
        name = torch.cuda.get_device_name(dev)
        peak = next((v[args.amp != "bf16"] for k, v in PEAKS.items() if k in name), None)
        peak_name = f"{name} dense {'bf16' if args.amp == 'bf16' else 'fp32'} peak"
    achieved = flops * args.batch_size / dt
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"stage {args.stage}, {args.dataset} {args.img_size}x{args.img_size}, batch {args.batch_size}, amp {args.amp}, "
          f"compile {args.compile}")
    print(f"{args.batch_size / dt:.1f} images/s  {dt * 1e3:.1f} ms/step  {flops / 1e9:.3f} GFLOP/image (training)  "
          f"{achieved / 1e12:.3f} TFLOP/s" + (f"  = {achieved / peak:.0%} of {peak_name} ({peak / 1e12:.2f} TFLOP/s)" if peak else ""))
    print(f"plain fp32 NCHW step: {args.batch_size / plain:.1f} images/s  {plain * 1e3:.1f} ms/step  -> speed-up {plain / dt:.2f}x")


def main(argv=None):
    args = parse_args(argv)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        evaluate(args) if args.eval else bench(args) if args.bench else train(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:  # train() catches SIGINT/SIGTERM; give them back (processes forked later must die by them)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
