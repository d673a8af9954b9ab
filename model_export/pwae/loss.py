"""P-WAE's loss: reconstruction, the sliced-Wasserstein distance of each
tile's code to its Student-t prior, and the jigsaw head's cross-entropy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from model_export.pwae.config import GRID
from model_export.pwae.model import PWAE


def sample_student_t(
    shape: Sequence[int],
    nu: float,
    mu: torch.Tensor | float,
    sigma: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Student-t samples: mu + sigma * z / sqrt(chi2_nu / nu), z ~ N(0, 1).

    chi2_nu = 2 * Gamma(nu / 2, 1), drawn by Marsaglia and Tsang's method from
    the given generator: torch's own gamma sampler takes no generator, and
    training must be reproducible under a seed. The draws are made on the
    generator's device (the trainer's is a CPU one) and moved to ``mu``'s
    where that is a tensor, so a seed gives the same sample on either device.
    """
    z = torch.randn(*shape, generator=generator)
    # Gamma(k, 1) by Marsaglia-Tsang with the generator, vectorised.
    k = nu / 2.0
    d = k - 1.0 / 3.0 if k >= 1 else k + 2.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(*shape)
    todo = torch.ones(*shape, dtype=torch.bool)
    while todo.any():
        x = torch.randn(*shape, generator=generator)
        v = (1 + c * x) ** 3
        u = torch.rand(*shape, generator=generator)
        ok = (v > 0) & (
            torch.log(u.clamp_min(1e-12))
            < 0.5 * x**2 + d - d * v + d * torch.log(v.clamp_min(1e-12))
        )
        take = ok & todo
        out[take] = (d * v)[take]
        todo &= ~ok
    if k < 1:  # boost: Gamma(k) = Gamma(k + 1) * U^(1/k)
        out = out * torch.rand(*shape, generator=generator) ** (1.0 / k)
    chi2 = 2.0 * out
    noise = sigma * z / torch.sqrt(chi2 / nu)
    if isinstance(mu, torch.Tensor):
        noise = noise.to(mu.device)
    return mu + noise


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """Squared sliced-Wasserstein-2 distance between two equal-size samples.

    a, b: (..., B, D); projections: (D, L) unit columns. Each projection turns
    both samples into 1-D ones, whose W2 is the mean squared difference of
    their sorted values; the result is the mean over projections (and over
    any leading batch of sample pairs).
    """
    pa = torch.sort(a @ projections, dim=-2).values
    pb = torch.sort(b @ projections, dim=-2).values
    return ((pa - pb) ** 2).mean()


def random_projections(
    dim: int, count: int, generator: torch.Generator, device: torch.device | None = None
) -> torch.Tensor:
    """(dim, count) directions drawn uniformly on the unit sphere, on the
    generator's device, then moved to ``device`` where one is given."""
    p = torch.randn(dim, count, generator=generator)
    p = p / p.norm(dim=0, keepdim=True)
    return p if device is None else p.to(device)


def losses(
    model: PWAE,
    image: torch.Tensor,
    feats: torch.Tensor | None,
    perm_idx: torch.Tensor,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The three losses for one batch shuffled by permutations ``perm_idx``.

    ``feats`` are the frozen encoder's features of the unshuffled tiles when
    cached; the encoder is Siamese (per tile), so shuffling tiles shuffles
    their features identically and the cache stays valid.
    """
    cfg = model.config
    n = image.shape[0]
    perm_idx = perm_idx.to(image.device)  # drawn from the CPU generator
    perms = model.perms[perm_idx]  # type: ignore[index]  # (N, 9): slot i shows original tile perms[i]
    z_true = model.encode(model.tiles(image)) if feats is None else model.latent(feats)
    # The shuffled sequence the jigsaw head sees: slot i holds tile perms[i].
    z_shuffled = torch.gather(
        z_true, 1, perms.view(n, -1, 1, 1, 1).expand(-1, -1, *z_true.shape[2:])
    )
    codes = z_shuffled.mean((3, 4)).reshape(n, -1)  # pooled code per slot, in shuffled order
    l_jig = F.cross_entropy(model.jigsaw(codes), perm_idx)
    # SWD: codes of original tile k against samples of its prior T(nu, mu=k, sigma),
    # summed over tiles; tile numbers are 1-based (service.tiler).
    on = z_true if cfg.swd_on == "map" else z_true.mean((3, 4))
    flat = on.reshape(n, GRID * GRID, -1).transpose(0, 1)  # (9, N, D)
    proj = random_projections(flat.shape[-1], cfg.swd_projections, generator, flat.device)
    mu = (
        torch.arange(1, GRID * GRID + 1, dtype=flat.dtype, device=flat.device).view(-1, 1, 1)
        * cfg.prior_mu_step
    )
    prior = sample_student_t(flat.shape, cfg.prior_nu, mu, cfg.prior_sigma, generator)
    l_swd = sliced_wasserstein(flat, prior, proj) * (GRID * GRID)
    recon = model.decode(z_true)
    l_ae = F.mse_loss(recon, image)
    l_perc = (
        model.feature_error(image, recon).mean() if cfg.w_perceptual > 0 else l_ae.new_zeros(())
    )
    total = cfg.w_ae * l_ae + cfg.w_perceptual * l_perc + cfg.w_swd * l_swd + cfg.w_jigsaw * l_jig
    return {"total": total, "ae": l_ae, "perceptual": l_perc, "swd": l_swd, "jigsaw": l_jig}
