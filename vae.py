"""The two-stage VAE of Dai & Wipf with the balancing factor gamma *computed* (Asperti & Trentin).

- `kl_divergence` eq. 3; `vae_loss` eq. 7 summed over the D pixels x channels plus k * eq. 3
  (eq. 9 up to constants with gamma held constant).
- `ComputedGamma`: the paper's contribution (section 3): eq. 8 puts the minimum of eq. 7 at
  gamma^2 = mse, so gamma is set from a running estimate of the mse, not learned.
- `LearnedGamma`: Dai & Wipf's trainable log-gamma, the baseline of Tables 2-3.
- `VAE`: the stage-1 "ResNet" network (Fig. 1; Dai & Wipf's network/util.py), with TF1's
  debiased `BatchNorm`; `SecondStage`: the stage-2 VAE on latents.
- `variance_law`, `latent_summary`: eq. 6 per latent and footnote 3's inactive count, by the
  paper's E[sigma^2] and by the released evaluation's E[sigma].
- `build`: a stage's network from its settings (train.py's config, saved in each checkpoint).

Deviations from the paper and the reference code:
- k (KL weight) = pixels / 1024, the paper's rule (4.2: 4x the pixels, 4x the KL); the released
  code's (2 * side / latent_dim)^2 agrees at the paper's 64 latents only.
- Stride-2 'same' convolutions pad (1, 1) where TF pads (0, 1): same sizes, a one-pixel shift
  of the sampling grid, immaterial for a network trained from scratch.
- Batch norm's running variance uses the unbiased batch variance (TF: biased); at 100 x H x W
  values per channel the factor n / (n - 1) is below 1.0001.
- Two-stage samples decode z = f2(u) itself, as the authors' released code does (Dai & Wipf's
  samples z ~ N(f2(u), gamma_z^2 I)); the paper does not say, its numbers come from the former.
- The decoder's first dense output is reshaped (C, 2, 2), not TF's (2, 2, C): a fixed
  permutation of a freshly initialised layer, so the same model family.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import DataError

HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


# --- Loss: eq. 3, 7 and 9 --------------------------------------------------------------------
def kl_divergence(mu, logsd):
    """eq. 3 summed over latents, per sample: 1/2 sum(mu^2 + sigma^2 - log sigma^2 - 1)."""
    return 0.5 * (mu.square() + (2 * logsd).exp() - 2 * logsd - 1).sum(1)


def vae_loss(x, x_hat, mu, logsd, gamma, kl_weight=1.0):
    """(loss, mse, kl) in float32: loss the batch mean of eq. 7 summed over the D pixels x channels
    plus kl_weight * eq. 3; mse the mean over all values (what gamma^2 tracks); kl eq. 3's mean."""
    x = x.float()  # the loss in float32, whatever autocast made the outputs
    D = x[0].numel()
    sse = (x - x_hat.float()).square().flatten(1).sum(1)
    # eq. 7 summed over D: sum (x - x_hat)^2 / (2 gamma^2) + D log gamma + D log(2 pi) / 2
    gen = sse / (2 * gamma.square()) + D * (torch.log(gamma) + HALF_LOG_TWO_PI)
    kl = kl_divergence(mu.float(), logsd.float())
    return (gen + kl_weight * kl).mean(), sse.mean() / D, kl.mean()


def kl_weight_for(side):
    """k by pixel count (paper 4.2): 1 for CIFAR-10's 32x32, 4 for CelebA's 64x64."""
    return side * side / 1024


# --- gamma: computed (the paper) or learned (Dai & Wipf) -------------------------------------
class ComputedGamma(nn.Module):
    """gamma = sqrt(mse_est), the paper's rule (section 3: a discounted combination with the
    previous estimate, then the minimum of the two, so gamma never increases). After each
    minibatch mse_est <- min(mse_est, 0.99 * mse_est + 0.01 * batch_mse), from 1.0: the factors
    and the start are the released code's, which the paper does not give. Each loss uses the
    previous batches' estimate, as the released code feeds gamma in. A buffer: no gradient, in
    the state_dict, updated on the device without host synchronisation."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mse_est", torch.tensor(1.0))

    def forward(self):
        return self.mse_est.sqrt()

    @torch.no_grad()
    def update(self, batch_mse):
        moved = 0.99 * self.mse_est + 0.01 * batch_mse.float()
        self.mse_est.copy_(torch.minimum(self.mse_est, moved))


class LearnedGamma(nn.Module):
    """Dai & Wipf's gamma = exp(log_gamma), trained from gamma = 1 with the networks (eq. 8)."""

    def __init__(self):
        super().__init__()
        self.log_gamma = nn.Parameter(torch.zeros(()))

    def forward(self):
        return self.log_gamma.exp()

    def update(self, batch_mse):
        pass  # learned by gradient descent instead


GAMMAS = {"computed": ComputedGamma, "learned": LearnedGamma}


# --- Networks --------------------------------------------------------------------------------
def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, padding=1)


class BatchNorm(nn.BatchNorm2d):
    """Batch norm with zero-debiased moving averages (TF1's assign_moving_average in Dai & Wipf's
    batch_norm): after t steps, sum_i (1 - d) d^(t - i) stat_i / (1 - d^t), d = 0.999, i.e. a
    moving average of momentum (1 - d) / (1 - d^t), 1 at the first step, falling to 1 - d (a plain
    one would still be mostly its (0, 1) start after a few hundred steps)."""

    def __init__(self, channels, decay=0.999):
        super().__init__(channels, eps=1e-5)  # the reference's epsilon
        self.decay = decay
        # this batch's statistics, written by F.batch_norm at momentum 1 (no extra pass)
        self.register_buffer("batch_mean", torch.zeros(channels), persistent=False)
        self.register_buffer("batch_var", torch.ones(channels), persistent=False)

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        y = F.batch_norm(x, self.batch_mean, self.batch_var, self.weight, self.bias, True, 1.0,
                         self.eps)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            t = self.num_batches_tracked.double()
            momentum = ((1 - self.decay) / (1 - self.decay ** t)).float()
            self.running_mean.lerp_(self.batch_mean, momentum)
            self.running_var.lerp_(self.batch_var, momentum)
        return y


class ResBlock(nn.Module):
    """res_block: depth x (batch norm -> ReLU -> conv3x3), plus a conv3x3 shortcut; with
    `dense`, res_fc_block: depth x (ReLU -> dense), plus a dense shortcut (no batch norm)."""

    def __init__(self, cin, cout, depth, dense=False):
        super().__init__()
        layer = nn.Linear if dense else conv3x3
        body = []
        for i in range(depth):
            c = cin if i == 0 else cout
            if not dense:
                body.append(BatchNorm(c))
            body += [nn.ReLU(), layer(c, cout)]
        self.body = nn.Sequential(*body)
        self.shortcut = layer(cin, cout)

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


def scale_block(cin, cout, blocks, depth, dense=False):
    return nn.Sequential(*[ResBlock(cin if i == 0 else cout, cout, depth, dense)
                           for i in range(blocks)])


def glorot_init(module):
    """TF defaults of the reference: Glorot-uniform kernels, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


class _GaussianVAE(nn.Module):
    """Both stages: the reparametrised forward pass and the loss at this model's gamma."""

    def forward(self, x):
        mu, logsd = self.encode(x)
        z = mu + logsd.exp() * torch.randn_like(mu)  # reparametrisation trick
        return self.decode(z), mu, logsd

    def loss(self, x, out, kl_weight):
        return vae_loss(x, *out, self.gamma(), kl_weight)


class VAE(_GaussianVAE):
    """Stage 1: Dai & Wipf's "ResNet" (Fig. 1), side x side images (side a power of two). Encoder:
    conv3x3 -> num_scale scale blocks, stride-2 convs doubling channels between -> global mean ->
    fc scale block -> mu, log sigma. Decoder: dense to 2x2 -> (stride-2 up-conv, scale block) up
    to side -> conv3x3 -> sigmoid; channels base_dim at full size, x2 per halving, max 1024."""

    def __init__(self, side=32, latent_dim=64, base_dim=32, fc_dim=512, num_scale=3,
                 block_per_scale=1, depth_per_block=2, gamma="computed"):
        super().__init__()
        if side < 4 or side & (side - 1) or side >> (num_scale - 1) < 1:
            raise DataError(
                f"image side {side}: the decoder starts at 2x2 and doubles, so the side must "
                "be a power of two >= 4, and the encoder's num_scale scales need it >= "
                f"2^(num_scale - 1) = {2 ** (num_scale - 1)}: choose another --img-size or "
                "--num-scale")
        self.gamma = GAMMAS[gamma]()
        dims = [base_dim * 2 ** i for i in range(num_scale)]
        enc = [conv3x3(3, dims[0])]
        for i, d in enumerate(dims):
            enc.append(scale_block(d, d, block_per_scale, depth_per_block))
            if i < num_scale - 1:
                enc.append(conv3x3(d, dims[i + 1], stride=2))  # downsample
        self.encoder = nn.Sequential(*enc)
        self.fc = scale_block(dims[-1], fc_dim, 1, depth_per_block, dense=True)
        self.mu, self.logsd = nn.Linear(fc_dim, latent_dim), nn.Linear(fc_dim, latent_dim)

        ddims = [min(base_dim * 2 ** i, 1024) for i in range(int(math.log2(side)))][::-1]  # 2x2 up
        self.fc0 = nn.Linear(latent_dim, 4 * ddims[0])
        dec = []
        for cin, cout in zip(ddims, ddims[1:]):
            dec += [nn.ConvTranspose2d(cin, cout, 3, 2, padding=1, output_padding=1),  # upsample
                    scale_block(cout, cout, block_per_scale, depth_per_block)]
        self.decoder = nn.Sequential(*dec, conv3x3(ddims[-1], 3), nn.Sigmoid())
        convs = [m for m in self.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
        self.resample = [m for m in convs if m.stride == (2, 2)]
        glorot_init(self)

    def encode(self, x):
        h = self.fc(self.encoder(x).mean((2, 3)))
        return self.mu(h), self.logsd(h)

    def decode(self, z):
        h = self.fc0(z).view(len(z), -1, 2, 2).contiguous(memory_format=torch.channels_last)
        return self.decoder(h)

    def l2_penalty(self):
        """sum(w^2) over the stride-2 down/up-sampling kernels (Keras l2 regulariser, paper 4.2)."""
        return sum(m.weight.square().sum() for m in self.resample)


def mlp(cin, width, depth):
    """`depth` dense ReLU layers of `width` (Dai & Wipf's stage-2 encoder and decoder)."""
    layers = []
    for i in range(depth):
        layers += [nn.Linear(cin if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*layers)


class SecondStage(_GaussianVAE):
    """Stage 2 (Dai & Wipf): a VAE on the stage-1 latents z. Encoder: `depth` dense ReLU layers of
    width `dim`, concatenated with z, then dense mu_u, log sigma_u heads. Decoder: the same from u,
    concatenated with u, then dense to z_hat. It has its own gamma_z."""

    def __init__(self, latent_dim=64, dim=2048, depth=3, gamma="computed"):
        super().__init__()
        self.gamma = GAMMAS[gamma]()
        self.enc = mlp(latent_dim, dim, depth)
        self.dec = mlp(latent_dim, dim, depth)
        self.mu, self.logsd, self.z_hat = (
            nn.Linear(dim + latent_dim, latent_dim) for _ in range(3))
        glorot_init(self)

    def encode(self, z):
        h = torch.cat([z, self.enc(z)], 1)  # skip-concatenation with the input
        return self.mu(h), self.logsd(h)

    def decode(self, u):
        return self.z_hat(torch.cat([u, self.dec(u)], 1))

    def l2_penalty(self):
        return 0.0


# the settings that make a stage-1 network: a new stage 2 keeps them with the data
ARCH1 = ("latent_dim", "base_dim", "fc_dim", "num_scale", "block_per_scale", "depth_per_block")


def build(cfg, stage, device="cpu", state=None):
    """The stage's network from its settings (train.py's config), with a checkpoint's weights
    if given; a side the network cannot take is a DataError, before any data is decoded."""
    if stage == 1:
        arch = [cfg[k] for k in ARCH1]
        model = VAE(cfg["img_size"], *arch, gamma=cfg["gamma"])
    else:
        model = SecondStage(cfg["latent_dim"], cfg["second_dim"], cfg["second_depth"],
                            cfg["gamma"])
    model = model.to(device, memory_format=torch.channels_last)
    if state is not None:
        model.load_state_dict(state)
    return model


# --- Reconstruction and two-stage generation (networks in eval mode) -------------------------
def randn(g, *shape, device):
    """Standard normal noise from the CPU generator g: the same numbers on any device."""
    return torch.randn(shape, generator=g).to(device)


@torch.no_grad()
def reconstruct(m1, x, g):
    """REC as the released code does it: a sampled z = mu + sigma * eps decoded, in eval mode."""
    mu, logsd = m1.encode(x)
    return m1.decode(mu + logsd.exp() * randn(g, *mu.shape, device=x.device)), mu, logsd


@torch.no_grad()
def sample_latents(m1, m2, n, g, device):
    """GEN-1: z ~ N(0, I). GEN-2: u ~ N(0, I), z = f2(u), the stage-2 decoder's mean, as the
    authors' released generate() does (Dai & Wipf's adds gamma_z * eps; see the docstring)."""
    z = randn(g, n, m1.mu.out_features, device=device)
    return z if m2 is None else m2.decode(z)


# --- Latent statistics: eq. 6 and footnote 3 -------------------------------------------------
def variance_law(mu, logsd, released=False):
    """Per latent: (Var_X[mu(X)] + E_X[v(X)], E_X[v(X)]) over the rows, v = sigma^2 (eq. 6,
    footnote 3) or, `released`, sigma, as the authors' evaluation code (exp of log sigma, called
    the variance). "Inactive" is E[v] >= 0.8: the two agree for sigma near 1 and differ in
    "limbo" (E[sigma^2] 0.6-0.8 is E[sigma] of about 0.77-0.89)."""
    v = logsd.double().exp()
    if not released:
        v = v.square()
    e_v = v.mean(0)
    # eq. 6 writes E[mu^2] + E[sigma^2], assuming eq. 5's E[mu] = 0; Var[mu] = E[mu^2] - E[mu]^2
    # is the same under eq. 5 and does not count a mean that drifted from 0 as variance
    return mu.double().var(0, unbiased=False) + e_v, e_v


def latent_summary(mu, logsd):
    """Tables 1-5's mean variance law and inactive count (E >= 0.8) by E[sigma^2] (the paper) and
    E[sigma] (released code, suffix _code); and E[sigma^2] per latent (Fig. 6-7)."""
    row = {}
    for suffix, released in (("", False), ("_code", True)):
        law, e_v = variance_law(mu, logsd, released)
        row |= {f"var_law{suffix}": law.mean().item(), f"inactive{suffix}": int((e_v >= 0.8).sum())}
    return row, variance_law(mu, logsd)[1]
