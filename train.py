"""Train and evaluate the two-stage VAE with computed gamma (Asperti & Trentin 2020).

    python train.py --dataset cifar10 --stage 1   # stage-1 VAE, the paper's settings (4.1)
    python train.py --dataset cifar10 --stage 2   # stage-2 VAE on the stage-1 latents
    python train.py --dataset cifar10 --eval      # REC / GEN-1 / GEN-2 FID, mse, variance law

In reading order: the paper's settings (4.1, 4.2); the step (eq. 7 + k eq. 3, then section 3's
gamma); train(); evaluate() (sections 4-5); configure(), the one rule for where each setting
comes from; the command line; --bench; main().

Deviations from the paper and the released code:
- Epoch e's order and noise come from (seed, e): on the CPU a resume repeats an uninterrupted
  run.
- The per-epoch grids use batch statistics, --eval the moving averages as the paper does; the
  two differ until about 1,000 steps (README).
- CelebA l2: the paper (4.2) keeps l2 on the resampling kernels; the released code defines
  0.001 * sum(w^2) but never adds it to its loss. We add it.
- On CUDA the convolutions run in TF32 (PyTorch's default; TF1, the reference's, has no TF32):
  faster; its effect on Table 1 is not measured. fid.py turns it off.
- Evaluation: the paper's protocol, not the released adjust=True (which rescales the
  reconstructions' pixel std, GEN-1 latents by sqrt(variance law), GEN-2 latents per batch).
"""
import argparse
import copy
import json
import math
import os
import shlex
import sys
import time

import numpy as np
import torch

import data
import fid
import vae
from data import DataError

# --- The paper's settings (4.1, 4.2) ---------------------------------------------------------
# Per stage (1, 2). CIFAR-10 (4.1): 700 epochs at lr 1e-4 halved every 200; stage 2 1400
# epochs halved every 100. CelebA (4.2): 70 epochs at 5e-5 (its Table 3 runs: 1e-4 halved
# every 48), l2 kept on the down- and up-sampling kernels. Where the paper is silent, the
# released code's: CelebA's halving every 60 / 120 epochs, 140 stage-2 epochs, l2 weight 0.001.
PAPER = {
    "CIFAR-10": dict(epochs=(700, 1400), lr=(1e-4, 1e-4), halve_every=(200, 100), l2=(0, 0)),
    "CelebA": dict(epochs=(70, 140), lr=(5e-5, 5e-5), halve_every=(60, 120), l2=(1e-3, 0))}
# the data's settings: with each split's image count, the data's identity
DATA = ("dataset", "img_size", "resize", "jpeg", "limit", "seed")


def paper_defaults(dataset, side, stage):
    """Every setting of a stage as the paper (or, where silent, the released code) has it:
    CelebA's for its 64x64 images and any as large, else CIFAR-10's."""
    paper = "CelebA" if dataset == "celeba" or side >= 64 else "CIFAR-10"
    cfg = {k: v[stage - 1] for k, v in PAPER[paper].items()}
    return cfg | dict(
        paper=paper, dataset=dataset, img_size=side, resize="bilinear", jpeg=None,
        limit=None, seed=0, gamma="computed", batch_size=100,
        # k = pixels / 1024 in stage 1 (4.2), 1 on stage 2's latents
        kl_weight=vae.kl_weight_for(side) if stage == 1 else 1.0,
        # Fig. 1, Dai & Wipf's network: 64 latents (4.1), a scale a halving down to 4x4
        latent_dim=64, base_dim=32, fc_dim=512, num_scale=max(1, int(math.log2(side)) - 2),
        block_per_scale=1, depth_per_block=2,
        second_dim=2048 if side <= 32 else 4096, second_depth=3)


# the settings a flag may give
SETTINGS = set(paper_defaults("cifar10", 32, 1)) - {"paper", "epochs"}


# --- The step: eq. 7 + k * eq. 3 (+ l2), Adam, then the gamma update --------------------------
def make_step(model, opt, cfg, args):
    """One step: forward (bf16 autocast if asked), the loss in fp32, Adam, then the gamma
    update. Returns detached (loss, mse, kl), mu and log sigma, with no host sync."""
    # On CUDA a batch of 100 small images is bound by kernel launches, not arithmetic: CUDA
    # graphs ("reduce-overhead") replay the compiled forward and backward with one launch each.
    graphs = args.compile and args.device.type == "cuda"
    mode = "reduce-overhead" if graphs else None
    net = torch.compile(model, mode=mode) if args.compile else model
    amp = torch.autocast(args.device.type, torch.bfloat16, enabled=args.amp == "bf16")

    def step(x):
        if graphs:  # the last step's graph outputs are reused
            torch.compiler.cudagraph_mark_step_begin()
        with amp:
            outputs = net(x)
        # eq. 7 summed over the pixels, + k * eq. 3, at the current gamma
        loss, mse, kl = model.loss(x, outputs, cfg["kl_weight"])
        if cfg["l2"]:
            loss = loss + cfg["l2"] * model.l2_penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # after the step: the next batch sees the new gamma
        model.gamma.update(mse.detach())
        # mu, log sigma copied: a CUDA graph's outputs are overwritten by its next replay
        codes = (o.detach().float().clone() for o in outputs[1:])
        return torch.stack([loss, mse, kl]).detach(), *codes
    return step


def make_optimizer(model, lr, device):
    # Adam with TF1's defaults (paper 4); the fused kernel on CUDA computes the same update
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                            fused=device.type == "cuda")


def lr_at(cfg, epoch):
    """The initial lr halved every halve_every epochs (paper 4.1): epochs 0..h-1 at lr."""
    return cfg["lr"] * 0.5 ** (epoch // cfg["halve_every"])


# --- Training (section 4): stage 1 on images, stage 2 on stage-1 latents ----------------------
def train(args):
    """Set up (settings, network, Adam, batches), then each epoch: run it, save it, draw it."""
    cfg, cks, source = configure(args)
    stage, dev = args.stage, args.device
    torch.manual_seed(cfg["seed"])
    # a resume's: the weights (gamma's estimate too), Adam's moments, the metric rows
    ck = cks.get(stage, {})
    model = vae.build(cfg, stage, dev, ck.get("model"))
    opt = make_optimizer(model, cfg["lr"], dev)
    if ck:
        opt.load_state_dict(ck["optimizer"])
    history, start = ck.get("history", []), ck.get("epoch", 0)
    images = data.subset(load(cfg, "train"), cfg["limit"], cfg["seed"])
    bs = cfg["batch_size"]
    m1, grid = model, None  # the pictures' decoder, the recon grids' 32 training images
    if stage == 1:
        batches = data.Batches(images, bs, dev, seed=cfg["seed"])
        epoch_batches = batches.epoch
        todo = len(batches) * bs
        # spread over the split (a folder sorted by class), not its first 32
        pick = np.linspace(0, len(images) - 1, 32).astype(int)
        grid = batches.x[pick].permute(0, 3, 1, 2)
    else:
        m1 = restore(cks, 1, dev)
        epoch_batches, todo = data.latent_batches(m1, images, bs, cfg["seed"], dev)
    print_start(args, cfg, source, model, len(images), todo // bs, start)
    step = make_step(model, opt, cfg, args)
    for epoch in range(start, cfg["epochs"]):
        row = run_epoch(model, opt, step, cfg, stage, epoch, epoch_batches(epoch), todo)
        history.append(row)
        if not math.isfinite(row["loss"]):
            raise DataError(
                f"non-finite loss in epoch {epoch + 1}; {ckpt(args.out, stage)} keeps the "
                "last finished epoch (if any): try a lower --lr or --amp none")
        end_epoch(args.out, cfg, model, opt, history)
        grids = (epoch + 1) % args.sample_every == 0 or epoch + 1 == cfg["epochs"]
        m2 = model if stage == 2 else None
        write_pictures(history, m1, m2, grid, args.out, cfg["seed"], grids)


def load(cfg, which):
    """A split of the run's data ("train" or "test"), decoded as its settings say."""
    return data.load_split(cfg["dataset"], which, cfg["data_dir"], cfg["img_size"],
                           cfg["resize"], cfg["jpeg"])


def restore(cks, stage, device):
    """A stage's network as its checkpoint left it, in eval mode."""
    ck = cks[stage]
    return vae.build(ck["config"], stage, device, ck["model"]).eval()


def print_start(args, cfg, source, model, n, steps, start):
    """What a run is: data, network, the settings' source, steps (gamma and batch norm move
    by steps, not epochs), and where it starts."""
    total, side = cfg["images"]["train"], cfg["img_size"]
    drawn = f" of {total} (drawn from seed {cfg['seed']})" if n < total else ""
    params = sum(p.numel() for p in model.parameters())
    when = f"resuming at epoch {start + 1}" if start else "new run"
    print(f"stage {args.stage} on {describe(args.device)}: {cfg['dataset']} {n}{drawn} "
          f"train images {side}x{side}, {params:,} parameters, {cfg['gamma']} gamma, "
          f"lr {cfg['lr']:g}, batch {cfg['batch_size']}, {steps} steps an epoch; {when}, "
          f"{cfg['epochs']} epochs in all; settings: {source}; out {args.out}", flush=True)


def run_epoch(model, opt, step, cfg, stage, epoch, batches, todo):
    """One epoch's steps at its lr (4.1); its mean loss, mse and kl, eq. 6's statistics."""
    lr = lr_at(cfg, epoch)
    for group in opt.param_groups:
        group["lr"] = lr
    # the step's noise, like the batches' order, from (seed, epoch): a resume needs no saved
    # state. Seeded by a draw, so it is not the batches' own stream over again.
    g = data.epoch_generator(cfg["seed"], epoch)
    torch.manual_seed(int(torch.randint(2**62, (), generator=g)))
    desc = f"stage {stage} epoch {epoch + 1}/{cfg['epochs']}"
    t0 = time.time()
    model.train()
    # kept on the device: read once, at the end
    outputs = [step(x) for x in data.progress(batches, todo, desc, leave=False)]
    losses, mu, logsd = zip(*outputs)
    loss, mse, kl = torch.stack(losses).mean(0).tolist()
    stats, e_var = vae.latent_summary(torch.cat(mu), torch.cat(logsd))  # eq. 6, footnote 3
    seconds = time.time() - t0
    return dict(stage=stage, epoch=epoch + 1, loss=loss, kl=kl, mse=mse,
                gamma=model.gamma().item(), **stats, lr=lr, seconds=seconds,
                images_per_s=todo / seconds, latent_var=e_var.tolist())


def end_epoch(out, cfg, model, opt, history):
    """The checkpoint, then the stage's metrics from it (a kill leaves both whole, in step),
    then the epoch's line."""
    r, stage = history[-1], history[-1]["stage"]
    state = dict(config=cfg, model=model.state_dict(), optimizer=opt.state_dict(),
                 epoch=r["epoch"], history=history)
    data.atomic_write(ckpt(out, stage), lambda f: torch.save(state, f))
    rows = "".join(json.dumps(h) + "\n" for h in history).encode()
    metrics = os.path.join(out, f"metrics_stage{stage}.jsonl")
    data.atomic_write(metrics, lambda f: f.write(rows))
    n = len(r["latent_var"])
    print(f"stage {stage} epoch {r['epoch']}/{cfg['epochs']}  loss {r['loss']:.2f}  "
          f"mse {r['mse']:.5f}  kl {r['kl']:.2f}  gamma {r['gamma']:.4f}  "
          f"var_law {r['var_law']:.3f}  inactive {r['inactive']}/{n} "
          f"(E[sigma]: {r['inactive_code']})  lr {r['lr']:.2e}  "
          f"{r['images_per_s']:.0f} img/s  {r['seconds']:.1f}s", flush=True)


def write_pictures(history, m1, m2, grid, out, seed, grids):
    """Every epoch Fig. 6-7's heatmap of E[sigma^2] per latent (rows) and epoch (columns); every
    --sample-every epochs the sample grids, with the same noise each time."""
    stage, epochs = history[-1]["stage"], len(history)
    v = np.array([r["latent_var"] for r in history]).T  # (latents, epochs)
    # Fig. 6-7's rows: by the epoch each latent left the limbo (footnote 3's 0.8), then by
    # its last value
    left = np.where(v < 0.8, np.arange(epochs), epochs).min(1)
    order = np.lexsort((v[:, -1], left))
    name = "latent_variance2.png" if stage == 2 else "latent_variance.png"
    data.heatmap(v[order], os.path.join(out, name),
                 f"stage {stage}: E[sigma^2] of each latent (a row, sorted by the epoch it\n"
                 f"became active) in epochs 1-{epochs} (the columns, left to right)")
    if not grids:
        return
    # Batch statistics, as in training, on a copy: the grids follow the printed training mse
    # from the first epoch, while the moving averages --eval uses lag a short run behind.
    m1, g = copy.deepcopy(m1).train(), torch.Generator().manual_seed(seed)
    tag = f"stage2_e{epochs:04d}" if stage == 2 else f"e{epochs:04d}"
    if grid is not None:
        x = grid.float() / 255
        recon = vae.reconstruct(m1, x, g)[0]
        data.save_grid(data.to_uint8(x), os.path.join(out, f"recon_{tag}.png"),
                       f"stage 1 epoch {epochs}: training images and their reconstructions",
                       data.to_uint8(recon))
    z = vae.sample_latents(m1, m2, 64, g, next(m1.parameters()).device)
    data.save_grid(decode_all(m1, z), os.path.join(out, f"samples_{tag}.png"),
                   f"GEN-{stage} samples, stage {stage} epoch {epochs}")


@torch.no_grad()
def decode_all(m1, z, desc="decoding"):
    chunks = data.progress(z.split(500), len(z), desc, leave=False)
    return np.concatenate([data.to_uint8(m1.decode(c)) for c in chunks])


# --- Evaluation (sections 4-5): the paper's table row ----------------------------------------
@torch.no_grad()
def evaluate(args):
    """REC, GEN-1 and GEN-2 FID on --n-eval test images (10,000, the released code's number),
    the test mse, the variance law (eq. 6) and the inactive latents (footnote 3)."""
    cfg, cks, _ = configure(args)
    dev = args.device
    if args.latent_norm and 2 not in cks:
        raise DataError("--latent-norm rescales two-stage samples, but there is no stage2.pt")
    # first: offline, the weights fail in seconds, not after the sampling
    net = None if args.no_fid else fid.load_inception(args.inception, args.inception_weights, dev)
    m1 = restore(cks, 1, dev)
    short_run_note(cfg, cks[1]["epoch"])
    split = load(cfg, "test")
    # n test images, drawn from the seed where the split is larger: a folder sorted by class,
    # or CelebA's 19,962, of which the released code evaluates a random 10,000
    n = min(args.n_eval, len(split))
    test = data.subset(split, n, cfg["seed"]) if n < len(split) else split
    g = torch.Generator().manual_seed(cfg["seed"])
    rec, mse, mu, logsd = reconstruct(m1, test, g, dev)
    stats, e_var = vae.latent_summary(mu, logsd)
    z = vae.sample_latents(m1, None, n, g, dev)  # GEN-1: z ~ N(0, I)
    sets = dict(rec=rec, gen1=decode_all(m1, z, "GEN-1"))
    if 2 in cks:  # GEN-2: u ~ N(0, I) -> stage-2 decoder -> z -> stage-1 decoder
        z = vae.sample_latents(m1, restore(cks, 2, dev), n, g, dev)
        if args.latent_norm:  # 4.2: the mean per-latent std of z := sqrt(variance law)
            z = z * (math.sqrt(stats["var_law"]) / z.std(0).mean())
        sets["gen2"] = decode_all(m1, z, "GEN-2")
    fids = {}
    if net is not None:  # the real side cached beside the split's own cache
        folder = os.path.dirname(split.filename)
        fids = fid.score(net, test, sets, folder, protocol(cfg, n < len(split)))
    res = {f"{k}_fid": fids.get(k) for k in ("rec", "gen1", "gen2")}
    res.update(mse=mse, **stats, n=n, inception=args.inception if net else None,
               latent_norm=args.latent_norm,
               epochs=cks[1]["epoch"], epochs2=cks.get(2, {}).get("epoch"),
               settings={f"stage{s}": ck["config"] for s, ck in cks.items()})
    eval_pictures(args.out, test, sets, res)
    text = json.dumps(res, indent=1).encode()
    data.atomic_write(os.path.join(args.out, "eval.json"), lambda f: f.write(text))
    print_row(res, len(e_var))
    return res


def short_run_note(cfg, epochs):
    # batch norm's debiased averages (decay 0.999) weigh the statistics of ~1,000 steps
    n_train = cfg["limit"] or cfg["images"]["train"]
    steps = epochs * (n_train // cfg["batch_size"])
    if steps < 1000:
        print(f"note: stage 1 has trained {steps} steps; batch norm's moving averages (decay "
              "0.999) weigh all of them almost alike, the untrained first ones too, so the mse "
              "and pictures here lag far behind training's until about 1,000-3,000 steps")


def reconstruct(m1, test, g, dev):
    """REC as the released code: a sampled z = mu + sigma * eps decoded (uint8), the mse, and
    mu, log sigma of every test image."""
    batches = data.Batches(test, 500, dev, shuffle=False, drop_last=False)
    outputs, sse = [], 0
    for x in data.progress(batches.epoch(0), len(test), "REC"):
        r, mu, logsd = vae.reconstruct(m1, x, g)
        sse = sse + (x - r).square().sum()  # on the device; read once below
        outputs.append((data.to_uint8(r), mu, logsd))
    images, mu, logsd = zip(*outputs)
    mse = sse.item() / test.size
    return np.concatenate(images), mse, torch.cat(mu), torch.cat(logsd)


def protocol(cfg, drawn):
    """The words that name what the real images are, for fid.score's cache."""
    parts = [cfg["dataset"], "test", cfg["resize"], f"{cfg['img_size']}px"]
    if cfg["jpeg"]:
        parts.append(f"jpeg{cfg['jpeg']}")
    if drawn:
        parts.append(f"seed{cfg['seed']}")
    return parts


def eval_pictures(out, test, sets, res):
    pick = np.linspace(0, len(test) - 1, 32).astype(int)  # spread over a split sorted by class
    e1 = f"stage 1 epoch {res['epochs']}"  # what each grid's images depend on
    data.save_grid(test[pick], os.path.join(out, "eval_recon.png"),
                   f"REC, {e1}: test images and their reconstructions", sets["rec"][pick])
    data.save_grid(sets["gen1"][:64], os.path.join(out, "eval_gen1.png"),
                   f"GEN-1 samples, {e1}")
    if "gen2" in sets:
        data.save_grid(sets["gen2"][:64], os.path.join(out, "eval_gen2.png"),
                       f"GEN-2 samples, {e1}, stage 2 epoch {res['epochs2']}")


def print_row(res, latents):
    """The table row (Tables 1-4): FIDs, mse, the variance law and inactive latents, by the
    paper's E[sigma^2] and by the released code's E[sigma]."""
    fids = [f"{res[k]:6.1f}" if res[k] is not None else "     -"
            for k in ("rec_fid", "gen1_fid", "gen2_fid")]
    how = res["inception"] or "skipped"
    if res["latent_norm"]:
        how += ", latent norm"
    print(f"  epochs    REC  GEN-1  GEN-2     mse  var.law  inactive   (n={res['n']}, FID: {how})")
    print(f"{res['epochs']:>8} {' '.join(fids)} {res['mse']:7.4f} {res['var_law']:8.3f} "
          f"{res['inactive']:>6}/{latents}   E[sigma^2], the paper's definition")
    print(f"{'':>37} {res['var_law_code']:8.3f} {res['inactive_code']:>6}/{latents}   "
          "E[sigma], as the released code computes them")


# --- Settings, data and stage links: configure's rule ----------------------------------------
def configure(args):
    """The run's settings, its checkpoints ({stage: checkpoint}) and the settings' source. The
    one rule: a new run takes the paper's settings for its dataset, side and stage (4.1, 4.2;
    where it is silent, the released code's), then the flags given. --resume and --eval take
    every setting from the checkpoint; a new stage 2 takes stage 1's data and network, and
    its gamma policy unless --gamma is given. A given flag that contradicts them is refused.
    The data is its settings and its splits' image counts."""
    cks = checkpoints(args)
    cfg, source = settings(args, cks)
    if args.epochs:  # the one setting a resume may change
        cfg["epochs"] = args.epochs
        source += f", --epochs {args.epochs}"
    cfg["data_dir"] = os.path.abspath(args.data_dir or cfg.get("data_dir") or "data")
    now = {s: data.split_size(cfg["dataset"], s, cfg["data_dir"]) for s in ("train", "test")}
    was = cfg.setdefault("images", now)
    if was != now:
        raise DataError(
            f"{ckpt(args.out, 1)} was trained on {was['train']} train and {was['test']} test "
            f"images, but {cfg['data_dir']} has {now['train']} and {now['test']}: give --data-dir "
            "the run's data")
    if 2 in cks and cks[2]["config"]["stage1_epoch"] != cks[1]["epoch"]:
        raise DataError(
            f"{ckpt(args.out, 2)} was trained on stage 1 at epoch "
            f"{cks[2]['config']['stage1_epoch']}, but {ckpt(args.out, 1)} is now at epoch "
            f"{cks[1]['epoch']}: move stage2.pt away, then train stage 2 afresh or evaluate "
            "stage 1 alone")
    stage = args.stage
    if not args.eval and stage in cks and cks[stage]["epoch"] >= cfg["epochs"]:
        raise DataError(
            f"{ckpt(args.out, stage)} has trained {cks[stage]['epoch']} epochs already: "
            "pass a larger --epochs (the stage's total) to train more")
    return cfg, cks, source


def checkpoints(args):
    """What a run builds on: on --eval stage 1 and any stage 2; stage 1 for a new stage 2;
    the stage's own on --resume."""
    out, stage = args.out, args.stage
    if args.eval:
        stages = [1]
        if os.path.exists(ckpt(out, 2)):
            stages.append(2)
    else:
        if stage == 1 and os.path.exists(ckpt(out, 2)):
            raise DataError(
                f"{ckpt(out, 2)} was trained on stage 1 as it is now: move stage2.pt away "
                "first (or choose another --out), then train stage 1 further")
        if os.path.exists(ckpt(out, stage)) and not args.resume:
            raise DataError(
                f"{ckpt(out, stage)} exists: add --resume to continue it, or choose another "
                "--out for a new run")
        stages = list(range(1, stage + 1 if args.resume else stage))
    return {s: load_checkpoint(out, s, args.device) for s in stages}


def settings(args, cks):
    """(settings, their source) by configure's rule."""
    stage = 1 if args.eval else args.stage
    own = cks.get(stage)
    flags, fixed = args.flags, {}
    src = ckpt(args.out, 1)
    if own:  # --resume or --eval: every setting
        fixed = own["config"]
        src = ckpt(args.out, stage)
    elif cks:  # a new stage 2: stage 1's data and network
        for k in (*DATA, *vae.ARCH1, "images", "data_dir"):
            fixed[k] = cks[1]["config"][k]
    for k, v in flags.items():
        if k in fixed and fixed[k] != v:
            raise DataError(
                f"{words(k, v)} contradicts {src}, made with {words(k, fixed[k])}: leave "
                "the flag out, or choose another --out")
    if own:
        return dict(fixed), f"{src}'s"
    given = flags | fixed
    dataset = given.get("dataset", "cifar10")
    data_dir = os.path.abspath(args.data_dir or "data")
    side = given.get("img_size") or data.choose_img_size(dataset, data_dir)
    cfg = paper_defaults(dataset, side, stage)
    cfg["stage1_epoch"] = None
    source = [f"the paper's {cfg['paper']} settings"]
    if stage == 2:  # Dai & Wipf learn both stages' gammas: the policy goes on
        cfg["gamma"] = cks[1]["config"]["gamma"]
        cfg["stage1_epoch"] = cks[1]["epoch"]  # the stage 1 it builds on
        source[0] += f" and {src}'s data, network and gamma"
    for k, v in flags.items():
        if k not in fixed:
            source.append(words(k, v))
    return cfg | given, ", ".join(source)


def words(key, value):
    """A setting as a user says it: the flag and its value, or what None means."""
    if value is None:
        return {"jpeg": "no JPEG round trip", "limit": "all images"}[key]
    if isinstance(value, float):
        value = f"{value:g}"
    return f"--{key.replace('_', '-')} {value}"


def ckpt(out, stage):
    return os.path.join(out, f"stage{stage}.pt")


def load_checkpoint(out, stage, device):
    """A checkpoint, read without running code (weights_only), of this version's format."""
    path = ckpt(out, stage)
    if not os.path.exists(path):
        raise DataError(f"no checkpoint at {path}: train stage {stage} first "
                        f"(python train.py --stage {stage} --out {out})")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch's own message suggests weights_only=False: unsafe advice
        raise DataError(
            f"{path} cannot be read ({type(e).__name__}): it is truncated, corrupt or not a "
            "checkpoint of this program; delete it and train again, or point --out at an "
            "intact run") from None
    need = SETTINGS | {"images", "data_dir", "stage1_epoch"}
    missing = need - set(ck.get("config", {}))
    if missing:
        raise DataError(
            f"{path} was made by an earlier version of train.py (its settings lack "
            f"{', '.join(sorted(missing))}): train again, or use the version that made it")
    return ck


# --- Command line: every flag checked before any data is decoded ----------------------------
RANGES = dict(lr=(1e-12, 1e3), kl_weight=(0, 1e9), l2=(0, 1e9), seed=(0, 2**32), jpeg=(1, 95))


def parse_args(argv):
    p = argparse.ArgumentParser(usage="python train.py [flags]; --help lists them",
                                description=__doc__.splitlines()[0])
    a = p.add_argument
    # the settings: a flag left out is None, so it never contradicts a checkpoint
    a("--dataset", choices=data.DATASETS, help="cifar10 (default), celeba, folder (any images)")
    a("--img-size", type=int, help="image side: 32 (cifar10), 64 (celeba), a folder's own")
    a("--resize", choices=tuple(data.RESIZE_MODES),
      help="PIL filter, Fig. 3 (default bilinear)")
    a("--jpeg", type=int, help="a JPEG round trip at this quality (reference: 75; default none)")
    a("--limit", type=int, help="train on N training images drawn at random from --seed")
    a("--seed", type=int, help="random seed (0)")
    a("--latent-dim", type=int, help="latent variables (paper 4.1: 64)")
    a("--base-dim", type=int, help="channels of the first scale (32)")
    a("--fc-dim", type=int, help="width of the encoder's fc scale block (512)")
    a("--num-scale", type=int, help="encoder scales: log2(side) - 2")
    a("--second-dim", type=int, help="stage-2 width: 2048 for sides <= 32, else 4096")
    a("--gamma", choices=tuple(vae.GAMMAS),
      help="computed (the paper) or learned (Dai & Wipf); stage 2: stage 1's")
    a("--lr", type=float, help="initial Adam learning rate: 1e-4 (cifar10), 5e-5 (celeba)")
    a("--halve-every", type=int, help="halve the lr every N epochs: 200/100, 60/120 (celeba)")
    a("--batch-size", type=int, help="minibatch size (paper 4: 100)")
    a("--kl-weight", type=float, help="KL weight k: pixels/1024 in stage 1 (4.2), 1 in stage 2")
    a("--l2", type=float, help="weight on the resampling kernels: 0, 0.001 for celeba (4.2)")
    # the run
    a("--data-dir", help="data and its caches (default data); for folder, the image tree")
    a("--stage", type=int, default=1, choices=(1, 2), help="1: image VAE; 2: VAE on latents")
    a("--eval", action="store_true", help="evaluate stage1.pt (and stage2.pt) in --out")
    a("--bench", action="store_true", help="time training steps on synthetic data, then exit")
    a("--out", help="output folder (default runs/<dataset>)")
    a("--resume", action="store_true", help="continue this stage's checkpoint in --out")
    a("--epochs", type=int, help="total epochs: 700/1400 (cifar10), 70/140 (celeba)")
    a("--device", help="torch device (default cuda if available, else cpu)")
    a("--sample-every", type=int, default=50, help="sample grids every N epochs and the last")
    a("--amp", default="none", choices=("none", "bf16"), help="bf16 autocast of the networks")
    a("--compile", action=argparse.BooleanOptionalAction,
      help="torch.compile, CUDA graphs (default: on for stage 1 on CUDA, 3x the images/s)")
    # evaluation
    a("--n-eval", type=int, default=10000, help="test images and samples (released code: 10000)")
    a("--no-fid", action="store_true", help="--eval: mse and latent statistics only")
    a("--inception", default="torchvision", choices=("torchvision", "tf"),
      help="--eval: FID weights; tf gives FIDs comparable with the paper's")
    a("--inception-weights", help="--eval: a local Inception weights file (offline machines)")
    a("--latent-norm", action="store_true", help="--eval: GEN-2 latents scaled (paper 4.2)")
    return check(p.parse_args(argv))


def check(args):
    """Numbers in range, flags that fit together, the device; args.flags the settings given."""
    args.flags = {}
    for k, v in vars(args).items():
        if k in SETTINGS and v is not None:
            args.flags[k] = v
        low, high = RANGES.get(k, (1, 2**40))  # counts >= 1
        if type(v) in (int, float) and not low <= v <= high:  # NaN is in no range
            raise DataError(f"--{k.replace('_', '-')} {v} is out of range: give a number from "
                            f"{low:g} to {high:g} (--help lists the flags)")
    if not args.eval and (args.no_fid or args.latent_norm or args.inception_weights):
        raise DataError("--no-fid, --latent-norm and --inception-weights apply to --eval only")
    args.out = args.out or os.path.join("runs", args.dataset or "cifar10")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    count = torch.cuda.device_count()
    if args.device.type == "cuda" and (args.device.index or 0) >= count:
        raise DataError(
            f"--device {args.device}: this torch sees {count} CUDA devices (CUDA build: "
            f"{torch.version.cuda or 'none'}); leave --device out to use the CPU, or install "
            "torch's CUDA build (README)")
    if args.compile is None:  # measured on CUDA for stage 1 only
        args.compile = args.device.type == "cuda" and args.stage == 1
    return args


def describe(dev):
    """What the speed depends on: the GPU, or the CPU threads torch uses."""
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"{dev} ({torch.get_num_threads()} threads)"


# --- --bench: the step's speed ---------------------------------------------------------------
def bench(args, warmup=3, steps=10):
    """A plain fp32 step (NCHW memory, no autocast, no compile), then the step as configured,
    on synthetic data of the dataset's shape (no download)."""
    dev, stage = args.device, args.stage
    dataset = args.dataset or "cifar10"
    side = args.img_size or (32 if dataset == "cifar10" else 64)
    cfg = paper_defaults(dataset, side, stage) | args.flags
    bs = cfg["batch_size"]
    shape = (bs, 3, side, side) if stage == 1 else (bs, cfg["latent_dim"])
    x = torch.rand(shape, device=dev)
    plain = argparse.Namespace(**vars(args) | dict(amp="none", compile=False))
    runs = [("plain fp32 NCHW step", torch.contiguous_format, plain),
            (f"amp {args.amp}, compile {args.compile}", torch.channels_last, args)]
    dts = []
    for name, fmt, how in runs:
        model = vae.build(cfg, stage, dev).to(memory_format=fmt)
        step = make_step(model, make_optimizer(model, cfg["lr"], dev), cfg, how)
        if stage == 1:
            x = x.contiguous(memory_format=fmt)
        for n in (warmup, steps):  # the second round timed, queued GPU work included
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(n):
                step(x)
            sync(dev)
        dts.append((time.perf_counter() - t0) / steps)
        print(f"{describe(dev)}, stage {stage}, {dataset} {side}x{side}, batch {bs}, {name}: "
              f"{bs / dts[-1]:.1f} images/s, {dts[-1] * 1e3:.1f} ms/step", flush=True)
    print(f"speed-up of the configured step: {dts[0] / dts[1]:.2f}x")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv=None):
    argv, args = sys.argv[1:] if argv is None else list(argv), None
    try:
        args = parse_args(argv)
        if args.eval:
            evaluate(args)
        elif args.bench:
            bench(args)
        else:
            train(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a checkpoint is whole or absent: the last finished epoch
        interrupted(args, argv)
        sys.exit(130)


def interrupted(args, argv):
    """Ctrl-C: what was saved, and the command that goes on from there."""
    command = " ".join(["python train.py", *map(shlex.quote, argv)])
    kept = args and not (args.eval or args.bench) and ckpt(args.out, args.stage)
    if kept and os.path.exists(kept):
        if "--resume" not in argv:
            command += " --resume"
        said = f"{kept} keeps the last finished epoch; continue with\n  {command}"
    else:
        said = f"nothing was saved; start again with\n  {command}"
    print(f"\ninterrupted: {said}", file=sys.stderr)


if __name__ == "__main__":
    main()
