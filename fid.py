"""FID (Frechet Inception Distance) in plain PyTorch: the paper's evaluation metric.

The paper scores reconstructions and samples against 10,000 test images by FID (sections 4-5):
only `--inception tf` (pytorch-fid's port of the 2015-12-05 TF graph) matches its scale, not
torchvision's weights (the default). `score` is what --eval calls: each image set against the
real images' statistics, cached under a name of all they depend on. `python fid.py A B` prints
an FID; --save-stats saves A's statistics.

Deviations from pytorch-fid:
- tr sqrtm(s1 s2) by symmetric eigh: finite with fewer images than features (pytorch-fid refuses).
- Batch norm folded into the convolutions, channels-last, TF32 off: faster, the same features.
- Images are uint8 (generated ones quantised by the caller); at most 2048 of them: a warning.
"""
import argparse
import functools
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import DataError, atomic_write, list_images, progress, read_image

# each name ends in the SHA-256 prefix that torch.hub's check_hash verifies
URLS = {
    "torchvision":
        "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
    "tf":
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth"}
# the classifier sizes tell the two files apart
FC_CLASSES = {"torchvision": 1000, "tf": 1008}
# classifier heads: FID uses the 2048-d pool features before them
IGNORED = ("fc.", "AuxLogits.")


class Conv(nn.Module):
    """torchvision's BasicConv2d: conv without bias, batch norm, ReLU."""

    def __init__(self, cin, cout, k, stride=1, padding="same"):
        super().__init__()
        padding = 0 if stride > 1 else padding  # the strided ones never pad
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        # inference only: batch norm folded into the conv, a fifth less time
        c, bn = self.conv, self.bn
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        weight = c.weight * scale[:, None, None, None]
        bias = bn.bias - bn.running_mean * scale
        return F.relu_(F.conv2d(x, weight, bias, c.stride, c.padding))


def _chain(x, *layers):
    """The layers in turn; a list among them is a fork, its outputs concatenated."""
    for layer in layers:
        if isinstance(layer, list):
            x = torch.cat([f(x) for f in layer], 1)
        else:
            x = layer(x)
    return x


class Mixed(nn.Module):
    """Branches on one input, concatenated, their convs under torchvision's names."""

    def __init__(self, **branches):
        super().__init__()
        self.branches = list(branches.values())
        for name, layers in branches.items():
            convs = [c for c in layers if isinstance(c, (Conv, list))]
            for i, layer in enumerate(convs, 1):
                # a fork's two convs are _ia and _ib; a lone conv takes the branch's name
                forked = zip("ab", layer) if isinstance(layer, list) else [("", layer)]
                for ab, conv in forked:
                    key = name if len(convs) == 1 else f"{name}_{i}{ab}"
                    self.add_module(key, conv)

    def forward(self, x):
        return torch.cat([_chain(x, *b) for b in self.branches], 1)


avg_pool = functools.partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1)
# the grid reductions' pool
max_pool = functools.partial(F.max_pool2d, kernel_size=3, stride=2)
# The TF graph's four pool branches (pytorch-fid's "Patch"es) differ from torchvision's:
# A, C and 7b average without the padding; 7c max-pools, a slip in the TF graph.
tf_avg_pool = functools.partial(avg_pool, count_include_pad=False)
tf_max_pool = functools.partial(F.max_pool2d, kernel_size=3, stride=1, padding=1)


def fork():
    """InceptionE's 1x3 and 3x1 convolutions side by side."""
    return [Conv(384, 384, (1, 3)), Conv(384, 384, (3, 1))]


class InceptionV3(nn.Module):
    """torchvision's Inception3 up to the 2048-d pool, without the classifier."""

    def __init__(self, variant="torchvision"):
        super().__init__()
        self.variant = variant
        pool, pool_7c = avg_pool, avg_pool
        if variant == "tf":
            pool, pool_7c = tf_avg_pool, tf_max_pool
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3, padding=0)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3, padding=0)
        self.maxpool2 = nn.MaxPool2d(3, stride=2)
        for name, cin, pool_c in ("5b", 192, 32), ("5c", 256, 64), ("5d", 288, 64):
            setattr(self, f"Mixed_{name}", Mixed(  # InceptionA
                branch1x1=[Conv(cin, 64, 1)],
                branch5x5=[Conv(cin, 48, 1), Conv(48, 64, 5)],
                branch3x3dbl=[Conv(cin, 64, 1), Conv(64, 96, 3), Conv(96, 96, 3)],
                branch_pool=[pool, Conv(cin, pool_c, 1)]))
        self.Mixed_6a = Mixed(  # InceptionB
            branch3x3=[Conv(288, 384, 3, stride=2)],
            branch3x3dbl=[Conv(288, 64, 1), Conv(64, 96, 3), Conv(96, 96, 3, stride=2)],
            pool=[max_pool])
        row, col = (1, 7), (7, 1)
        for name, c7 in ("6b", 128), ("6c", 160), ("6d", 160), ("6e", 192):
            setattr(self, f"Mixed_{name}", Mixed(  # InceptionC
                branch1x1=[Conv(768, 192, 1)],
                branch7x7=[Conv(768, c7, 1), Conv(c7, c7, row), Conv(c7, 192, col)],
                branch7x7dbl=[Conv(768, c7, 1), Conv(c7, c7, col), Conv(c7, c7, row),
                              Conv(c7, c7, col), Conv(c7, 192, row)],
                branch_pool=[pool, Conv(768, 192, 1)]))
        self.Mixed_7a = Mixed(  # InceptionD
            branch3x3=[Conv(768, 192, 1), Conv(192, 320, 3, stride=2)],
            branch7x7x3=[Conv(768, 192, 1), Conv(192, 192, row), Conv(192, 192, col),
                         Conv(192, 192, 3, stride=2)],
            pool=[max_pool])
        for name, cin, pool_e in ("7b", 1280, pool), ("7c", 2048, pool_7c):
            setattr(self, f"Mixed_{name}", Mixed(  # InceptionE
                branch1x1=[Conv(cin, 320, 1)],
                branch3x3=[Conv(cin, 384, 1), fork()],
                branch3x3dbl=[Conv(cin, 448, 1), Conv(448, 384, 3), fork()],
                branch_pool=[pool_e, Conv(cin, 192, 1)]))

    def forward(self, x):
        """Floats (N, 3, H, W) in [0, 1] -> (N, 2048) features."""
        # pytorch-fid's resize; both weight files expect [-1, 1]
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (2 * x - 1).contiguous(memory_format=torch.channels_last)
        return _chain(x, *self.children()).mean((2, 3))


def load_weights(model, state, variant):
    """torchvision-named weights into `model`, or a DataError that says what is wrong."""
    state = state if isinstance(state, dict) else {}
    problem, fc = None, state.get("fc.weight")
    if fc is not None and len(fc) != FC_CLASSES[variant]:  # the other variant's file
        problem = f"fc has {len(fc)} classes, not {FC_CLASSES[variant]}"
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED)}
    # batch norm's step counters: in the state_dict, never read
    for k in model.state_dict():
        if k.endswith("_tracked"):
            state[k] = torch.tensor(0)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # torch lists the missing and stray names, the wrong shapes
        problem = " ".join(str(e).split(":", 1)[1].split())
    if problem is None:
        return
    raise DataError(
        f"these are not the {variant} Inception v3 weights ({problem[:300]}). Use the file "
        f"from {URLS[variant]}, or leave --inception-weights out to download it.")


def load_inception(variant="torchvision", weights_path=None, device=None):
    """Eval-mode InceptionV3, the variant's weights from `weights_path` or downloaded once."""
    url = URLS[variant]
    try:
        if weights_path:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        else:
            state = torch.hub.load_state_dict_from_url(
                url, map_location="cpu", check_hash=True, weights_only=True)
    except Exception as e:  # offline, a bad hash, junk
        # torch's own advice, weights_only=False, would run the file's code: never give it
        why = str(e).strip().split("\n")[0]
        if not why or "weights_only" in str(e):
            why = "not weights"
        raise DataError(
            f"cannot load {weights_path or url} ({why}). The {variant} weights are at {url}; "
            "offline, download them elsewhere and pass them with --inception-weights PATH"
        ) from None
    with torch.device("meta"):  # no random initialisation (0.8 s): load_weights sets all
        model = InceptionV3(variant)
    load_weights(model.to_empty(device="cpu"), state, variant)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device, memory_format=torch.channels_last)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def feature_stats(model, images, batch_size=200, desc="features", total=None):
    """Float64 mean and covariance (N - 1) of the features of uint8 images (N, H, W, 3)."""
    if isinstance(images, np.ndarray):
        total = len(images)
        images = [images[i:i + batch_size] for i in range(0, total, batch_size)]
    device, feats = next(model.parameters()).device, []
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    tf32 = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False  # TF32 moves the features
    try:
        for batch in progress(images, total, desc):
            x = torch.from_numpy(np.array(batch))  # a copy: memmaps are read-only
            x = x.to(device).permute(0, 3, 1, 2).float() / 255
            feats.append(model(x).double().cpu())
    finally:  # the caller's settings back
        cudnn.allow_tf32, matmul.allow_tf32 = tf32
    feats = torch.cat(feats).numpy()
    n, d = feats.shape
    if n < 2:  # np.cov would divide by zero, and the eigh fail
        raise DataError(f"{desc}: {n} image; a covariance needs at least 2")
    if n <= d:  # the covariance's rank is at most N - 1
        print(f"warning: {desc}: {n} images <= {d} features, so the covariance is "
              "singular and the FID biased up: compare only at equal N (the paper's "
              "10,000)", file=sys.stderr)
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2)) in float64 (Heusel et al. 2017)."""
    mu1, mu2, s1, s2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    shape = mu1.shape
    if mu2.shape != shape or s1.shape != shape * 2 or s2.shape != shape * 2:
        raise DataError(
            f"statistics of different sizes: mu {mu1.shape} and {mu2.shape}, sigma "
            f"{s1.shape} and {s2.shape}; compute both sides with the same Inception")
    # s1 s2 has the eigenvalues of the symmetric PSD r^T s2 r, r = v1 sqrt(w1);
    # round-off below 0 is clipped
    w1, v1 = np.linalg.eigh(s1)
    r = v1 * np.sqrt(w1.clip(0))
    roots = np.sqrt(np.linalg.eigvalsh(r.T @ s2 @ r).clip(0))
    traces = np.trace(s1) + np.trace(s2) - 2 * roots.sum()
    return float(np.sum((mu1 - mu2) ** 2) + traces)


def save_stats(path, mu, sigma):  # atomically: an interrupted run leaves no half a cache
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma))


def load_stats(path):
    """(mu, sigma) from a statistics .npz, fid.py's or pytorch-fid's."""
    try:
        with np.load(path) as f:
            return f["mu"], f["sigma"]
    except Exception as e:  # a damaged or foreign file makes numpy raise almost anything
        raise DataError(f"cannot read statistics (mu, sigma) from {path}: {e}") from None


def cached_stats(path, compute):
    """(mu, sigma) from `path`, else compute()d and saved there."""
    if os.path.exists(path):
        return load_stats(path)
    mu, sigma = compute()
    save_stats(path, mu, sigma)
    return mu, sigma


def score(net, real, sets, folder, protocol):
    """{name: FID} of each set of uint8 images against the `real` ones. Their statistics are
    cached in `folder` under a name of all they depend on: the data `protocol` (words), their
    number (FID depends on N) and the Inception variant (the two are different scales)."""
    words = ["fid_stats", *protocol, f"n{len(real)}", net.variant]
    path = os.path.join(folder, "_".join(words) + ".npz")
    mu, sigma = cached_stats(path, lambda: feature_stats(net, real, desc="FID real"))
    fids = {}
    for name, images in sets.items():
        fake = feature_stats(net, images, desc=f"FID {name}")
        fids[name] = frechet_distance(mu, sigma, *fake)
    return fids


def input_stats(path, get_model, batch_size):
    """(mu, sigma) of a statistics .npz, or of a folder of images."""
    if path.endswith(".npz") and os.path.isfile(path):
        return load_stats(path)
    paths = list_images(path) if os.path.isdir(path) else ()
    if not paths:
        raise DataError(f"{path}: neither a statistics .npz (mu, sigma) nor a folder of images")

    def read(chunk):
        images = [np.asarray(read_image(p)) for p in chunk]  # names a broken file
        try:
            return np.stack(images)
        except ValueError as e:  # images of different sizes
            raise DataError(f"cannot read the images from {chunk[0]} on: {e}") from None
    starts = range(0, len(paths), batch_size)
    batches = (read(paths[i:i + batch_size]) for i in starts)
    return feature_stats(get_model(), batches, desc=path, total=len(paths))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("a", help="a folder of images or a statistics .npz (mu, sigma)")
    a("b", nargs="?", help="the same, for the other side (optional with --save-stats)")
    a("--save-stats", metavar="OUT.npz", help="save the statistics (mu, sigma) of A")
    a("--inception", choices=list(URLS), default="torchvision",
      help="tf (pytorch-fid's TF graph): FIDs comparable with the paper's (default torchvision)")
    a("--inception-weights", metavar="PATH", help="a local weights file instead of the download")
    a("--batch-size", type=int, default=200, help="images per Inception pass (default 200)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = p.parse_args(argv)
    if args.b is None and not args.save_stats:
        p.error("give two inputs A B, or one input and --save-stats OUT.npz")
    # loaded on the first folder only: two .npz files need no network
    get_model = functools.cache(functools.partial(
        load_inception, args.inception, args.inception_weights, args.device))
    try:
        mu1, sigma1 = input_stats(args.a, get_model, args.batch_size)
        if args.save_stats:
            save_stats(args.save_stats, mu1, sigma1)
        if args.b is not None:
            mu2, sigma2 = input_stats(args.b, get_model, args.batch_size)
            print(f"{frechet_distance(mu1, sigma1, mu2, sigma2):.6f}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
