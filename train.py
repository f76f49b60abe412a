"""Train and evaluate the two-stage VAE with computed gamma (Asperti & Trentin 2020).

    python train.py --dataset cifar10 --stage 1   # stage-1 VAE, the paper's settings (4.1)
    python train.py --dataset cifar10 --stage 2   # stage-2 VAE on the stage-1 latents
    python train.py --dataset cifar10 --eval      # REC / GEN-1 / GEN-2 FID, mse, variance law

Every default is the paper's value for the dataset (4.1 CIFAR-10, 4.2 CelebA; where the paper
is silent, the authors' released code). --out receives stage1.pt / stage2.pt (model, optimizer,
config, epoch, RNG state, metric rows), metrics.jsonl, sample grids, latent_variance.png (Fig.
6-7) and gamma.png. A checkpoint records its data and settings; --resume, stage 2 and --eval
take them from it and refuse a flag or data that contradicts them.

Deviations from the paper and the released code:
- Epoch e's order and stage-2 noise are drawn from (seed, e), so a resumed run repeats an
  uninterrupted one exactly on the CPU. Checkpoints are written after each epoch; an
  interruption loses the epoch in progress.
- The per-epoch sample grids run batch norm on batch statistics; --eval uses the moving
  averages, as the paper's evaluation does. After a short run the two differ (README).
- CelebA l2: the paper (4.2) adds 0.001 * sum(w^2) over the resampling kernels to the loss; the
  released code defines that regulariser but never adds it. We follow the paper.
- Evaluation: the paper's protocol only. The released adjust=True also rescales the
  reconstructions' pixel std to the test set's (REC FID and mse), GEN-1 latents by sqrt(variance
  law) when its variance-loss ratio exceeds 0.25, and GEN-2 latents per batch of 100; none of
  that is done here (--latent-norm is the paper's GEN-2 normalisation, over all samples).
"""
import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import vae
from data import DataError

# (stage 1, stage 2). CIFAR-10 (4.1): 700 epochs at 1e-4 halved every 200; stage 2 1400 epochs
# halved every 100. CelebA: 5e-5 and 70 epochs (4.2; its Table 3 runs: 1e-4 halved every 48);
# the halving every 60 / 120 and the 140 stage-2 epochs come from the released code's comments.
PAPER = {"cifar10": dict(epochs=(700, 1400), lr=(1e-4, 1e-4), halve_every=(200, 100)),
         "celeba": dict(epochs=(70, 140), lr=(5e-5, 5e-5), halve_every=(60, 120))}
DATA = ("dataset", "img_size", "resize", "jpeg", "limit", "seed")
ARCH1 = ("latent_dim", "base_dim", "fc_dim", "num_scale", "block_per_scale", "depth_per_block")
ARCH2 = ("second_dim", "second_depth")
TRAINING = ("gamma", "lr", "halve_every", "batch_size", "kl_weight", "l2")


def paper_defaults(dataset, side, stage):
    """Every setting of a stage as the paper (or, where silent, the released code) has it."""
    paper, s = PAPER["celeba" if dataset == "celeba" or side >= 64 else "cifar10"], stage - 1
    return dict(
        resize="bilinear", jpeg=None, limit=None, seed=0, gamma="computed", batch_size=100,
        epochs=paper["epochs"][s], lr=paper["lr"][s], halve_every=paper["halve_every"][s],
        kl_weight=vae.kl_weight_for(side) if stage == 1 else 1.0,  # k = pixels/1024 (4.2)
        l2=1e-3 if stage == 1 and side >= 64 else 0.0,  # on the resampling kernels (4.2)
        latent_dim=64, base_dim=32, fc_dim=512, num_scale=max(1, int(math.log2(side)) - 2),
        block_per_scale=1, depth_per_block=2, second_dim=2048 if side <= 32 else 4096,
        second_depth=3)


# --- Training (paper section 4): stage 1 on images, stage 2 on stage-1 latents --------------------
def make_step(model, opt, cfg, args):
    """One training step: forward (bf16 autocast if asked), eq. 7 + k * eq. 3 (+ l2) in fp32,
    Adam, then the gamma update. Returns detached (loss, kl, mse), mu and log sigma, without
    reading anything back to the host."""
    # On CUDA a batch of 100 small images is bound by kernel launches, not arithmetic: CUDA
    # graphs ("reduce-overhead") replay the compiled forward and backward with one launch each.
    cuda = args.device.type == "cuda"
    net = torch.compile(model, mode="reduce-overhead" if cuda else None) if args.compile else model
    amp = torch.autocast(args.device.type, torch.bfloat16, enabled=args.amp == "bf16")

    def step(x):
        if args.compile and cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are reused
        with amp:
            out = net(x)
        loss, mse, kl = model.loss(x, out, cfg["kl_weight"])  # at the current gamma
        if cfg["l2"]:
            loss = loss + cfg["l2"] * model.l2_penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.gamma.update(mse.detach())  # after the step: the next batch sees the new gamma
        # copies: a CUDA graph's outputs are overwritten by its next replay
        return (torch.stack([loss, kl, mse]).detach(), out[1].detach().float().clone(),
                out[2].detach().float().clone())
    return step


def make_optimizer(model, lr, device):
    # Adam with TF1's defaults (paper 4); the fused kernel on CUDA computes the same update.
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                            fused=device.type == "cuda")


def lr_at(cfg, epoch):
    """The initial lr halved every halve_every epochs (paper 4.1): epochs 0..h-1 at lr."""
    return cfg["lr"] * 0.5 ** (epoch // cfg["halve_every"])


def train(args):
    stage, dev = args.stage, args.device
    path, cfg, ck, m1 = prepare(args)
    torch.manual_seed(cfg["seed"])
    model = build(cfg, stage).to(dev, memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg["lr"], dev)
    start, history = restore(ck, model, opt)
    split = data.load_split(cfg["dataset"], "train", args.data_dir, cfg["img_size"],
                            cfg["resize"], jpeg=cfg["jpeg"])
    images, fixed = data.subset(split, cfg["limit"], cfg["seed"]), None
    if stage == 1:
        batches = data.Batches(images, cfg["batch_size"], dev, seed=cfg["seed"])
        # the recon grids' 32 images, spread over the split (a folder sorted by class)
        spread = torch.linspace(0, len(images) - 1, 32, device=dev).long()
        fixed = batches.x[spread].permute(0, 3, 1, 2).float().div(255)
    else:
        batches = Latents(*encode_all(m1, images, dev), cfg["batch_size"], cfg["seed"])
    print_start(args, cfg, model, len(images), len(split), start)
    step = make_step(model, opt, cfg, args)
    m1, m2 = (m1, model) if stage == 2 else (model, None)  # the pictures' decoder and stage 2
    for epoch in range(start, args.epochs):
        lr = lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.time()
        model.train()
        rec, mus, logsds = [], [], []  # kept on the device, read back once per epoch
        todo = len(batches) * cfg["batch_size"]
        for x in data.progress(batches.epoch(epoch), todo, f"stage {stage} epoch {epoch + 1}/"
                               f"{args.epochs}", leave=False):
            r, mu, logsd = step(x)  # eq. 7 + k * eq. 3, Adam, then the gamma update
            rec.append(r), mus.append(mu), logsds.append(logsd)
        loss, kl, mse = torch.stack(rec).mean(0).tolist()
        if not math.isfinite(loss):
            raise DataError(f"non-finite loss in epoch {epoch + 1}; training stopped and {path} "
                            "keeps the last finished epoch (if any): try a lower --lr or --amp "
                            "none.")
        stats, e_var = vae.latent_summary(torch.cat(mus), torch.cat(logsds))  # eq. 6, fn. 3
        seconds = time.time() - t0
        row = dict(stage=stage, epoch=epoch + 1, loss=loss, kl=kl, mse=mse,
                   gamma=model.gamma().item(), **stats, lr=lr, seconds=seconds,
                   images_per_s=todo / seconds, latent_var=[round(v, 5) for v in e_var.tolist()])
        history.append(row)
        save_checkpoint(path, cfg, model, opt, epoch + 1, history)
        print(f"stage {stage} epoch {epoch + 1}/{args.epochs}  loss {loss:.2f}  mse {mse:.5f}  "
              f"kl {kl:.2f}  gamma {row['gamma']:.4f}  var_law {row['var_law']:.3f}  inactive "
              f"{row['inactive']}/{len(e_var)} (E[sigma]: {row['inactive_code']})  lr {lr:.2e}  "
              f"{todo / seconds:.0f} img/s  {seconds:.1f}s", flush=True)
        model.eval()
        grids = (epoch + 1) % args.sample_every == 0 or epoch + 1 == args.epochs
        tag = f"{'stage2_' * (stage == 2)}e{epoch + 1:04d}"
        write_pictures(history, m1, m2, fixed, args.out, tag, cfg["seed"], grids)


class Latents:
    """Stage-2 data (Dai & Wipf): the training set encoded once by the frozen stage-1 encoder;
    every epoch a fresh z = mu + sigma * eps, shuffled, in minibatches."""

    def __init__(self, mu, logsd, batch_size, seed):
        self.mu, self.sd, self.batch_size, self.seed = mu, logsd.exp(), batch_size, seed
        if len(self) == 0:
            raise DataError(f"{len(mu)} training images do not make one batch of {batch_size}: "
                            "lower --batch-size")

    def __len__(self):
        return len(self.mu) // self.batch_size

    def epoch(self, e):
        g = data.epoch_generator(self.seed, e)
        z = self.mu + self.sd * vae.randn(g, *self.mu.shape, device=self.mu.device)
        perm = torch.randperm(len(z), generator=g).to(z.device)
        return z[perm].split(self.batch_size)[:len(self)]


@torch.no_grad()
def encode_all(model, images, device):
    batches = data.Batches(images, 500, device, shuffle=False, drop_last=False)
    mu, logsd = zip(*map(model.encode, batches.epoch(0)))
    return torch.cat(mu), torch.cat(logsd)


def prepare(args):
    """This stage's checkpoint path, the run's configuration, the checkpoint to resume (or None)
    and for stage 2 the frozen stage-1 model, all checked against each other and the data."""
    stage, out = args.stage, args.out
    path = checkpoint_path(out, stage)
    if os.path.exists(path) and not args.resume:
        raise DataError(f"{path} exists: pass --resume to continue it, or delete it / choose "
                        "another --out to start over.")
    ck = load_checkpoint(out, stage, args.device) if args.resume else None
    m1, ck1 = load_model(out, 1, args.device) if stage == 2 else (None, None)
    cfg = settle(args, stage, ck, ck1)
    for c in (ck1, ck):  # the data and stage 1 the run was trained on
        cfg |= {k: c["config"][k] for k in ("data_id", "stage1") if c and k in c["config"]}
    check_data(cfg, args.data_dir, checkpoint_path(out, 1) if ck1 and not ck else path)
    if stage == 2:
        check_pair(cfg, ck1, out)
    if ck and ck["epoch"] >= args.epochs:
        raise DataError(f"{path} has trained {ck['epoch']} epochs already: pass a larger --epochs "
                        "(the stage's total) to train more")
    return path, cfg, ck, m1


def restore(ck, model, opt):
    """(epoch, metric rows) to continue from: a checkpoint's, with its weights (gamma's estimate
    included), Adam's moments and the RNG state; (0, []) for a new run."""
    if ck is None:
        return 0, []
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng"]["cpu"])
    dev = next(model.parameters()).device
    if dev.type == "cuda" and "cuda" in ck["rng"]:
        torch.cuda.set_rng_state(ck["rng"]["cuda"], dev)
    return ck["epoch"], ck["history"]


def save_checkpoint(path, cfg, model, opt, epoch, history):
    """The checkpoint, then metrics.jsonl rewritten from it: the earlier stages' lines and this
    stage's rows. Each is written beside and renamed, so a kill at any moment leaves both whole
    and in agreement."""
    rng = {"cpu": torch.get_rng_state()}
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(dev)
    state = dict(config=cfg, model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch,
                 rng=rng, history=history)
    data.atomic_write(path, lambda f: torch.save(state, f))
    metrics, stage = os.path.join(os.path.dirname(path), "metrics.jsonl"), history[0]["stage"]
    rows = []
    if os.path.exists(metrics):
        with open(metrics) as f:
            rows = [r for r in map(json.loads, f) if r["stage"] < stage]
    lines = "".join(json.dumps(r) + "\n" for r in rows + history)
    data.atomic_write(metrics, lambda f: f.write(lines.encode()))


def print_start(args, cfg, model, n, n_split, start):
    """One line before the first step: what runs where, and from which point."""
    side = cfg["img_size"]
    drawn = f" of {n_split} (drawn from seed {cfg['seed']})" if n < n_split else ""
    why = f" ({cfg['img_size_why']})" if cfg.get("img_size_why") else ""
    params = sum(p.numel() for p in model.parameters())
    at = f"resuming at epoch {start + 1}" if start else "new run"
    print(f"stage {args.stage} on {data.describe(args.device)}: {cfg['dataset']} {n}{drawn} "
          f"train images {side}x{side}{why}, {params:,} parameters, {cfg['gamma']} gamma, "
          f"lr {cfg['lr']:g}, batch {cfg['batch_size']}, {at}, {args.epochs} epochs in all; "
          f"out {args.out}", flush=True)


# --- Evaluation (paper 4-5): REC, GEN-1, GEN-2 FID on 10,000 test images, mse, eq. 6, footnote 3 --
@torch.no_grad()
def evaluate(args):
    dev, out = args.device, args.out
    m1, ck = load_model(out, 1, dev)
    m2 = ck2 = None
    if os.path.exists(checkpoint_path(out, 2)):
        m2, ck2 = load_model(out, 2, dev)
        check_pair(ck2["config"], ck, out)
    elif args.latent_norm:
        raise DataError("--latent-norm rescales two-stage samples, but there is no stage2.pt")
    cfg = settle(args, 1, ck1=ck) | {"data_id": ck["config"]["data_id"]}
    check_data(cfg, args.data_dir, checkpoint_path(out, 1))
    split = data.load_split(cfg["dataset"], "test", args.data_dir, cfg["img_size"],
                            cfg["resize"], jpeg=cfg["jpeg"])
    # n test images drawn from the seed when the split is larger: a folder sorted by class, or
    # CelebA's 19,962, of which the released code evaluates a random 10,000
    n = min(args.n_eval, len(split))
    test = data.subset(split, n, cfg["seed"]) if n < len(split) else split
    g = torch.Generator().manual_seed(cfg["seed"])
    recon, mus, logsds, sse = [], [], [], 0
    for x in data.Batches(test, 500, dev, shuffle=False, drop_last=False).epoch(0):
        r, mu, logsd = vae.reconstruct(m1, x, g)  # REC: a sampled z decoded, as released
        sse = sse + (x - r).square().sum()  # on the device; read once below
        recon.append(data.to_uint8(r)), mus.append(mu), logsds.append(logsd)
    stats, e_var = vae.latent_summary(torch.cat(mus), torch.cat(logsds))
    sets = dict(rec=np.concatenate(recon),  # GEN-1: z ~ N(0, I)
                gen1=decode_all(m1, vae.sample_latents(m1, None, n, g, dev)))
    if m2 is not None:  # GEN-2: u ~ N(0, I) -> stage-2 decoder -> z -> stage-1 decoder
        z = vae.sample_latents(m1, m2, n, g, dev)
        if args.latent_norm:  # paper 4.2: mean per-latent std of generated z := sqrt(var law)
            z = z * (math.sqrt(stats["var_law"]) / z.std(0).mean())
        sets["gen2"] = decode_all(m1, z)
    res = dict(rec_fid=None, gen1_fid=None, gen2_fid=None, mse=sse.item() / test.size, **stats,
               n=n, inception=None if args.no_fid else args.inception, inception_weights=None,
               latent_norm=args.latent_norm, epochs=ck["epoch"], epochs2=ck2 and ck2["epoch"])
    if not args.no_fid:
        import fid
        net = fid.load_inception(args.inception, args.inception_weights, dev)
        res["inception_weights"] = net.weights_id  # FIDs compare only under the same weights
        which = (f"test-{cfg['resize']}" + f"-jpeg{cfg['jpeg']}" * bool(cfg["jpeg"])
                 + f"-seed{cfg['seed']}" * (n < len(split)))
        name = f"fid_stats_{cfg['dataset']}_{which}_{cfg['img_size']}px_n{n}_{net.weights_id}.npz"
        # beside the split's own cache (never inside a user's image folder)
        real = fid.cached_stats(os.path.join(os.path.dirname(split.filename), name),
                                lambda: fid.feature_stats(net, test, desc="FID real"),
                                net.weights_id)
        for k, imgs in sets.items():
            res[f"{k}_fid"] = fid.frechet_distance(*real, *fid.feature_stats(
                net, imgs, desc=f"FID {k}"))
    pick = np.linspace(0, n - 1, 32).astype(int)  # spread over a split sorted by class
    sets["recon"] = side_by_side(test[pick], sets.pop("rec")[pick])
    for k, imgs in sets.items():
        data.save_grid(imgs[:64], os.path.join(out, f"eval_{k}.png"))
    text = json.dumps(res, indent=1).encode()
    data.atomic_write(os.path.join(out, "eval.json"), lambda f: f.write(text))
    f, k = (lambda v: "-" if v is None else f"{v:.1f}"), len(e_var)
    print(f"{'epochs':>8} {'REC':>6} {'GEN-1':>6} {'GEN-2':>6} {'mse':>7} {'var.law':>8} "
          f"{'inactive':>9}   (n={n}, FID: {res['inception'] or 'skipped'}"
          f"{', latent norm' if args.latent_norm else ''})")
    print(f"{res['epochs']:>8} {f(res['rec_fid']):>6} {f(res['gen1_fid']):>6} "
          f"{f(res['gen2_fid']):>6} {res['mse']:7.4f} {res['var_law']:8.3f} "
          f"{res['inactive']:>6}/{k}   E[sigma^2], the paper's definition")
    print(f"{'':>37} {res['var_law_code']:8.3f} {res['inactive_code']:>6}/{k}   E[sigma], "
          "as the released code computes them")
    return res


# --- Checkpoints: a run's pieces belong together --------------------------------------------------
def checkpoint_path(out, stage):
    return os.path.join(out, f"stage{stage}.pt")


def load_checkpoint(out, stage, device):
    path = checkpoint_path(out, stage)
    if not os.path.exists(path):
        raise DataError(f"no checkpoint at {path}: train stage {stage} first (python train.py "
                        f"--stage {stage} with the same --out and data options).")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch's own message suggests weights_only=False: unsafe advice
        raise DataError(f"checkpoint {path} cannot be read ({type(e).__name__}): it is truncated, "
                        "corrupt or not a checkpoint of this program; delete it and train again, "
                        "or point --out at an intact run.") from None


def settle(args, stage, ck=None, ck1=None):
    """The run's configuration: what a checkpoint fixes (data and architecture from stage1.pt
    for stage 2 and --eval; every setting from the stage's own checkpoint on --resume), else the
    flags, else the paper's. A flag contradicting a checkpoint is refused, not applied: a run
    stays one procedure of the paper, its metrics comparable and its resume exact."""
    cfg = {}
    for c, s, keys in ((ck1, 1, DATA + ARCH1), (ck, stage, DATA + ARCH1 + ARCH2 + TRAINING)):
        for k in keys if c else ():
            if getattr(args, k) not in (None, c["config"][k]):
                raise DataError(f"stage{s}.pt in {args.out} was made with --{flag(k)} "
                                f"{c['config'][k]}, not {getattr(args, k)}: leave the flag out "
                                "to continue it, or choose another --out for a new run")
            cfg[k] = c["config"][k]
    cfg.setdefault("dataset", args.dataset)
    if "img_size" not in cfg:
        cfg["img_size"] = args.img_size
        if args.img_size is None:  # the paper's, or a folder's own
            cfg["img_size"], cfg["img_size_why"] = data.choose_img_size(args.dataset,
                                                                         args.data_dir)
    defaults = paper_defaults(cfg["dataset"], cfg["img_size"], stage)
    epochs = defaults.pop("epochs")  # the stage's total, the one setting a resume may change
    args.epochs = args.epochs or epochs
    for k, v in defaults.items():
        cfg.setdefault(k, v if getattr(args, k) is None else getattr(args, k))
    return cfg


def check_data(cfg, data_dir, source):
    """Record the data a new run trains on; refuse data other than the recorded."""
    now = data.fingerprint(cfg["dataset"], data_dir, cfg["img_size"], cfg["resize"], cfg["jpeg"])
    then = cfg.setdefault("data_id", now)
    diff = [f"{k} {then.get(k)}, now {now.get(k)}" for k in sorted({*now, *then})
            if now.get(k) != then.get(k)]
    if diff:
        raise DataError(f"{source} was trained on other data than --data-dir {data_dir} holds "
                        f"now ({'; '.join(diff)}): point --data-dir at the run's data")


def fingerprint(state_dict):
    """16 hex digits of SHA-256 over a state dict's tensors: which weights, not which file."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode() + state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_pair(cfg2, ck1, out):
    """Record the stage-1 weights a new stage 2 trains on; refuse a stage 1 changed since."""
    want = dict(epoch=ck1["epoch"], fingerprint=fingerprint(ck1["model"]))
    have = cfg2.setdefault("stage1", want)
    if have != want:
        raise DataError(f"{out}/stage2.pt was trained on stage 1 at epoch {have['epoch']} "
                        f"(weights {have['fingerprint']}), but stage1.pt is now at epoch "
                        f"{want['epoch']} (weights {want['fingerprint']}): train stage 2 afresh "
                        "(delete stage2.pt, then --stage 2), or evaluate stage 1 alone by moving "
                        "stage2.pt away")


def build(cfg, stage):
    if stage == 1:
        try:
            return vae.VAE(cfg["img_size"], *(cfg[k] for k in ARCH1), gamma=cfg["gamma"])
        except ValueError as e:  # checked before any data is decoded (train, --bench)
            raise DataError(f"{e}: choose another --img-size or --num-scale") from None
    return vae.SecondStage(cfg["latent_dim"], cfg["second_dim"], cfg["second_depth"],
                           cfg["gamma"])


def load_model(out, stage, device):
    ck = load_checkpoint(out, stage, device)
    model = build(ck["config"], stage).to(device, memory_format=torch.channels_last)
    model.load_state_dict(ck["model"])
    return model.eval(), ck


# --- Pictures (Pillow only): sample grids, the latent-variance heatmap (Fig. 6-7), gamma ----------
@torch.no_grad()
def decode_all(m1, z, batch=500):
    return np.concatenate([data.to_uint8(m1.decode(c)) for c in z.split(batch)])


def side_by_side(orig, recon, ncol=8):
    """Rows of originals alternating with rows of their reconstructions (whole rows only)."""
    n, shape = len(orig) // ncol * ncol, (-1, ncol, *orig.shape[1:])
    pairs = np.stack([orig[:n].reshape(shape), recon[:n].reshape(shape)], 1)
    return pairs.reshape(-1, *orig.shape[1:])


def epoch_ticks(n, most=10):
    """Epoch numbers 1..n to label: 1 and multiples of 1, 2, 5, 10, 20, ... at most `most`."""
    step = next(s * 10 ** k for k in range(8) for s in (1, 2, 5) if n / (s * 10 ** k) <= most)
    return sorted({1, *range(step, n + 1, step)})


def axis_ticks(lo, hi):
    """Values to label on a log axis: 1, 2, 5 per decade, or evenly spaced round numbers where
    that gives fewer than three (a narrow range, as stage 2's gamma)."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = [m * 10.0 ** k for k in decades for m in (1, 2, 5) if lo <= m * 10.0 ** k <= hi]
    if len(ticks) >= 3:
        return ticks
    step = next(s * 10.0 ** k for k in range(math.floor(math.log10(hi - lo)) - 1, 9)
                for s in (1, 2, 5) if (hi - lo) / (s * 10.0 ** k) <= 6)
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def label_epochs(d, n, x_of, y):
    """Epoch ticks and their numbers below the line at height y; "epoch" under them."""
    for e in epoch_ticks(n):
        d.line([x_of(e), y, x_of(e), y + 4], fill="black")
        d.text((x_of(e) - 3 * len(str(e)), y + 6), str(e), fill="black")
    d.text(((x_of(1) + x_of(n)) / 2 - 15, y + 20), "epoch", fill="black")


HEAT = np.array([[20, 30, 90], [40, 150, 140], [250, 230, 60]], float)  # 0 -> 0.5 -> 1
HEAT_ORIGIN = (50, 30)  # (x, y) of the top-left cell


def heat_colours(v):
    """Values in [0, 1] -> RGB: dark blue 0 (active latent), teal 0.5, yellow 1 (inactive)."""
    return np.stack([np.interp(v, (0, 0.5, 1), c) for c in HEAT.T], -1).astype(np.uint8)


def save_heatmap(values, path, title, cell=(6, 6), threshold=0.8):
    """E[sigma^2] per latent (rows) and epoch (columns); at the right a colour scale with the
    inactivity threshold of footnote 3 marked."""
    (rows, cols), (x0, y0) = values.shape, HEAT_ORIGIN
    w, h, bh = cols * cell[0], rows * cell[1], max(rows * cell[1], 100)
    img = Image.new("RGB", (max(x0 + w + 110, 8 + 6 * len(title)), y0 + bh + 40), "white")
    d = ImageDraw.Draw(img)
    img.paste(Image.fromarray(heat_colours(values)).resize((w, h), Image.NEAREST), (x0, y0))
    d.text((8, 8), title, fill="black")
    d.text((4, y0), "latent", fill="black")
    label_epochs(d, cols, lambda e: x0 + (e - 0.5) * cell[0], y0 + h)
    bx = x0 + w + 20  # the colour scale, 1 at the top
    img.paste(Image.fromarray(heat_colours(np.linspace(1, 0, bh))[:, None].repeat(12, 1)),
              (bx, y0))
    for v in (0, 0.5, threshold, 1):
        y, colour = y0 + round((1 - v) * (bh - 1)), "red" if v == threshold else "black"
        d.line([bx - 3, y, bx + 15, y], fill=colour)
        d.text((bx + 18, y - 5), f"{v:g}" + " inactive" * (v == threshold), fill=colour)
    data.atomic_write(path, lambda f: img.save(f, format="PNG"))


def save_curves(series, path, title, w=560, h=340, m=56):
    """Curves {name: [y per epoch]} on a log y axis, epochs 1..n on x, a dot per epoch."""
    n = max(map(len, series.values()))
    lo, hi = min(map(min, series.values())) / 1.15, max(map(max, series.values())) * 1.15
    x0, x1 = (1, n) if n > 1 else (0, 2)
    to_x = lambda e: m + (e - x0) / (x1 - x0) * (w - 1.5 * m)
    to_y = lambda v: h - m - math.log(v / lo) / math.log(hi / lo) * (h - 1.5 * m)
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m // 2, w - m // 2, h - m], outline="black")
    d.text((m, 6), title, fill="black")
    for v in axis_ticks(lo, hi):
        d.line([m, to_y(v), w - m // 2, to_y(v)], fill=(220, 220, 220))
        d.text((4, to_y(v) - 5), f"{v:g}", fill="black")
    label_epochs(d, n, to_x, h - m)
    for j, ((name, s), colour) in enumerate(zip(series.items(), ("red", "blue", "green"))):
        pts = [(to_x(i + 1), to_y(v)) for i, v in enumerate(s)]
        d.line(pts if len(pts) > 1 else pts * 2, fill=colour, width=2)
        for x, y in pts if n <= 50 else ():  # while the dots can be told apart
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        d.text((w - 130, m // 2 + 6 + 12 * j), name, fill=colour)
    data.atomic_write(path, lambda f: img.save(f, format="PNG"))


def write_pictures(history, m1, m2, fixed, out, tag, seed, grids):
    """Every epoch the latent-variance heatmap (Fig. 6-7) and gamma against sqrt(mse); every
    --sample-every epochs the sample grids, drawn with the same noise each time."""
    s, stage = ("", 1) if m2 is None else ("2", 2)
    v = np.array([r["latent_var"] for r in history]).T  # (latents, epochs)
    first = np.where(v < 0.8, np.arange(v.shape[1]), v.shape[1]).min(1)  # left the limbo
    save_heatmap(v[np.lexsort((v[:, -1], first))], os.path.join(out, f"latent_variance{s}.png"),
                 f"stage {stage}: E[sigma^2] per latent (rows, by epoch of activation) and "
                 "epoch", cell=(max(1, 600 // v.shape[1]), 6))
    # with computed gamma the two coincide: eq. 8's minimum gamma^2 = mse, a constant balance
    save_curves({"gamma": [r["gamma"] for r in history],
                 "sqrt(mse)": [math.sqrt(r["mse"]) for r in history]},
                os.path.join(out, f"gamma{s}.png"),
                f"stage {stage}: gamma (end of epoch) and sqrt(epoch mse)")
    if not grids:
        return
    # Batch statistics, as in training, on a copy: the grids follow the printed training mse
    # from the first epoch, while the moving averages --eval uses lag a short run behind.
    m1, g = copy.deepcopy(m1).train(), torch.Generator().manual_seed(seed)
    if fixed is not None:
        recon = data.to_uint8(vae.reconstruct(m1, fixed, g)[0])
        data.save_grid(side_by_side(data.to_uint8(fixed), recon),
                       os.path.join(out, f"recon_{tag}.png"))
    z = vae.sample_latents(m1, m2, 64, g, next(m1.parameters()).device)
    data.save_grid(decode_all(m1, z), os.path.join(out, f"samples_{tag}.png"))


# --- Command line: every flag checked before any data is decoded ----------------------------------
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block of 35 flags
        raise DataError(f"{message} (python train.py --help lists the flags)")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except those that depend on the dataset (None): the help says them."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def number(cast, low, high=math.inf, above=False):
    """An argparse type: a finite number at least `low` (above it if `above`), at most `high`."""
    def parse(text):
        v = cast(text)
        if not (math.isfinite(v) and (v > low if above else v >= low) and v <= high):
            bound = (f"from {low} to {high}" if high < math.inf
                     else f"{'above' if above else 'at least'} {low}")
            raise argparse.ArgumentTypeError(f"{text} is not a finite number {bound}")
        return v
    parse.__name__ = cast.__name__  # argparse's "invalid int value: 'x'"
    return parse


def parse_args(argv=None):
    p = Parser(description="Two-stage VAE with computed gamma (Asperti & Trentin 2020).",
               formatter_class=Help)
    a, count, rate = p.add_argument, number(int, 1), number(float, 0, above=True)
    a("--dataset", default="cifar10", choices=data.DATASETS, help="folder: any image tree")
    a("--data-dir", default="data", help="where data and caches live; the tree for folder")
    a("--img-size", type=count, help="image side: 32 (cifar10), 64 (celeba); a folder's "
      "own when its first image is square and a power of two, else 64")
    a("--resize", choices=data.RESIZE_MODES, help="PIL filter for celeba/folder (paper Fig. 3; "
      "default bilinear)")
    a("--jpeg", type=number(int, 1, 95), metavar="Q", help="JPEG round trip at quality Q, as "
      "the reference preprocessing (75); default lossless")
    a("--stage", type=int, default=1, choices=(1, 2), help="1: the image VAE; 2: the VAE on "
      "stage-1 latents")
    a("--eval", action="store_true", help="evaluate stage1.pt (and stage2.pt) in --out")
    a("--bench", action="store_true", help="time training steps on synthetic data, then exit")
    a("--out", help="output folder (default runs/<dataset>)")
    a("--resume", action="store_true", help="continue from this stage's checkpoint in --out")
    a("--gamma", choices=sorted(vae.GAMMAS), help="computed (the paper, default) or learned "
      "(Dai & Wipf)")
    a("--epochs", type=count, help="total epochs: 700/1400 (cifar10), 70/140 (celeba)")
    a("--lr", type=rate, help="initial Adam learning rate: 1e-4 (cifar10), 5e-5 (celeba)")
    a("--halve-every", type=count, help="halve the lr every N epochs: 200/100 (cifar10), "
      "60/120 (celeba)")
    a("--batch-size", type=count, help="minibatch size (paper 4: 100)")
    a("--kl-weight", type=number(float, 0), help="KL weight k: pixels/1024 in stage 1 (4.2), 1 "
      "in stage 2")
    a("--l2", type=number(float, 0), help="l2 weight on the resampling kernels: 0 (cifar10), "
      "0.001 (celeba)")
    a("--latent-dim", type=count, help="latent variables (paper 4.1: 64)")
    a("--base-dim", type=count, help="channels of the first scale (32)")
    a("--fc-dim", type=count, help="width of the encoder's fc scale block (512)")
    a("--num-scale", type=count, help="encoder scales: log2(side) - 2")
    a("--block-per-scale", type=count, help="res blocks per scale block (1)")
    a("--depth-per-block", type=count, help="conv layers per res block (2)")
    a("--second-dim", type=count, help="stage-2 width: 2048 for sides <= 32, else 4096")
    a("--second-depth", type=count, help="stage-2 dense layers (3)")
    a("--limit", type=count, help="train on N training images drawn at random from --seed")
    a("--seed", type=int, help="random seed (0)")
    a("--device", help="torch device: cuda if available, else cpu")
    a("--sample-every", type=count, default=50, help="sample grids every N epochs and the last")
    a("--amp", default="none", choices=("none", "bf16"), help="bf16 autocast of the networks; "
      "loss and gamma stay fp32")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the networks "
      "(CUDA graphs on CUDA); default on for stage 1 on CUDA, where it was measured")
    a("--n-eval", type=count, default=10000, help="--eval: test images and samples (paper)")
    a("--no-fid", action="store_true", help="--eval: mse and latent statistics only")
    a("--inception", default="torchvision", choices=("torchvision", "tf"), help="FID weights; "
      "tf gives FIDs comparable with the paper")
    a("--inception-weights", help="local Inception weight file (offline machines)")
    a("--latent-norm", action="store_true", help="--eval: rescale two-stage latents to the "
      "variance law (paper 4.2)")
    args = p.parse_args(argv)
    only_eval = [k for k in ("no_fid", "latent_norm", "inception_weights") if getattr(args, k)]
    if only_eval and not args.eval:
        p.error(f"--{flag(only_eval[0])} applies to --eval only: add --eval")
    if args.eval and (args.resume or args.bench or args.stage == 2):
        p.error("--eval evaluates the checkpoints in --out: drop --resume, --bench and --stage")
    if args.inception_weights and not os.path.isfile(args.inception_weights):
        p.error(f"--inception-weights {args.inception_weights}: no such file")
    if args.out and os.path.isfile(args.out):
        p.error(f"--out {args.out} is a file: name a folder")
    args.out = args.out or os.path.join("runs", args.dataset)
    try:
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        p.error(f"--device {args.device} is not a torch device (cpu, cuda, cuda:1, mps)")
    if args.device.type == "cuda" and (args.device.index or 0) >= torch.cuda.device_count():
        p.error(f"--device {args.device}: this torch sees {torch.cuda.device_count()} CUDA devices "
                f"(CUDA build: {torch.version.cuda or 'none'}); leave --device out to use the CPU, "
                "or install torch's CUDA build (README)")
    return args


def flag(key):
    return key.replace("_", "-")


# --- --bench: training speed on synthetic data of the dataset's shape (no download) ---------------
def bench(args, warmup=3, steps=10):
    """Time the training step as configured and, side by side, a plain fp32 step of the same
    network (NCHW memory, no autocast, no compile)."""
    dev = args.device
    if args.dataset == "folder":  # no folder to look at: the shape of CelebA's images
        args.img_size = args.img_size or 64
    cfg = settle(args, args.stage)
    side, bs = cfg["img_size"], cfg["batch_size"]
    x = torch.rand((bs, 3, side, side) if args.stage == 1 else (bs, cfg["latent_dim"]),
                   device=dev)

    def seconds_per_step(fmt, a):
        model = build(cfg, args.stage).to(dev, memory_format=fmt)
        step = make_step(model, make_optimizer(model, cfg["lr"], dev), cfg, a)
        xf = x.contiguous(memory_format=fmt) if x.dim() == 4 else x
        data.seconds_per_call(lambda: step(xf), warmup, dev)
        return data.seconds_per_call(lambda: step(xf), steps, dev)
    plain = seconds_per_step(torch.contiguous_format,
                             argparse.Namespace(**{**vars(args), "amp": "none", "compile": False}))
    dt = seconds_per_step(torch.channels_last, args)
    print(f"device {data.describe(dev)}, stage {args.stage}, {cfg['dataset']} {side}x{side}, batch "
          f"{bs}, amp {args.amp}, compile {args.compile}")
    print(f"{bs / dt:.1f} images/s  {dt * 1e3:.1f} ms/step")
    print(f"plain fp32 NCHW step: {bs / plain:.1f} images/s  {plain * 1e3:.1f} ms/step  -> "
          f"speed-up {plain / dt:.2f}x")


def main(argv=None):
    try:
        args = parse_args(argv)
        # measured on an H200 for stage 1: 3x the images/s at batch 100, mse and gamma within
        # run-to-run noise (README)
        if args.compile is None:
            args.compile = args.device.type == "cuda" and args.stage == 1
        evaluate(args) if args.eval else bench(args) if args.bench else train(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted: each checkpoint in --out keeps its last finished epoch; continue "
              "training with the same command plus --resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
