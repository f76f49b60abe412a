"""Train and evaluate the two-stage VAE with computed gamma (Asperti & Trentin 2020).

    python train.py --dataset cifar10 --stage 1   # stage-1 VAE, the paper's settings (4.1)
    python train.py --dataset cifar10 --stage 2   # stage-2 VAE on the stage-1 latents
    python train.py --dataset cifar10 --eval      # REC / GEN-1 / GEN-2 FID, mse, variance law

Deviations from the paper and the released code:
- Epoch e's order and noise come from (seed, e): on the CPU a resume repeats an uninterrupted
  run.
- The per-epoch grids use batch statistics, --eval the moving averages as the paper does; the
  two differ until about 1,000 steps (README).
- CelebA l2: the paper (4.2) adds 0.001 * sum(w^2) over the resampling kernels; the released
  code defines that term but never adds it. We follow the paper.
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
from PIL import Image, ImageDraw

import data
import vae
from data import DataError

# (stage 1, stage 2). CIFAR-10 (4.1): 700 epochs at 1e-4 halved every 200; stage 2 1400 epochs
# halved every 100. CelebA: 5e-5 and 70 epochs (4.2; its Table 3 runs: 1e-4 halved every 48),
# l2 0.001 on the resampling kernels; the halving every 60 / 120 and the 140 stage-2 epochs
# come from the released code's comments.
PAPER = {"CIFAR-10": dict(epochs=(700, 1400), lr=(1e-4, 1e-4), halve_every=(200, 100), l2=(0, 0)),
         "CelebA": dict(epochs=(70, 140), lr=(5e-5, 5e-5), halve_every=(60, 120), l2=(1e-3, 0))}
# The settings flags give: choices or type, and the paper's value; a flag left out is None.
DATA = dict(  # the data's settings: with each split's image count, its identity
    dataset=(data.DATASETS, "cifar10 (default), celeba, folder (any images)"),
    img_size=(int, "image side: 32 (cifar10), 64 (celeba), a folder's own"),
    resize=(tuple(data.RESIZE_MODES), "PIL filter, Fig. 3 (default bilinear)"),
    jpeg=(int, "a JPEG round trip at this quality, as the reference (75); default lossless"),
    limit=(int, "train on N training images drawn at random from --seed"),
    seed=(int, "random seed (0)"))
FLAGS = DATA | dict(  # the network (Fig. 1) and the training (4.1, 4.2)
    latent_dim=(int, "latent variables (paper 4.1: 64)"),
    base_dim=(int, "channels of the first scale (32)"),
    fc_dim=(int, "width of the encoder's fc scale block (512)"),
    num_scale=(int, "encoder scales: log2(side) - 2"),
    second_dim=(int, "stage-2 width: 2048 for sides <= 32, else 4096"),
    gamma=(tuple(vae.GAMMAS), "computed (the paper) or learned (Dai & Wipf)"),
    lr=(float, "initial Adam learning rate: 1e-4 (cifar10), 5e-5 (celeba)"),
    halve_every=(int, "halve the lr every N epochs: 200/100, 60/120 (celeba)"),
    batch_size=(int, "minibatch size (paper 4: 100)"),
    kl_weight=(float, "KL weight k: pixels/1024 in stage 1 (4.2), 1 in stage 2"),
    l2=(float, "weight on the resampling kernels: 0, 0.001 for celeba (4.2)"))
ARCH1 = ("latent_dim", "base_dim", "fc_dim", "num_scale", "block_per_scale", "depth_per_block")


def paper_defaults(dataset, side, stage):
    """Every setting of a stage as the paper (or, where silent, the released code) has it:
    CelebA's for its 64x64 images and any as large, else CIFAR-10's."""
    paper = "CelebA" if dataset == "celeba" or side >= 64 else "CIFAR-10"
    return {k: v[stage - 1] for k, v in PAPER[paper].items()} | dict(
        paper=paper, dataset=dataset, img_size=side, resize="bilinear", jpeg=None, limit=None,
        seed=0, gamma="computed", batch_size=100,
        kl_weight=vae.kl_weight_for(side) if stage == 1 else 1.0,  # k = pixels/1024 (4.2)
        latent_dim=64, base_dim=32, fc_dim=512, num_scale=max(1, int(math.log2(side)) - 2),
        block_per_scale=1, depth_per_block=2, second_dim=2048 if side <= 32 else 4096,
        second_depth=3)


# --- Training (paper section 4): stage 1 on images, stage 2 on stage-1 latents ---------------
def make_step(model, opt, cfg, args):
    """One step: forward (bf16 autocast if asked), eq. 7 + k * eq. 3 (+ l2) in fp32, Adam, then
    the gamma update. Returns detached (loss, kl, mse), mu and log sigma, with no host sync."""
    # On CUDA a batch of 100 small images is bound by kernel launches, not arithmetic: CUDA
    # graphs ("reduce-overhead") replay the compiled forward and backward with one launch each.
    graphs = args.compile and args.device.type == "cuda"
    mode = "reduce-overhead" if graphs else None
    net = torch.compile(model, mode=mode) if args.compile else model
    amp = torch.autocast(args.device.type, torch.bfloat16, enabled=args.amp == "bf16")

    def step(x):
        if graphs:
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
        return torch.stack([loss, kl, mse]).detach(), *(o.detach().float().clone() for o in out[1:])
    return step


def make_optimizer(model, lr, device):
    # Adam with TF1's defaults (paper 4); the fused kernel on CUDA computes the same update.
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                            fused=device.type == "cuda")


def lr_at(cfg, epoch):
    """The initial lr halved every halve_every epochs (paper 4.1): epochs 0..h-1 at lr."""
    return cfg["lr"] * 0.5 ** (epoch // cfg["halve_every"])


def train(args):
    (cfg, cks, source), stage, dev, out = configure(args), args.stage, args.device, args.out
    torch.manual_seed(cfg["seed"])
    ck = cks.get(stage, {})  # a resume's: the weights (gamma's estimate too), Adam's moments
    model, history = build(cfg, stage, dev, ck.get("model")), ck.get("history", [])
    opt, start = make_optimizer(model, cfg["lr"], dev), ck.get("epoch", 0)
    if ck:
        opt.load_state_dict(ck["optimizer"])
    split = data.load_split(cfg["dataset"], "train", cfg["data_dir"], cfg["img_size"],
                            cfg["resize"], cfg["jpeg"])
    images, bs = data.subset(split, cfg["limit"], cfg["seed"]), cfg["batch_size"]
    m1, fixed = model, None  # the pictures' stage 1, and the 32 images its grids reconstruct
    if stage == 1:
        batches = data.Batches(images, bs, dev, seed=cfg["seed"])
        epochs, todo = batches.epoch, len(batches) * bs
        # spread over the split (a folder sorted by class), not its first 32
        fixed = batches.x[np.linspace(0, len(images) - 1, 32).astype(int)].permute(0, 3, 1, 2)
    else:
        m1 = build(cks[1]["config"], 1, dev, cks[1]["model"]).eval()
        epochs, todo = data.latent_batches(m1, images, bs, cfg["seed"], dev)
    drawn = f" of {len(split)} (drawn from seed {cfg['seed']})" * (len(images) < len(split))
    print(f"stage {stage} on {describe(dev)}: {cfg['dataset']} {len(images)}{drawn} train images "
          f"{cfg['img_size']}x{cfg['img_size']}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters, {cfg['gamma']} gamma, lr {cfg['lr']:g}, batch {bs}; "
          f"{f'resuming at epoch {start + 1}' if start else 'new run'}, {cfg['epochs']} epochs "
          f"in all; settings: {source}; out {out}", flush=True)
    step = make_step(model, opt, cfg, args)
    for epoch in range(start, cfg["epochs"]):
        for group in opt.param_groups:
            group["lr"] = lr = lr_at(cfg, epoch)
        # the step's noise, like the batches' order, from (seed, epoch): a resume needs no saved
        # state. Seeded by a draw, so it is not the batches' own stream over again.
        g = data.epoch_generator(cfg["seed"], epoch)
        torch.manual_seed(int(torch.randint(2**62, (), generator=g)))
        t0, rec, desc = time.time(), [], f"stage {stage} epoch {epoch + 1}/{cfg['epochs']}"
        model.train()
        for x in data.progress(epochs(epoch), todo, desc, leave=False):
            rec.append(step(x))  # eq. 7 + k * eq. 3, Adam, the gamma update; kept on the device
        (loss, kl, mse), mu, logsd = torch.stack([r[0] for r in rec]).mean(0).tolist(), *(
            torch.cat([r[i] for r in rec]) for i in (1, 2))
        if not math.isfinite(loss):
            raise DataError(f"non-finite loss in epoch {epoch + 1}; {ckpt(out, stage)} keeps the "
                            "last finished epoch (if any): try a lower --lr or --amp none")
        stats, e_var = vae.latent_summary(mu, logsd)  # eq. 6, footnote 3
        seconds, gamma = time.time() - t0, model.gamma().item()
        history.append(dict(stage=stage, epoch=epoch + 1, loss=loss, kl=kl, mse=mse, gamma=gamma,
                            **stats, lr=lr, seconds=seconds, images_per_s=todo / seconds,
                            latent_var=e_var.tolist()))
        # the checkpoint, then the stage's metrics from it: a kill leaves both whole, in step
        state = dict(config=cfg, model=model.state_dict(), optimizer=opt.state_dict(),
                     epoch=epoch + 1, history=history)
        data.atomic_write(ckpt(out, stage), lambda f: torch.save(state, f))
        rows = "".join(json.dumps(r) + "\n" for r in history).encode()
        data.atomic_write(os.path.join(out, f"metrics_stage{stage}.jsonl"), lambda f: f.write(rows))
        print(f"{desc}  loss {loss:.2f}  mse {mse:.5f}  kl {kl:.2f}  gamma {gamma:.4f}  var_law "
              f"{stats['var_law']:.3f}  inactive {stats['inactive']}/{len(e_var)} (E[sigma]: "
              f"{stats['inactive_code']})  lr {lr:.2e}  {todo / seconds:.0f} img/s  "
              f"{seconds:.1f}s", flush=True)
        grids = (epoch + 1) % args.sample_every == 0 or epoch + 1 == cfg["epochs"]
        write_pictures(history, m1, model if stage == 2 else None, fixed, out, cfg["seed"], grids)


# --- Settings, data and stage links: one rule each, in configure's docstring ---------------
def configure(args):
    """The run's settings, the checkpoints it uses ({stage: checkpoint}) and their source. A new
    run takes the paper's settings for its dataset, side and stage (4.1, 4.2; where it is silent,
    the released code's), then the flags given; --resume, stage 2 and --eval take the checkpoint's
    and refuse a flag that contradicts them. The data is its settings and its splits' sizes."""
    stage, out, old = 1 if args.eval else args.stage, args.out, args.resume or args.eval
    if not args.eval and stage == 1 and os.path.exists(ckpt(out, 2)):
        raise DataError(f"{ckpt(out, 2)} was trained on stage 1 as it is now: move stage2.pt "
                        "away first (or choose another --out), then train stage 1 further")
    if os.path.exists(ckpt(out, stage)) and not old:
        raise DataError(f"{ckpt(out, stage)} exists: add --resume to continue it, or choose "
                        "another --out for a new run")
    # what the run builds on: stage 1 for stage 2, its own on --resume, both (if any) on --eval
    cks = {s: load_checkpoint(out, s, args.device) for s in (1, 2) if s < stage or s == stage
           and old or args.eval and os.path.exists(ckpt(out, s))}
    own = cks.get(stage)  # a resume's or --eval's: every setting; a new stage 2: stage 1's data
    src, flags = ckpt(out, stage if own else 1), args.flags
    fixed = own["config"] if own else {k: cks[1]["config"][k] for k in
                                       (*DATA, *ARCH1, "images", "data_dir")} if cks else {}
    for k, v in flags.items():
        if k in fixed and fixed[k] != v:
            raise DataError(f"{words(k, v)} contradicts {src}, made with {words(k, fixed[k])}: "
                            "leave the flag out, or choose another --out")
    cfg, source = dict(fixed), [f"{src}'s"]
    if not own:
        dataset = fixed.get("dataset") or flags.get("dataset", "cifar10")
        side = (fixed.get("img_size") or flags.get("img_size")
                or data.choose_img_size(dataset, args.data_dir or "data")[0])
        cfg = paper_defaults(dataset, side, stage) | flags | fixed
        cfg["stage1_epoch"] = cks[1]["epoch"] if stage == 2 else None  # the stage 1 it builds on
        source = [f"the paper's {cfg['paper']} settings" + f" and {src}'s data and network" * (
            stage == 2)] + [words(k, v) for k, v in flags.items() if k not in fixed]
    cfg["epochs"] = args.epochs or cfg["epochs"]  # the one setting a resume may change
    cfg["data_dir"] = os.path.abspath(args.data_dir or cfg.get("data_dir") or "data")
    now = {s: data.split_size(cfg["dataset"], s, cfg["data_dir"]) for s in ("train", "test")}
    if cfg.setdefault("images", now) != now:
        raise DataError(f"{src} was trained on {cfg['images']['train']} train and "
                        f"{cfg['images']['test']} test images, but {cfg['data_dir']} has "
                        f"{now['train']} and {now['test']}: give --data-dir the run's data")
    if 2 in cks and cks[2]["config"]["stage1_epoch"] != cks[1]["epoch"]:
        raise DataError(f"{ckpt(out, 2)} was trained on stage 1 at epoch "
                        f"{cks[2]['config']['stage1_epoch']}, but {ckpt(out, 1)} is now at epoch "
                        f"{cks[1]['epoch']}: move stage2.pt away, then train stage 2 afresh or "
                        "evaluate stage 1 alone")
    if not args.eval and stage in cks and cks[stage]["epoch"] >= cfg["epochs"]:
        raise DataError(f"{ckpt(out, stage)} has trained {cks[stage]['epoch']} epochs already: "
                        "pass a larger --epochs (the stage's total) to train more")
    return cfg, cks, ", ".join(source + [f"--epochs {args.epochs}"] * bool(args.epochs))


def words(key, value):  # a setting as a user says it: the flag and its value, or what None means
    if value is None:
        return {"jpeg": "no JPEG round trip", "limit": "all images"}[key]
    return f"--{key.replace('_', '-')} {f'{value:g}' if isinstance(value, float) else value}"


def ckpt(out, stage):
    return os.path.join(out, f"stage{stage}.pt")


def load_checkpoint(out, stage, device):
    if not os.path.exists(ckpt(out, stage)):
        raise DataError(f"no checkpoint at {ckpt(out, stage)}: train stage {stage} first "
                        f"(python train.py --stage {stage} --out {out})")
    try:
        return torch.load(ckpt(out, stage), map_location=device, weights_only=True)
    except Exception as e:  # torch's own message suggests weights_only=False: unsafe advice
        raise DataError(f"{ckpt(out, stage)} cannot be read ({type(e).__name__}): it is "
                        "truncated, corrupt or not a checkpoint of this program; delete it and "
                        "train again, or point --out at an intact run") from None


def build(cfg, stage, device="cpu", state=None):
    """The stage's network from its settings, and a checkpoint's weights if given."""
    try:
        model = vae.SecondStage(cfg["latent_dim"], cfg["second_dim"], cfg["second_depth"],
                                cfg["gamma"]) if stage == 2 else vae.VAE(
            cfg["img_size"], *(cfg[k] for k in ARCH1), gamma=cfg["gamma"])
    except ValueError as e:  # checked before any data is decoded
        raise DataError(f"{e}: choose another --img-size or --num-scale") from None
    model = model.to(device, memory_format=torch.channels_last)
    if state is not None:
        model.load_state_dict(state)
    return model


# --- Evaluation (paper 4-5): REC, GEN-1, GEN-2 FID on 10,000 test images, mse, eq. 6, fn. 3 --
@torch.no_grad()
def evaluate(args):
    (cfg, cks, _), dev, out = configure(args), args.device, args.out
    if args.latent_norm and 2 not in cks:
        raise DataError("--latent-norm rescales two-stage samples, but there is no stage2.pt")
    if not args.no_fid:  # first: offline, the weights fail in seconds, not after the sampling
        import fid
        net = fid.load_inception(args.inception, args.inception_weights, dev)
    m1, m2 = (build(cks[s]["config"], s, dev, cks[s]["model"]).eval() if s in cks else None
              for s in (1, 2))
    # batch norm's debiased averages (decay 0.999) weigh the statistics of the last ~1,000 steps
    n_train = min(cfg["limit"] or math.inf, cfg["images"]["train"])
    if (steps := cks[1]["epoch"] * int(n_train // cfg["batch_size"])) < 1000:
        print(f"note: stage 1 has trained {steps} steps; batch norm's moving averages (decay "
              "0.999) weigh all of them almost alike, the untrained first ones too, so the mse "
              "and pictures here lag far behind training's until about 1,000-3,000 steps")
    split = data.load_split(cfg["dataset"], "test", cfg["data_dir"], cfg["img_size"],
                            cfg["resize"], cfg["jpeg"])
    # n test images drawn from the seed when the split is larger: a folder sorted by class, or
    # CelebA's 19,962, of which the released code evaluates a random 10,000
    n = min(args.n_eval, len(split))
    test = data.subset(split, n, cfg["seed"]) if n < len(split) else split
    g, rec, sse = torch.Generator().manual_seed(cfg["seed"]), [], 0
    for x in data.progress(data.Batches(test, 500, dev, False, False).epoch(0), n, "REC"):
        r, mu, logsd = vae.reconstruct(m1, x, g)  # REC: a sampled z decoded, as released
        sse = sse + (x - r).square().sum()  # on the device; read once below
        rec.append((data.to_uint8(r), mu, logsd))
    stats, e_var = vae.latent_summary(*(torch.cat([r[i] for r in rec]) for i in (1, 2)))
    sets = dict(rec=np.concatenate([r[0] for r in rec]),  # GEN-1: z ~ N(0, I)
                gen1=decode_all(m1, vae.sample_latents(m1, None, n, g, dev), "GEN-1"))
    if m2 is not None:  # GEN-2: u ~ N(0, I) -> stage-2 decoder -> z -> stage-1 decoder
        z = vae.sample_latents(m1, m2, n, g, dev)
        if args.latent_norm:  # paper 4.2: mean per-latent std of generated z := sqrt(var law)
            z = z * (math.sqrt(stats["var_law"]) / z.std(0).mean())
        sets["gen2"] = decode_all(m1, z, "GEN-2")
    res = dict(rec_fid=None, gen1_fid=None, gen2_fid=None, mse=sse.item() / test.size, **stats,
               n=n, inception=None if args.no_fid else args.inception, latent_norm=
               args.latent_norm, epochs=cks[1]["epoch"], epochs2=m2 and cks[2]["epoch"])
    if not args.no_fid:  # the real side cached per data protocol, network and n, beside the
        # split's own cache (never inside a user's image folder)
        name = "_".join(["fid_stats", cfg["dataset"], "test", cfg["resize"], f"{cfg['img_size']}px"]
                        + [f"jpeg{cfg['jpeg']}"] * bool(cfg["jpeg"]) + [f"seed{cfg['seed']}"] * (
                            n < len(split)) + [f"n{n}", args.inception])
        real = fid.cached_stats(os.path.join(os.path.dirname(split.filename), name + ".npz"),
                                lambda: fid.feature_stats(net, test, desc="FID real"))
        for k, imgs in sets.items():
            res[f"{k}_fid"] = fid.frechet_distance(*real, *fid.feature_stats(
                net, imgs, desc=f"FID {k}"))
    pick = np.linspace(0, n - 1, 32).astype(int)  # spread over a split sorted by class
    e1 = f"stage 1 epoch {res['epochs']}"  # what each grid's images depend on
    at = dict(rec=e1, gen1=e1, gen2=f"{e1}, stage 2 epoch {res['epochs2']}")
    save_grid(test[pick], os.path.join(out, "eval_recon.png"), f"REC, {at['rec']}: test images "
              "and their reconstructions", sets.pop("rec")[pick])
    for k, imgs in sets.items():
        save_grid(imgs[:64], os.path.join(out, f"eval_{k}.png"), f"GEN-{k[-1]} samples, {at[k]}")
    text = json.dumps(res, indent=1).encode()
    data.atomic_write(os.path.join(out, "eval.json"), lambda f: f.write(text))
    fids = [f"{res[k]:6.1f}" if res[k] else "     -" for k in ("rec_fid", "gen1_fid", "gen2_fid")]
    print(f"  epochs    REC  GEN-1  GEN-2     mse  var.law  inactive   (n={n}, FID: "
          f"{res['inception'] or 'skipped'}{', latent norm' * args.latent_norm})\n"
          f"{res['epochs']:>8} {' '.join(fids)} {res['mse']:7.4f} {res['var_law']:8.3f} "
          f"{res['inactive']:>6}/{len(e_var)}   E[sigma^2], the paper's definition\n{'':>37} "
          f"{res['var_law_code']:8.3f} {res['inactive_code']:>6}/{len(e_var)}   E[sigma], as the "
          "released code computes them")
    return res


# --- Pictures (Pillow only): labelled grids, the latent-variance heatmap (Fig. 6-7) ---------
@torch.no_grad()
def decode_all(m1, z, desc="decoding"):
    chunks = data.progress(z.split(500), len(z), desc, leave=False)
    return np.concatenate([data.to_uint8(m1.decode(c)) for c in chunks])


def save_grid(images, path, title, recon=None, texts=(), ncol=8, pad=2, top=20):
    """uint8 images (N, H, W, 3) in rows of `ncol` under a title, small ones enlarged (32 px 2x);
    with `recon`, rows of originals alternate with rows of their reconstructions, each named;
    `texts` [(x, y, text, colour)] are written over the first image."""
    left = 0 if recon is None else 60
    if recon is not None:  # whole rows only
        n, shape = len(images) // ncol * ncol, (-1, ncol, *images.shape[1:])
        images = np.stack([images[:n].reshape(shape), recon[:n].reshape(shape)], 1)
    k = max(1, 64 // images.shape[-2])  # a 32 px image is small on screen: twice its size
    images = images.reshape(-1, *images.shape[-3:]).repeat(k, 1).repeat(k, 2)
    (n, h, w, _), rows = images.shape, -(-len(images) // ncol)
    grid = np.full((top + rows * (h + pad) + pad, left + ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        y, x = top + pad + i // ncol * (h + pad), left + pad + i % ncol * (w + pad)
        grid[y:y + h, x:x + w] = img
    img = Image.fromarray(grid)
    draw = ImageDraw.Draw(img)
    draw.multiline_text((pad, 5), title, fill="black")
    for r in range(rows) if left else ():
        draw.text((pad, top + r * (h + pad) + h // 2), ("original", "recon")[r % 2], fill="black")
    for x, y, text, colour in texts:
        draw.text((left + pad + x, top + pad + y), text, fill=colour)
    data.atomic_write(path, lambda f: img.save(f, format="PNG"))


def write_pictures(history, m1, m2, fixed, out, seed, grids):
    """Every epoch Fig. 6-7's heatmap: E[sigma^2] per latent (rows, sorted by the epoch each became
    active) and epoch (columns), dark blue 0 (active) to yellow 1, a colour scale marking footnote
    3's threshold 0.8; every --sample-every epochs the sample grids, with the same noise each."""
    stage, epochs = history[-1]["stage"], len(history)
    v = np.array([r["latent_var"] for r in history]).T  # (latents, epochs)
    first = np.where(v < 0.8, np.arange(epochs), epochs).min(1)  # the epoch it left the limbo
    colours = lambda a: np.stack([np.interp(a, (0, 0.5, 1), c) for c in (  # R, G, B at 0, .5, 1
        (20, 40, 250), (30, 150, 230), (90, 140, 60))], -1).astype(np.uint8)
    cells = colours(v[np.lexsort((v[:, -1], first))]).repeat(6, 0).repeat(max(1, 600 // epochs), 1)
    h, w = max(len(cells), 100), cells.shape[1]
    canvas = np.full((h, w + 110, 3), 255, np.uint8)
    canvas[:len(cells), :w] = cells
    canvas[:, w + 20:w + 32] = colours(np.linspace(1, 0, h))[:, None]  # the scale, 1 at the top
    ticks = [(t, round((1 - t) * (h - 1))) for t in (0, 0.5, 0.8, 1)]
    for t, y in ticks:
        canvas[y, w + 17:w + 36] = (255, 0, 0) if t == 0.8 else 0
    save_grid(canvas[None], os.path.join(out, f"latent_variance{'2' * (stage == 2)}.png"),
              f"stage {stage}: E[sigma^2] of each latent (a row, sorted by the epoch it\nbecame "
              f"active) in epochs 1-{epochs} (the columns, left to right)", ncol=1, top=34, texts=[
                  (w + 38, y - 5, f"{t:g}" + " inactive" * (t == 0.8), "red" if t == 0.8
                   else "black") for t, y in ticks])
    if not grids:
        return
    # Batch statistics, as in training, on a copy: the grids follow the printed training mse
    # from the first epoch, while the moving averages --eval uses lag a short run behind.
    m1, g = copy.deepcopy(m1).train(), torch.Generator().manual_seed(seed)
    tag = f"{'stage2_' * (stage == 2)}e{epochs:04d}"
    if fixed is not None:
        x = fixed.float() / 255
        save_grid(data.to_uint8(x), os.path.join(out, f"recon_{tag}.png"), f"stage 1 epoch "
                  f"{epochs}: training images and their reconstructions",
                  data.to_uint8(vae.reconstruct(m1, x, g)[0]))
    z = vae.sample_latents(m1, m2, 64, g, next(m1.parameters()).device)
    save_grid(decode_all(m1, z), os.path.join(out, f"samples_{tag}.png"),
              f"GEN-{stage} samples, stage {stage} epoch {epochs}")


# --- Command line: every flag checked before any data is decoded ----------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(usage="python train.py [flags]; --help lists them",
                                description=__doc__.splitlines()[0])
    a = p.add_argument
    for k, (kind, text) in FLAGS.items():
        a("--" + k.replace("_", "-"), help=text, **{
            "choices" if isinstance(kind, tuple) else "type": kind})
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
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile, CUDA graphs "
      "(default: on for stage 1 on CUDA, where it was measured: 3x the images/s on an H200)")
    a("--n-eval", type=int, default=10000, help="--eval: test images and samples (paper: 10000)")
    a("--no-fid", action="store_true", help="--eval: mse and latent statistics only")
    a("--inception", default="torchvision", choices=("torchvision", "tf"),
      help="--eval: FID weights; tf gives FIDs comparable with the paper's")
    a("--inception-weights", help="--eval: a local Inception weights file (offline machines)")
    a("--latent-norm", action="store_true", help="--eval: GEN-2 latents scaled (paper 4.2)")
    args = p.parse_args(argv)
    # the settings flags given: one left out is None, so it never contradicts a checkpoint
    args.flags = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    for k, v in vars(args).items():  # numbers in range: --lr above 0, --jpeg 1-95, counts >= 1
        low, high = dict(lr=(1e-12, 1e3), kl_weight=(0, 1e9), l2=(0, 1e9), seed=(0, 2**32),
                         jpeg=(1, 95)).get(k, (1, 2**40))
        if type(v) in (int, float) and not low <= v <= high:  # NaN is in no range
            raise DataError(f"--{k.replace('_', '-')} {v} is out of range: give a number from "
                            f"{low:g} to {high:g} (--help lists the flags)")
    if not args.eval and (args.no_fid or args.latent_norm or args.inception_weights):
        raise DataError("--no-fid, --latent-norm and --inception-weights apply to --eval only")
    args.out = args.out or os.path.join("runs", args.dataset or "cifar10")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and (args.device.index or 0) >= torch.cuda.device_count():
        raise DataError(f"--device {args.device}: this torch sees {torch.cuda.device_count()} "
                        f"CUDA devices (CUDA build: {torch.version.cuda or 'none'}); leave "
                        "--device out to use the CPU, or install torch's CUDA build (README)")
    if args.compile is None:
        args.compile = args.device.type == "cuda" and args.stage == 1
    return args


def describe(dev):  # what the speed depends on: the GPU, or the CPU threads torch uses
    return (f"{dev} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda"
            else f"{dev} ({torch.get_num_threads()} threads)")


def bench(args, warmup=3, steps=10):
    """--bench: a plain fp32 step (NCHW memory, no autocast, no compile), then the step as
    configured, on synthetic data of the dataset's shape (no download)."""
    dev, dataset, stage = args.device, args.dataset or "cifar10", args.stage
    side = args.img_size or (32 if dataset == "cifar10" else 64)
    cfg = paper_defaults(dataset, side, stage) | args.flags
    bs, sync = cfg["batch_size"], torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    x = torch.rand((bs, 3, side, side) if stage == 1 else (bs, cfg["latent_dim"]), device=dev)
    plain, dts = argparse.Namespace(**{**vars(args), "amp": "none", "compile": False}), []
    for name, fmt, a in (("plain fp32 NCHW step", torch.contiguous_format, plain),
                         (f"amp {args.amp}, compile {args.compile}", torch.channels_last, args)):
        model = build(cfg, stage, dev).to(memory_format=fmt)
        step = make_step(model, make_optimizer(model, cfg["lr"], dev), cfg, a)
        for n in (warmup, steps):  # the second round timed, queued GPU work included
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                step(x.contiguous(memory_format=fmt) if stage == 1 else x)
            sync()
        dts.append((time.perf_counter() - t0) / steps)
        print(f"{describe(dev)}, stage {stage}, {dataset} {side}x{side}, batch {bs}, {name}: "
              f"{bs / dts[-1]:.1f} images/s, {dts[-1] * 1e3:.1f} ms/step", flush=True)
    print(f"speed-up of the configured step: {dts[0] / dts[1]:.2f}x")


def main(argv=None):
    argv, args = sys.argv[1:] if argv is None else list(argv), None
    try:
        args = parse_args(argv)
        evaluate(args) if args.eval else bench(args) if args.bench else train(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a checkpoint is whole or absent: the last finished epoch
        command = " ".join(["python train.py", *map(shlex.quote, argv)])
        kept = args and not (args.eval or args.bench) and ckpt(args.out, args.stage)
        if kept and os.path.exists(kept):
            said = f"{kept} keeps the last finished epoch; continue with\n  {command}" + (
                " --resume" * ("--resume" not in argv))
        else:
            said = f"nothing was saved; start again with\n  {command}"
        print(f"\ninterrupted: {said}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
