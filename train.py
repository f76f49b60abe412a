"""Train and evaluate the two-stage VAE with computed gamma (Asperti & Trentin 2020).

    python train.py --dataset cifar10 --stage 1     # stage-1 VAE, the paper's settings (4.1)
    python train.py --dataset cifar10 --stage 2     # stage-2 VAE on the stage-1 latents
    python train.py --dataset cifar10 --eval        # REC / GEN-1 / GEN-2 FID, mse, variance law

Every default is the paper's value for the dataset (section 4.1 CIFAR-10, 4.2 CelebA; where the
paper is silent, the authors' released code). Outputs in --out: stage1.pt / stage2.pt (model,
optimizer, config, epoch, RNG state, metric rows), metrics.jsonl (one object per epoch, both
stages), sample grids, latent_variance.png (paper Fig. 6-7) and gamma.png.

A run's pieces belong together: a checkpoint records its data (dataset, the data's identity,
size, resize, JPEG protocol, subset, seed) and its training settings; --resume, stage 2 and
--eval take them from it and refuse a flag that contradicts it, and stage2.pt records which
stage-1 weights it was trained on.

Deviations from the paper and the released code:
- Data order: the permutation of epoch e is drawn from (seed, e) and the stage-2 noise likewise,
  so a resumed run repeats an uninterrupted one exactly on the CPU.
- Interrupted runs save mid-epoch (step, partial epoch statistics, RNG state) and resume there.
- The per-epoch sample grids run batch norm on batch statistics (training mode); --eval uses
  the moving averages, as the paper's evaluation does. After a short run the two differ.
- CelebA l2: the paper (4.2) adds 0.001 * sum(w^2) over the resampling kernels to the loss; the
  released code defines that Keras regulariser but minimises only k * kl + gen, so the penalty
  never acts there. We follow the paper.
- Evaluation: the paper's protocol only. The released evaluation (adjust=True) also rescales the
  reconstructions' pixel std to the test set's before the REC FID and the printed mse, scales
  GEN-1 latents by sqrt(variance law) when its variance-loss ratio exceeds 0.25, and normalises
  GEN-2 latents per batch of 100; none of that is done here (--latent-norm is the paper's GEN-2
  normalisation, over all samples). REC and CelebA numbers may differ from the paper's for it.
"""
import argparse
import copy
import hashlib
import itertools
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import vae
from data import DataError

# The paper's settings: (stage 1, stage 2) epochs, learning rate, halving period, l2.
# CIFAR-10 (4.1): 700 epochs at 1e-4 halved every 200; stage 2 1400 epochs halved every 100.
# CelebA: the paper gives 5e-5 and 70 epochs (4.2; its Table 3 runs: 1e-4 halved every 48);
# the halving every 60 / 120 and the 140 stage-2 epochs come from the released code's comments.
PAPER = {"cifar10": dict(epochs=(700, 1400), lr=(1e-4, 1e-4), halve_every=(200, 100)),
         "celeba": dict(epochs=(70, 140), lr=(5e-5, 5e-5), halve_every=(60, 120))}
DATA = ("dataset", "img_size", "resize", "jpeg", "limit", "seed")
ARCH1 = ("latent_dim", "base_dim", "fc_dim", "num_scale", "block_per_scale", "depth_per_block")
ARCH2 = ("second_dim", "second_depth")
TRAINING = ("gamma", "lr", "halve_every", "batch_size", "kl_weight", "l2")
POSITIVE = ("epochs", "batch_size", "halve_every", "latent_dim", "base_dim", "fc_dim", "num_scale",
            "block_per_scale", "depth_per_block", "second_dim", "second_depth", "limit",
            "sample_every", "n_eval")


def paper_defaults(dataset, side, stage):
    """Every configurable value of a stage as the paper (or, where silent, the released code)
    sets it for this dataset and image side."""
    paper = PAPER["celeba" if dataset == "celeba" or side >= 64 else "cifar10"]
    s = stage - 1
    return dict(
        resize="bilinear", jpeg=None, limit=None, seed=0, gamma="computed", batch_size=100,
        epochs=paper["epochs"][s], lr=paper["lr"][s], halve_every=paper["halve_every"][s],
        kl_weight=vae.kl_weight_for(side) if stage == 1 else 1.0,  # k = pixels/1024 (4.2)
        l2=1e-3 if stage == 1 and side >= 64 else 0.0,  # on the resampling kernels (4.2)
        latent_dim=64, base_dim=32, fc_dim=512, num_scale=max(1, int(math.log2(side)) - 2),
        block_per_scale=1, depth_per_block=2, second_dim=2048 if side <= 32 else 4096,
        second_depth=3)


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except where they depend on the dataset (None): the help says them."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Two-stage VAE with computed gamma (Asperti & "
                                "Trentin 2020).", formatter_class=Help)
    a = p.add_argument
    a("--dataset", default="cifar10", choices=data.DATASETS,
      help="data set; folder: any image tree, see data.py")
    a("--data-dir", default="data", help="where data sets and caches live, or the image tree "
      "of --dataset folder")
    a("--img-size", type=int, help="image side, a power of two: 32 for cifar10, 64 for celeba; "
      "for a folder, its images' size when all are square and equal, else 64")
    a("--resize", help="PIL filter for celeba/folder (paper Fig. 3; default bilinear)")
    a("--jpeg", type=int, metavar="Q", help="JPEG round trip at quality Q before use, as the "
      "reference preprocessing (75); default lossless")
    a("--stage", type=int, default=1, choices=(1, 2),
      help="1: the image VAE; 2: the VAE on stage-1 latents")
    a("--eval", action="store_true", help="evaluate stage1.pt (and stage2.pt) in --out")
    a("--bench", action="store_true", help="time training steps on synthetic data, then exit")
    a("--out", help="output folder (default runs/<dataset>)")
    a("--resume", action="store_true", help="continue from this stage's checkpoint in --out")
    a("--gamma", choices=sorted(vae.GAMMAS), help="computed (the paper, default) or learned "
      "(Dai & Wipf)")
    a("--epochs", type=int, help="total epochs of this stage: 700/1400 (cifar10), 70/140 "
      "(celeba)")
    a("--lr", type=float, help="initial Adam learning rate: 1e-4 (cifar10), 5e-5 (celeba)")
    a("--halve-every", type=int, help="halve the lr every N epochs: 200/100 (cifar10), 60/120 "
      "(celeba)")
    a("--batch-size", type=int, help="minibatch size (paper 4: 100)")
    a("--kl-weight", type=float, help="KL weight k: pixels/1024 in stage 1 (paper 4.2), 1 in "
      "stage 2")
    a("--l2", type=float, help="l2 weight on the resampling kernels: 0 (cifar10), 0.001 (celeba)")
    a("--latent-dim", type=int, help="latent variables (paper 4.1: 64)")
    a("--base-dim", type=int, help="channels of the first scale (32)")
    a("--fc-dim", type=int, help="width of the encoder's fc scale block (512)")
    a("--num-scale", type=int, help="encoder scales: log2(side) - 2 (3 at 32x32, 4 at 64x64)")
    a("--block-per-scale", type=int, help="res blocks per scale block (1)")
    a("--depth-per-block", type=int, help="conv layers per res block (2)")
    a("--second-dim", type=int, help="stage-2 width: 2048 for sides <= 32, else 4096")
    a("--second-depth", type=int, help="stage-2 dense layers (3)")
    a("--limit", type=int, help="train on N training images drawn at random from --seed")
    a("--seed", type=int, help="random seed (0)")
    a("--device", help="torch device: cuda if available, else cpu")
    a("--sample-every", type=int, default=50, help="write sample grids every N epochs and after "
      "the last")
    a("--amp", default="none", choices=("none", "bf16"), help="bf16 autocast of the networks; "
      "loss and gamma stay fp32")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the networks "
      "(CUDA graphs on CUDA); default on for stage 1 on CUDA, where it was measured, else off")
    a("--n-eval", type=int, default=10000, help="--eval: test images and samples (paper: "
      "10,000)")
    a("--no-fid", action="store_true", help="--eval without Inception: mse and latent "
      "statistics only")
    a("--inception", default="torchvision", choices=("torchvision", "tf"), help="FID weights; "
      "tf gives FIDs comparable with the paper")
    a("--inception-weights", help="local Inception weight file (offline machines)")
    a("--latent-norm", action="store_true", help="--eval: rescale two-stage latents to the "
      "variance law (paper 4.2)")
    args = p.parse_args(argv)
    check_args(args)
    args.out = args.out or os.path.join("runs", args.dataset)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def check_args(args):
    """Refuse impossible flags at once, before any data is decoded, with what to do instead."""
    for k in POSITIVE:
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise DataError(f"--{flag(k)} must be at least 1, not {getattr(args, k)}")
    s = args.img_size
    if s is not None and (s < 4 or s & (s - 1)):
        raise DataError(f"--img-size {s}: the networks halve the image down to 2x2, so the side "
                        "must be a power of two of at least 4 (32 as CIFAR-10, 64 as CelebA)")
    if args.jpeg is not None and not 1 <= args.jpeg <= 95:
        raise DataError(f"--jpeg {args.jpeg}: a JPEG quality is 1..95 (the reference used 75)")
    if args.resize is not None and args.resize not in data.RESIZE_MODES:
        raise DataError(f"--resize {args.resize}: choose one of {', '.join(data.RESIZE_MODES)}")
    for k, least in (("lr", "above 0"), ("kl_weight", "at least 0"), ("l2", "at least 0")):
        v = getattr(args, k)
        if v is not None and not (math.isfinite(v) and (v > 0 if k == "lr" else v >= 0)):
            raise DataError(f"--{flag(k)} {v}: it must be a finite number {least}")
    only_eval = [k for k in ("no_fid", "latent_norm", "inception_weights") if getattr(args, k)]
    if only_eval and not args.eval:
        raise DataError(f"--{flag(only_eval[0])} applies to --eval only: add --eval")
    if args.eval and (args.resume or args.bench or args.stage == 2):
        raise DataError("--eval evaluates the checkpoints in --out: drop --resume, --bench and "
                        "--stage")
    if args.inception_weights and not os.path.isfile(args.inception_weights):
        raise DataError(f"--inception-weights {args.inception_weights}: no such file")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DataError(f"--out {args.out} is a file: name a folder")
    if args.device:
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise DataError(f"--device {args.device} is not a torch device (cpu, cuda, cuda:1, "
                            "mps)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DataError(f"--device {args.device}, but this torch has no CUDA device (CUDA "
                            f"build: {torch.version.cuda or 'no'}): leave --device out to use the "
                            "CPU, or install torch's CUDA build (README)")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise DataError(f"--device {args.device}: there are {torch.cuda.device_count()} GPUs")


def flag(key):
    return key.replace("_", "-")


# ---------------------------------------------------------------------------------------------
# Checkpoints and configuration: a run's pieces belong together
# ---------------------------------------------------------------------------------------------
def checkpoint_path(out, stage):
    return os.path.join(out, f"stage{stage}.pt")


def load_checkpoint(path, device):
    if not os.path.exists(path):
        stage = "2" if path.endswith("stage2.pt") else "1"
        raise DataError(f"no checkpoint at {path}: train stage {stage} first (python train.py "
                        f"--stage {stage} with the same --out and data options).")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch's own message suggests weights_only=False: unsafe advice
        raise DataError(f"checkpoint {path} cannot be read ({type(e).__name__}): it is truncated, "
                        "corrupt or not a checkpoint of this program; delete it and train again, "
                        "or point --out at an intact run.") from None
    if "data_id" not in ck.get("config", {}):
        raise DataError(f"{path} was written by an earlier version of train.py, which did not "
                        "record its data: train it again with this version")
    return ck


def fingerprint(state_dict):
    """16 hex digits of SHA-256 over a state dict's tensors: which weights, not which file."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode() + state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def settle(args, stage, ck=None, ck1=None):
    """The run's configuration. Keys a checkpoint already fixes are taken from it: data and
    architecture from stage1.pt (stage 2, --eval), everything from the stage's own checkpoint
    (--resume). A flag given with another value is refused rather than applied: a run is one
    procedure of the paper, and its metrics and resumes stay comparable only if it stays one.
    The rest: the flags, else the paper's defaults."""
    fixed = {}
    if ck1 is not None:
        fixed |= {k: (ck1["config"][k], "stage1.pt") for k in DATA + ARCH1}
    if ck is not None:
        fixed |= {k: (v, f"stage{stage}.pt") for k, v in ck["config"].items() if k in
                  DATA + ARCH1 + ARCH2 + TRAINING}
    cfg = {}
    for k, (v, source) in fixed.items():
        given = getattr(args, k)
        if given is not None and given != v:
            raise DataError(f"{source} in {args.out} was made with --{flag(k)} {v}, not {given}: "
                            f"leave the flag out to continue it, or choose another --out for a "
                            "new run")
        cfg[k] = v
    cfg.setdefault("dataset", args.dataset)
    if "img_size" not in cfg:
        cfg["img_size"] = args.img_size
        if cfg["img_size"] is None:  # the paper's, or a folder's own size
            cfg["img_size"], cfg["img_size_why"] = data.choose_img_size(cfg["dataset"],
                                                                         args.data_dir)
    defaults = paper_defaults(cfg["dataset"], cfg["img_size"], stage)
    epochs = defaults.pop("epochs")  # the stage's total, the one setting a resume may change
    args.epochs = epochs if args.epochs is None else args.epochs
    for k, v in defaults.items():
        cfg.setdefault(k, v if getattr(args, k) is None else getattr(args, k))
    return cfg


def data_identity(cfg, data_dir):
    return data.fingerprint(cfg["dataset"], data_dir, cfg["img_size"], cfg["resize"], cfg["jpeg"])


def check_data(cfg, data_dir, source):
    """Refuse data other than the data the checkpoint was trained on."""
    now, then = data_identity(cfg, data_dir), cfg["data_id"]
    if now != then:
        what = "; ".join(f"{k} {then.get(k)}, now {now.get(k)}" for k in sorted({*now, *then})
                         if now.get(k) != then.get(k))
        raise DataError(f"{source} was trained on other data than --data-dir {data_dir} holds "
                        f"now ({what}): point --data-dir at the run's data")


def check_pair(ck1, ck2, out):
    """stage2.pt must have been trained on the stage-1 weights now in stage1.pt."""
    want = dict(epoch=ck1["epoch"], fingerprint=fingerprint(ck1["model"]))
    have = ck2["config"]["stage1"]
    if have != want:
        raise DataError(f"{out}/stage2.pt was trained on stage 1 at epoch {have['epoch']} "
                        f"(weights {have['fingerprint']}), but stage1.pt is now at epoch "
                        f"{want['epoch']} (weights {want['fingerprint']}): train stage 2 afresh "
                        "(delete stage2.pt, then --stage 2), or evaluate stage 1 alone by moving "
                        "stage2.pt away")


def build(cfg, stage):
    if stage == 1:
        return vae.VAE(cfg["img_size"], *(cfg[k] for k in ARCH1), gamma=cfg["gamma"])
    return vae.SecondStage(cfg["latent_dim"], cfg["second_dim"], cfg["second_depth"],
                           cfg["gamma"])


def load_model(path, stage, device):
    ck = load_checkpoint(path, device)
    model = build(ck["config"], stage).to(device, memory_format=torch.channels_last)
    model.load_state_dict(ck["model"])
    return model.eval(), ck


def training_images(cfg, data_dir):
    """The training split, or the subset --limit draws from the seed (the same every time)."""
    split = data.load_split(cfg["dataset"], "train", data_dir, cfg["img_size"], cfg["resize"],
                            jpeg=cfg["jpeg"])
    return data.subset(split, cfg["limit"], cfg["seed"]), len(split)


# ---------------------------------------------------------------------------------------------
# Training (paper section 4): stage 1 on images, stage 2 on stage-1 latents
# ---------------------------------------------------------------------------------------------
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
        b = self.batch_size
        return (z[perm[i * b:(i + 1) * b]] for i in range(len(self)))


@torch.no_grad()
def encode_all(model, batches):
    mu, logsd = zip(*(model.encode(x) for x in batches))
    return torch.cat(mu), torch.cat(logsd)


def make_step(model, opt, cfg, args):
    """One training step: forward (bf16 autocast if asked), eq. 7 + k * eq. 3 (+ l2) in fp32,
    Adam, then the gamma update (a no-op for learned gamma). Returns detached (loss, kl, mse),
    mu and log sigma without reading anything back to the host."""
    # On CUDA a batch of 100 small images is bound by kernel launches, not arithmetic: CUDA graphs
    # ("reduce-overhead") replay the compiled forward and backward with one launch each.
    cuda = args.device.type == "cuda"
    net = torch.compile(model, mode="reduce-overhead" if cuda else None) if args.compile else model
    amp = torch.autocast(args.device.type, torch.bfloat16, enabled=args.amp == "bf16")

    def step(x):
        if args.compile and cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are reused
        with amp:
            out = net(x)
        loss, mse, kl = model.loss(x, out, cfg["kl_weight"])  # the loss at the current gamma
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


STOP = []  # signals received; the loop saves and exits after the step in progress


def train(args):
    stage, dev, out = args.stage, args.device, args.out
    path = checkpoint_path(out, stage)
    if not args.resume and os.path.exists(path):
        raise DataError(f"{path} exists: pass --resume to continue it, or delete it / choose "
                        "another --out to start over.")
    ck = load_checkpoint(path, dev) if args.resume else None
    m1 = ck1 = None
    if stage == 2:  # the stage-1 model, frozen; its data and architecture are the ones to use
        m1, ck1 = load_model(checkpoint_path(out, 1), 1, dev)
        if ck1["step"]:
            raise DataError(f"{out}/stage1.pt was saved mid-epoch (epoch {ck1['epoch'] + 1}, step "
                            f"{ck1['step']}): finish that epoch first (--stage 1 --resume)")
    cfg = settle(args, stage, ck, ck1)
    if ck is not None:  # what the checkpoint was trained on
        cfg |= {k: ck["config"][k] for k in ("data_id", "stage1") if k in ck["config"]}
    elif ck1 is not None:
        cfg["data_id"] = ck1["config"]["data_id"]
        cfg["stage1"] = dict(epoch=ck1["epoch"], fingerprint=fingerprint(ck1["model"]))
    else:
        cfg["data_id"] = data_identity(cfg, args.data_dir)
    if ck or ck1:
        check_data(cfg, args.data_dir, f"{out}/stage1.pt" if ck1 else path)
    if stage == 2 and ck is not None:  # a new stage 2 has just recorded this stage 1
        check_pair(ck1, ck, out)
    start, skip = (ck["epoch"], ck["step"]) if ck else (0, 0)
    if start >= args.epochs:
        raise DataError(f"{path} has trained {start} epochs already: pass a larger --epochs (the "
                        "stage's total) to train more")
    torch.manual_seed(cfg["seed"])
    images, n_split = training_images(cfg, args.data_dir)
    fixed = None
    if stage == 1:
        batches = data.Batches(images, cfg["batch_size"], dev, seed=cfg["seed"])
        # the recon grids' 32 images, spread over the split (a folder sorted by class)
        spread = torch.linspace(0, len(images) - 1, 32, device=dev).long()
        fixed = batches.x[spread].permute(0, 3, 1, 2).float().div(255)
    else:
        plain = data.Batches(images, 500, dev, shuffle=False, drop_last=False).epoch(0)
        batches = Latents(*encode_all(m1, plain), cfg["batch_size"], cfg["seed"])
        if len(batches) == 0:
            raise DataError(f"{len(images)} training images do not make one batch of "
                            f"{cfg['batch_size']}: lower --batch-size")
    model = build(cfg, stage).to(dev, memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg["lr"], dev)
    partial = None
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        partial = ck["partial"]
        torch.set_rng_state(ck["rng"]["cpu"])
        if dev.type == "cuda" and "cuda" in ck["rng"]:
            torch.cuda.set_rng_state(ck["rng"]["cuda"], dev)
    history = ck["history"] if ck else []
    rewrite_metrics(os.path.join(out, "metrics.jsonl"), stage, history)
    print_start(args, cfg, model, len(images), n_split, len(batches), start, skip)
    step = make_step(model, opt, cfg, args)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: STOP.append(signum))

    def checkpoint(epoch, step_in_epoch=0, partial=None):
        rng = {"cpu": torch.get_rng_state()}
        if dev.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(dev)
        state = dict(config=cfg, model=model.state_dict(), optimizer=opt.state_dict(),
                     epoch=epoch, step=step_in_epoch, partial=partial, rng=rng, history=history)
        # written beside, then renamed: a kill at any moment leaves the last complete one
        data.atomic_write(path, lambda f: torch.save(state, f))

    def interrupted(where):
        print(f"interrupted: saved {path} {where}; continue with the same command plus --resume",
              file=sys.stderr)
        sys.exit(128 + STOP[0])

    n, bs = len(batches), cfg["batch_size"]
    for epoch in range(start, args.epochs):
        lr = lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.time()
        model.train()
        # per-step figures and encodings stay on the device and are read back once per epoch
        rec = torch.zeros(n, 3, device=dev)
        mus, logsds = [], []
        if partial is not None:  # resuming mid-epoch: the steps already done
            rec[:skip], mus, logsds = partial["rec"], [partial["mu"]], [partial["logsd"]]
        todo = itertools.islice(batches.epoch(epoch), skip, None)
        desc = f"stage {stage} epoch {epoch + 1}/{args.epochs}"
        steps = data.progress(todo, n * bs, desc, done=skip * bs, leave=False)
        for i, x in enumerate(steps, skip):
            rec[i], mu, logsd = step(x)
            mus.append(mu)
            logsds.append(logsd)
            if STOP and i + 1 < n:
                check_finite(rec[:i + 1], epoch, path)
                checkpoint(epoch, i + 1, dict(rec=rec[:i + 1], mu=torch.cat(mus),
                                              logsd=torch.cat(logsds)))
                interrupted(f"at epoch {epoch + 1}, step {i + 1}/{n}")
        check_finite(rec, epoch, path)
        # eq. 6 and footnote 3 over the epoch's training encodings
        stats, e_var = vae.latent_summary(torch.cat(mus), torch.cat(logsds))
        loss, kl, mse = rec.mean(0).tolist()
        seconds = time.time() - t0
        row = dict(stage=stage, epoch=epoch + 1, loss=loss, kl=kl, mse=mse,
                   gamma=model.gamma().item(), **stats, lr=lr, seconds=seconds,
                   images_per_s=(n - skip) * bs / seconds,  # only the images trained on here
                   latent_var=[round(v, 5) for v in e_var.tolist()])
        skip, partial = 0, None
        history.append(row)
        checkpoint(epoch + 1)  # first the checkpoint, which holds the row too, then the line
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"stage {stage} epoch {epoch + 1}/{args.epochs}  loss {loss:.2f}  mse {mse:.5f}  "
              f"kl {kl:.2f}  gamma {row['gamma']:.4f}  var_law {row['var_law']:.3f}  inactive "
              f"{row['inactive']}/{len(e_var)} (E[sigma]: {row['inactive_code']})  lr {lr:.2e}  "
              f"{row['images_per_s']:.0f} img/s  {seconds:.1f}s", flush=True)
        model.eval()
        tag = f"{'stage2_' if m1 else ''}e{epoch + 1:04d}"
        grids = (epoch + 1) % args.sample_every == 0 or epoch + 1 == args.epochs
        write_pictures(history, m1 or model, model if m1 else None, fixed, out, tag,
                       cfg["seed"], grids)
        if STOP:
            interrupted(f"after epoch {epoch + 1}")


def print_start(args, cfg, model, n, n_split, steps, start, skip):
    """One line before the first step: what runs where, and from which point."""
    dev = args.device
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    size = cfg["img_size"]
    subset = f" of {n_split} (drawn from seed {cfg['seed']})" if n < n_split else ""
    why = f" ({cfg['img_size_why']})" if cfg.get("img_size_why") else ""
    params = sum(p.numel() for p in model.parameters())
    at = f"resuming at epoch {start + 1}, step {skip + 1}/{steps}" if start or skip else "new run"
    print(f"stage {args.stage} on {dev} ({where}): {cfg['dataset']} {n}{subset} train images "
          f"{size}x{size}{why}, {params:,} parameters, {cfg['gamma']} gamma, lr {cfg['lr']:g}, "
          f"batch {cfg['batch_size']}, {at}, {args.epochs} epochs in all; out {args.out}",
          flush=True)


def check_finite(rec, epoch, ckpt_path):
    bad = (~torch.isfinite(rec[:, 0])).nonzero()
    if len(bad):
        raise DataError(f"non-finite loss at epoch {epoch + 1}, step {bad[0].item() + 1}; "
                        f"training stopped. The last good checkpoint {ckpt_path} is kept (if "
                        "any); try a lower --lr or --amp none.")


def rewrite_metrics(path, stage, history):
    """metrics.jsonl := the lines of earlier stages + this stage's history from the checkpoint.
    The checkpoint is written before each line is appended, so a kill between the two, or a line
    past the checkpoint, can leave neither a gap nor a duplicate after a resume."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [r for r in map(json.loads, filter(str.strip, f)) if r["stage"] < stage]
    lines = "".join(json.dumps(r) + "\n" for r in rows + history)
    data.atomic_write(path, lambda f: f.write(lines.encode()))


# ---------------------------------------------------------------------------------------------
# Pictures (Pillow only): sample grids, the latent-variance heatmap (Fig. 6-7), gamma
# ---------------------------------------------------------------------------------------------
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
    """Readable values between lo and hi for a log axis: 1, 2, 5 per decade, or evenly spaced
    round numbers where that gives fewer than three (a narrow range, as stage 2's gamma)."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = [m * 10.0 ** k for k in decades for m in (1, 2, 5) if lo <= m * 10.0 ** k <= hi]
    if len(ticks) >= 3:
        return ticks
    step = next(s * 10.0 ** k for k in range(math.floor(math.log10(hi - lo)) - 1, 9)
                for s in (1, 2, 5) if (hi - lo) / (s * 10.0 ** k) <= 6)
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


HEAT = np.array([[20, 30, 90], [40, 150, 140], [250, 230, 60]], float)  # 0 -> 0.5 -> 1


def heat_colours(v):
    """Values in [0, 1] -> RGB: dark blue 0 (active latent), teal 0.5, yellow 1 (inactive)."""
    t = np.clip(v, 0, 1) * 2
    lo = np.minimum(t.astype(int), 1)
    return (HEAT[lo] + (t - lo)[..., None] * (HEAT[lo + 1] - HEAT[lo])).astype(np.uint8)


HEAT_ORIGIN = (50, 30)  # (x, y) of the top-left cell


def save_heatmap(values, path, title, cell=(6, 6), threshold=0.8):
    """E[sigma^2] per latent (rows) and epoch (columns) as a PNG: epoch ticks below, a colour
    scale at the right with the inactivity threshold (footnote 3) marked."""
    rows, cols = values.shape
    w, h = cols * cell[0], rows * cell[1]
    x0, y0 = HEAT_ORIGIN
    img = Image.new("RGB", (max(x0 + w + 110, 8 + 6 * len(title)), y0 + max(h, 100) + 40),
                    "white")
    d = ImageDraw.Draw(img)
    img.paste(Image.fromarray(heat_colours(values)).resize((w, h), Image.NEAREST), (x0, y0))
    d.text((8, 8), title, fill="black")
    d.text((4, y0), "latent", fill="black")
    for e in epoch_ticks(cols):
        x = x0 + (e - 0.5) * cell[0]
        d.line([x, y0 + h, x, y0 + h + 4], fill="black")
        d.text((x - 3 * len(str(e)), y0 + h + 6), str(e), fill="black")
    d.text((x0, y0 + h + 20), "epoch", fill="black")
    bx, bh = x0 + w + 20, max(h, 100)  # the colour scale, 1 at the top
    scale = heat_colours(np.linspace(1, 0, bh))[:, None].repeat(12, 1)
    img.paste(Image.fromarray(scale), (bx, y0))
    for v in (0, 0.5, threshold, 1):
        y = y0 + round((1 - v) * (bh - 1))
        d.line([bx - 3, y, bx + 15, y], fill="red" if v == threshold else "black")
        d.text((bx + 18, y - 5), f"{v:g}" + (" inactive" if v == threshold else ""),
               fill="red" if v == threshold else "black")
    data.atomic_write(path, lambda f: img.save(f, format="PNG"))


def save_curves(series, path, title, w=560, h=340, m=56):
    """Curves {name: [y per epoch]} on a log y axis with readable ticks, epochs 1..n on x."""
    n = max(map(len, series.values()))
    values = [v for s in series.values() for v in s]
    lo, hi = min(values) / 1.15, max(values) * 1.15
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
    for e in epoch_ticks(n):
        d.line([to_x(e), h - m, to_x(e), h - m + 4], fill="black")
        d.text((to_x(e) - 3 * len(str(e)), h - m + 6), str(e), fill="black")
    d.text((w // 2 - 15, h - m + 22), "epoch", fill="black")
    for j, ((name, s), colour) in enumerate(zip(series.items(), ("red", "blue", "green"))):
        pts = [(to_x(i + 1), to_y(v)) for i, v in enumerate(s)]
        d.line(pts if len(pts) > 1 else pts * 2, fill=colour, width=2)
        for x, y in pts if n <= 50 else ():  # a dot per epoch while they can be told apart
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        d.text((w - 130, m // 2 + 6 + 12 * j), name, fill=colour)
    data.atomic_write(path, lambda f: img.save(f, format="PNG"))


def write_pictures(history, m1, m2, fixed, out, tag, seed, grids):
    """Every epoch: the latent-variance heatmap (Fig. 6-7) and gamma vs sqrt(mse); every few
    epochs the sample grids, drawn with the same noise each time so they change only with the
    model, and with batch statistics."""
    s = "" if m2 is None else "2"
    v = np.array([r["latent_var"] for r in history]).T  # (latents, epochs)
    first = np.where(v < 0.8, np.arange(v.shape[1]), v.shape[1]).min(1)  # left the limbo
    save_heatmap(v[np.lexsort((v[:, -1], first))], os.path.join(out, f"latent_variance{s}.png"),
                 f"stage {1 if m2 is None else 2}: E[sigma^2] per latent (rows, by epoch of "
                 "activation) and epoch", cell=(max(1, 600 // v.shape[1]), 6))
    # with computed gamma the two coincide: eq. 8's minimum gamma^2 = mse, a constant balance
    curves = {"gamma": [r["gamma"] for r in history],
              "sqrt(mse)": [math.sqrt(r["mse"]) for r in history]}
    save_curves(curves, os.path.join(out, f"gamma{s}.png"),
                f"stage {1 if m2 is None else 2}: gamma (end of epoch) and sqrt(epoch mse)")
    if not grids:
        return
    # Batch statistics, as in training, on a copy (the moving averages stay untouched): the
    # grids then follow the printed training mse from the first epoch, while the moving
    # averages that --eval uses (the paper's protocol) lag behind a run of a few hundred steps.
    m1 = copy.deepcopy(m1).train()
    g = torch.Generator().manual_seed(seed)
    dev = next(m1.parameters()).device
    if fixed is not None:
        recon = data.to_uint8(vae.reconstruct(m1, fixed, g)[0])
        data.save_grid(side_by_side(data.to_uint8(fixed), recon),
                       os.path.join(out, f"recon_{tag}.png"))
    samples = decode_all(m1, vae.sample_latents(m1, m2, 64, g, dev))
    data.save_grid(samples, os.path.join(out, f"samples_{tag}.png"))


# ---------------------------------------------------------------------------------------------
# Evaluation (paper 4-5): REC, GEN-1, GEN-2 FID on 10,000 test images, mse, eq. 6, footnote 3
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(args):
    dev, out = args.device, args.out
    m1, ck = load_model(checkpoint_path(out, 1), 1, dev)
    if ck["step"]:
        raise DataError(f"{out}/stage1.pt was saved mid-epoch: finish the epoch first (--resume)")
    m2, ck2 = None, None
    if os.path.exists(checkpoint_path(out, 2)):
        m2, ck2 = load_model(checkpoint_path(out, 2), 2, dev)
        check_pair(ck, ck2, out)
    elif args.latent_norm:
        raise DataError("--latent-norm rescales two-stage samples, but there is no stage2.pt")
    cfg = settle(args, 1, ck1=ck)
    cfg["data_id"] = ck["config"]["data_id"]
    check_data(cfg, args.data_dir, f"{out}/stage1.pt")
    split = data.load_split(cfg["dataset"], "test", args.data_dir, cfg["img_size"],
                            cfg["resize"], jpeg=cfg["jpeg"])
    # n test images drawn from the seed (all of them at n >= the split): a folder sorted by
    # class, or CelebA's 19,962, of which the released code evaluates a random 10,000
    n = min(args.n_eval, len(split))
    test = data.subset(split, n, cfg["seed"]) if n < len(split) else split
    g = torch.Generator().manual_seed(cfg["seed"])
    recon, mus, logsds, sse = [], [], [], 0
    for x in data.Batches(test, 500, dev, shuffle=False, drop_last=False).epoch(0):
        r, mu, logsd = vae.reconstruct(m1, x, g)  # REC: a sampled z decoded, as released
        sse = sse + (x - r).square().sum()  # on the device; read once below
        recon.append(data.to_uint8(r)), mus.append(mu), logsds.append(logsd)
    recon = np.concatenate(recon)
    stats, e_var = vae.latent_summary(torch.cat(mus), torch.cat(logsds))
    gen1 = decode_all(m1, vae.sample_latents(m1, None, len(test), g, dev))  # GEN-1: z ~ N(0, I)
    gen2 = None
    if m2 is not None:  # GEN-2: u ~ N(0, I) -> stage-2 decoder -> z -> stage-1 decoder
        z = vae.sample_latents(m1, m2, len(test), g, dev)
        if args.latent_norm:  # paper 4.2: mean per-latent std of generated z := sqrt(var law)
            z = z * (math.sqrt(stats["var_law"]) / z.std(0).mean())
        gen2 = decode_all(m1, z)
    res = dict(rec_fid=None, gen1_fid=None, gen2_fid=None, mse=sse.item() / test.size,
               **stats, n=len(test), inception=None if args.no_fid else args.inception,
               inception_weights=None,
               latent_norm=args.latent_norm, epochs=ck["epoch"],
               epochs2=ck2["epoch"] if ck2 else None)
    if not args.no_fid:
        import fid
        net = fid.load_inception(args.inception, args.inception_weights, dev)
        res["inception_weights"] = net.weights_id  # FIDs compare only under the same weights
        which = f"test-{cfg['resize']}" + (f"-jpeg{cfg['jpeg']}" if cfg["jpeg"] else "") + (
            f"-seed{cfg['seed']}" if n < len(split) else "")
        key = fid.stats_cache_name(cfg["dataset"], which, cfg["img_size"], n, net.weights_id)
        # cached beside the split's own cache (never inside a user's image folder)
        real = fid.cached_stats(os.path.join(os.path.dirname(split.filename), key),
                                lambda: fid.feature_stats(net, test, desc="FID real"),
                                net.weights_id)
        for name, imgs in (("rec_fid", recon), ("gen1_fid", gen1), ("gen2_fid", gen2)):
            if imgs is not None:
                fake = fid.feature_stats(net, imgs, desc=f"FID {name[:-4]}")
                res[name] = fid.frechet_distance(*real, *fake)
    pick = np.linspace(0, len(test) - 1, 32).astype(int)  # spread over a split sorted by class
    for name, imgs in (("recon", side_by_side(test[pick], recon[pick])), ("gen1", gen1),
                       ("gen2", gen2)):
        if imgs is not None:
            data.save_grid(imgs[:64], os.path.join(out, f"eval_{name}.png"))
    text = json.dumps(res, indent=1).encode()
    data.atomic_write(os.path.join(out, "eval.json"), lambda f: f.write(text))
    f = lambda v: "-" if v is None else f"{v:.1f}"
    k = len(e_var)
    print(f"{'epochs':>8} {'REC':>6} {'GEN-1':>6} {'GEN-2':>6} {'mse':>7} {'var.law':>8} "
          f"{'inactive':>9}   (n={len(test)}, FID: {res['inception'] or 'skipped'}"
          f"{', latent norm' if args.latent_norm else ''})")
    print(f"{res['epochs']:>8} {f(res['rec_fid']):>6} {f(res['gen1_fid']):>6} "
          f"{f(res['gen2_fid']):>6} {res['mse']:7.4f} {res['var_law']:8.3f} "
          f"{res['inactive']:>6}/{k}   E[sigma^2], the paper's definition")
    print(f"{'':>37} {res['var_law_code']:8.3f} {res['inactive_code']:>6}/{k}   E[sigma], "
          "as the released code computes them")
    return res


# ---------------------------------------------------------------------------------------------
# --bench: training speed on synthetic data of the dataset's shape (no download)
# ---------------------------------------------------------------------------------------------
PEAKS = {"H100": (989e12, 67e12), "H200": (989e12, 67e12), "A100": (312e12, 19.5e12)}  # bf16, fp32


def training_flops(model, x, kl_weight):
    """FLOPs of one training step's forward and backward, as torch.utils.flop_counter counts."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        model.loss(x, model(x), kl_weight)[0].backward()
    return counter.get_total_flops()


def bench(args, warmup=3, steps=10):
    """Time the training step as configured and, side by side, a plain fp32 step of the same
    network (NCHW memory, no autocast, no compile); count its FLOPs; compare with a reference."""
    dev = args.device
    if args.dataset == "folder":  # no folder to look at: the shape of CelebA's images
        args.img_size = args.img_size or 64
    cfg = settle(args, args.stage)
    side, bs = cfg["img_size"], cfg["batch_size"]
    shape = (bs, 3, side, side) if args.stage == 1 else (bs, cfg["latent_dim"])
    x = torch.rand(shape, device=dev)

    def seconds_per_step(fmt, a):
        model = build(cfg, args.stage).to(dev, memory_format=fmt)
        step = make_step(model, make_optimizer(model, cfg["lr"], dev), cfg, a)
        xf = x.contiguous(memory_format=fmt) if x.dim() == 4 else x
        data.seconds_per_call(lambda: step(xf), warmup, dev)
        return data.seconds_per_call(lambda: step(xf), steps, dev), model
    plain_args = argparse.Namespace(**{**vars(args), "amp": "none", "compile": False})
    plain, _ = seconds_per_step(torch.contiguous_format, plain_args)
    dt, model = seconds_per_step(torch.channels_last, args)
    flops = training_flops(model, x, cfg["kl_weight"]) / bs
    achieved = flops * bs / dt
    if dev.type == "cpu":
        # Not a peak: on some CPUs (AMD EPYC) torch's convolutions outrun its sgemm, so the
        # share can pass 100%. It is what this machine's BLAS does on a large square matmul.
        a = torch.randn(2048, 2048)
        best = min(data.seconds_per_call(lambda: a @ a, 1) for _ in range(5))
        ref, ref_name = 2 * 2048 ** 3 / best, "this CPU's fp32 2048^3 matmul rate (not a peak)"
        where = f"{torch.get_num_threads()} threads"
    else:
        where = torch.cuda.get_device_name(dev)
        ref = next((v[args.amp != "bf16"] for k, v in PEAKS.items() if k in where), None)
        ref_name = f"{where} dense {'bf16' if args.amp == 'bf16' else 'fp32'} peak"
    print(f"device {dev} ({where}), stage {args.stage}, {cfg['dataset']} {side}x{side}, batch "
          f"{bs}, amp {args.amp}, compile {args.compile}")
    share = f"  = {achieved / ref:.0%} of {ref_name} ({ref / 1e12:.2f} TFLOP/s)" if ref else ""
    print(f"{bs / dt:.1f} images/s  {dt * 1e3:.1f} ms/step  {flops / 1e9:.3f} GFLOP/image "
          f"(training)  {achieved / 1e12:.3f} TFLOP/s{share}")
    print(f"plain fp32 NCHW step: {bs / plain:.1f} images/s  {plain * 1e3:.1f} ms/step  -> "
          f"speed-up {plain / dt:.2f}x")


def main(argv=None):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
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
    finally:  # train() catches SIGINT/SIGTERM; give them back (forked processes must die by them)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
