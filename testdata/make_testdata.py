"""Makes testdata/inception_features.npz and testdata/inception_manifest.json.

- inception_features.npz: the 2048 pool features of 3 random 32x32 images under fixed random
  Inception v3 weights, as torchvision's Inception3 and pytorch-fid's FID Inception compute them
  (features 0, 16, ..., 2032 of each image, and the sum and norm of all 2048), and a JSON `meta`.
- inception_manifest.json: the names and shapes of torchvision's Inception3 (aux_logits=True)
  state dict.

Why: fid.py writes Inception v3 in plain PyTorch, without torchvision or pytorch-fid; these files
are references computed by those two packages, independently of it. test_vae.py compares fid.py's
features with them (test_features_match_torchvision_and_pytorch_fid) and its weight names and
shapes (test_weights_load_from_a_file_or_the_published_url). No pretrained weights are
downloaded: the weights are test_vae.fixture_state(20200), imported from there, so the tests and
this script draw them from one source.

Run it from the repository root, in a virtual environment of its own (the project needs neither
torchvision nor pytorch-fid):

    python3 -m venv /work/tvenv
    /work/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 scipy pillow numpy pytest
    /work/tvenv/bin/pip install --no-deps pytorch-fid==0.3.0
    /work/tvenv/bin/python testdata/make_testdata.py

It overwrites both files in testdata/ (--out DIR writes them to DIR instead). On a 2-core AVX512
Xeon with 2 to 8 threads it rewrites both byte for byte; with OMP_NUM_THREADS=1 the float32
round-off differs, moving features by up to 3% of the test's tolerance (1e-4 x rms).
"""
import argparse
import json
import pathlib
import sys
from unittest import mock

import numpy as np
import pytorch_fid
import pytorch_fid.inception as pfi
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.inception import (
    Inception3)

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the tests' own weights, not a copy of them
from test_vae import fixture_state  # noqa: E402

SEED = 20200  # of the weights
IMAGE_SEED = 7
N_IMAGES = 3
SIZE = 32  # pixels a side, before the resize
# the features kept per image: 128 of 2048
DIMS = np.arange(0, 2048, 16, dtype=np.int16)
# verbatim from the committed fixture's meta
# (test_fid_wip.py was test_vae.py's old name)
PROCEDURE = (
    "The weight procedure, repeated by "
    "test_fid_wip.py without torchvision: "
    "keys in sorted\n    order, each drawn "
    "from one numpy Generator in float64, "
    "then cast to float32.")


def images():
    """The random images, NCHW in [0, 1]."""
    rng = np.random.default_rng(IMAGE_SEED)
    shape = (N_IMAGES, SIZE, SIZE, 3)
    x = rng.integers(0, 256, shape, np.uint8)
    x = torch.from_numpy(x).permute(0, 3, 1, 2)
    return x.float() / 255


def torchvision_net(state):
    """torchvision's Inception3, our weights."""
    net = Inception3(aux_logits=False,
                     init_weights=False,
                     transform_input=False)
    missing, unexpected = net.load_state_dict(
        state, strict=False)
    # every weight is torchvision's; left out
    # are only the classifier and the batch
    # norm counters, which the pool features
    # never use
    assert not unexpected, unexpected
    for k in missing:
        assert k.startswith("fc.") or k.endswith(
            "num_batches_tracked"), k
    return net.eval()


def pool_features(net, x):
    """pytorch-fid's forward: resize to 299
    (bilinear, align_corners=False), 2x - 1,
    the blocks up to the average pool."""
    with torch.no_grad():
        (pool,) = net.eval()(x)
    return pool.flatten(1).numpy()


def torchvision_features(state, x):
    tv = torchvision_net(state)
    # pytorch-fid builds torchvision's net with
    # _inception_v3 (weights='DEFAULT', which
    # would download them): hand it ours
    with mock.patch.object(
            pfi, "_inception_v3",
            lambda **kwargs: tv):
        net = pfi.InceptionV3(
            [3], resize_input=True,
            normalize_input=True,
            use_fid_inception=False)
    got = pool_features(net, x)
    # the same through torchvision's own
    # forward, its pool output hooked: the
    # wrapper really ran torchvision's net
    assert np.array_equal(got, hooked(tv, x))
    return got


def hooked(tv, x):
    """torchvision's forward on pytorch-fid's
    preprocessing, the pool output caught."""
    x = F.interpolate(x, size=(299, 299),
                      mode="bilinear",
                      align_corners=False)
    x = 2 * x - 1
    out = []
    tv.avgpool.register_forward_hook(
        lambda mod, inp, y: out.append(y))
    with torch.no_grad():
        tv(x)
    return out[0].flatten(1).numpy()


def tf_state(state):
    """Our weights as the file pytorch-fid
    downloads: it loads strictly, so add its
    1008-way classifier (zero: unused by the
    pool features) and the counters."""
    full = dict(state)
    full["fc.weight"] = torch.zeros(1008, 2048)
    full["fc.bias"] = torch.zeros(1008)
    for k in state:
        if k.endswith(".bn.running_var"):
            n = k.replace("running_var",
                          "num_batches_tracked")
            full[n] = torch.tensor(0)
    return full


def tf_features(state, x):
    full = tf_state(state)
    # pytorch-fid's FID Inception with its
    # weight download replaced by ours
    with mock.patch.object(
            pfi, "load_state_dict_from_url",
            lambda *args, **kwargs: full):
        net = pfi.InceptionV3(
            [3], resize_input=True,
            normalize_input=True)
    return pool_features(net, x)


def meta():
    """The JSON string stored as `meta`."""
    versions = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_fid": pytorch_fid.__version__,
        "numpy": np.__version__}
    return json.dumps({
        "seed": SEED,
        "image_seed": IMAGE_SEED,
        "n_images": N_IMAGES,
        "size": SIZE,
        "dims": "np.arange(0, 2048, 16)",
        "versions": versions,
        "procedure": PROCEDURE})


def features_npz(path):
    state = fixture_state(SEED)
    x = images()
    arrays = {"meta": np.array(meta()),
              "dims": DIMS}
    for variant, run in [
            ("torchvision", torchvision_features),
            ("tf", tf_features)]:
        # float32, as the networks give them
        f = run(state, x)
        f64 = f.astype(np.float64)
        arrays[f"{variant}_features"] = f[:, DIMS]
        arrays[f"{variant}_sum"] = f64.sum(1)
        arrays[f"{variant}_norm"] = np.linalg.norm(
            f64, axis=1)
    np.savez_compressed(path, **arrays)


def manifest(path):
    """One `"name": [shape]` a line, in
    state-dict order."""
    # shapes only: no memory, no initialisation
    with torch.device("meta"):
        net = Inception3(aux_logits=True,
                         init_weights=False)
    lines = [
        f"{json.dumps(k)}: "
        f"{json.dumps(list(v.shape))}"
        for k, v in net.state_dict().items()]
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    path.write_bytes(text.encode())


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=pathlib.Path,
        default=ROOT / "testdata",
        help="folder for both files "
             "(default: testdata/)")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "inception_features.npz"
    features_npz(npz)
    manifest(out / "inception_manifest.json")
    print(f"wrote {npz} and "
          f"{out / 'inception_manifest.json'}")


if __name__ == "__main__":
    main()
