"""What the model fits after training without gradients: the maps' standardisation statistics and the
residual base (each epoch, on held-out good images), and the frozen teacher's global and regional Gaussians."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dmdd.config import Config
from dmdd.data.datasets import Record
from dmdd.evaluation.predictions import image_batches
from dmdd.models.dmdd import DMDD, Features


@torch.inference_mode()
def fit_map_statistics(
    model: DMDD, images: list[Record] | torch.Tensor, cfg: Config, device: torch.device, batch_size: int = 8
):
    """Set ``model.map_mean`` / ``model.map_std`` to each map's mean and standard deviation over every pixel of
    the given good images (held-out training images: no test data; records, or :func:`preload_images` of them), and
    the residual head's ``sum_weights`` so that its base is the plain sum of its input maps (standardised maps when
    ``model.map_normalization``), itself standardised on the same pixels. With ``model.regional`` fitted, also the
    pixel statistics that add its map to the model's; with ``model.global_score`` fitted, the standardisation of
    the map's image score. Returns (mean (K,), std (K,))."""
    was_training = model.training
    model.eval()
    k = model.num_maps
    regional = model.regional is not None and model.regional.gaussian_fitted > 0
    # The plain sum is linear in the K maps, and so is the smoothing: the smoothed map's pixel statistics follow from
    # those of the K smoothed maps, in this same pass. The MSN's output is not: it takes a pass of its own below.
    linear = regional and model.segmentation is None
    total, smoothed_total = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    moments = torch.zeros(k, k, dtype=torch.float64)  # sum of m m^T over pixels
    smoothed_moments = torch.zeros(k, k, dtype=torch.float64)
    regional_sums = torch.zeros(2, dtype=torch.float64)  # the smoothed regional map: sum, sum of squares
    count = 0
    for batch in image_batches(images, cfg, batch_size):
        feats = model.features(batch.to(device))
        maps = model.stack(*model.stage_maps(feats), batch.shape[-2:], normalized=False)  # (B, K, S, S)
        total += maps.double().sum(dim=(0, 2, 3)).cpu()
        moments += _gram(maps)
        count += maps[:, 0].numel()
        if linear:
            smoothed = model.smooth(maps.flatten(0, 1)[:, None]).view_as(maps)
            smoothed_total += smoothed.double().sum(dim=(0, 2, 3)).cpu()
            smoothed_moments += _gram(smoothed)
            other = model.smooth(model.regional.raw_map(feats.teacher, batch.shape[-2:])).double()
            regional_sums += torch.stack([other.sum(), (other * other).sum()]).cpu()
    mean = total / count
    std = (moments.diagonal() / count - mean**2).clamp_min(0).sqrt().clamp_min(1e-6)
    model.map_mean.copy_(mean.float())
    model.map_std.copy_(std.float())
    a = 1.0 / std if model.cfg.map_normalization else torch.ones_like(std)  # the fusion's input is a * (m - mu)
    if model.fused is not None:  # the plain sum adds only the maps of cfg.fused_stages
        a = a * torch.zeros_like(a).index_fill_(0, torch.tensor(model.fused), 1.0)
    head = model.segmentation
    if head is not None and getattr(head, "residual", False):
        covariance = moments / count - torch.outer(mean, mean)
        plain_std = abs(float(a @ covariance @ a)) ** 0.5
        head.sum_weights.fill_(1.0 / max(plain_std, 1e-6))
    if linear:  # the plain map is sum_k a_k (smooth(m_k) - mu_k), with mu = 0 without map normalisation
        shift = float(a @ mean) if model.cfg.map_normalization else 0.0
        smoothed_mean = smoothed_total / count
        plain_mean = float(a @ smoothed_mean) - shift
        plain_var = float(a @ (smoothed_moments / count) @ a - (a @ smoothed_mean) ** 2)
        r_mean = float(regional_sums[0] / count)
        r_var = float(regional_sums[1] / count) - r_mean**2
        model.regional.fit_pixel_stats((plain_mean, max(plain_var, 0.0) ** 0.5), (r_mean, max(r_var, 0.0) ** 0.5))
    elif regional:  # the MSN's map and the regional map, from the statistics fitted above
        sums, pixels = torch.zeros(2, 2, dtype=torch.float64), 0  # (model, regional) x (sum, sum of squares)
        for feats, size in _feature_batches(model, images, cfg, device, batch_size):
            plain = model.fused_map(model.stack(*model.stage_maps(feats), size)).double()
            other = model.smooth(model.regional.raw_map(feats.teacher, size)).double()
            sums += torch.stack([torch.stack([m.sum(), (m * m).sum()]) for m in (plain, other)]).cpu()
            pixels += plain.numel()
        means = sums[:, 0] / pixels
        stds = (sums[:, 1] / pixels - means**2).clamp_min(0).sqrt()
        model.regional.fit_pixel_stats((float(means[0]), float(stds[0])), (float(means[1]), float(stds[1])))
    if model.global_score is not None and model.global_score.gaussian_fitted > 0:
        map_scores = [model.map_score(model.fused_map(model.stack(*model.stage_maps(feats), size), feats.teacher))
                      for feats, size in _feature_batches(model, images, cfg, device, batch_size)]  # fmt: skip
        model.global_score.fit_score_stats(torch.cat(map_scores).cpu())
    model.train(was_training)
    return mean.float(), std.float()


def _gram(maps: torch.Tensor) -> torch.Tensor:
    """(K, K) sum over pixels of m m^T for (B, K, S, S) maps, in float64 on the CPU."""
    flat = maps.double().transpose(0, 1).reshape(maps.shape[1], -1).cpu()
    return flat @ flat.T


def _feature_batches(model: DMDD, images: list[Record] | torch.Tensor, cfg: Config, device: torch.device,
                     batch_size: int) -> Iterator[tuple[Features, tuple[int, int]]]:  # fmt: skip
    """(features, input size) of each batch of ``images``."""
    for batch in image_batches(images, cfg, batch_size):
        yield model.features(batch.to(device)), tuple(batch.shape[-2:])


@torch.inference_mode()
def fit_teacher_gaussians(model: DMDD, records: list[Record] | torch.Tensor, cfg: Config, device: torch.device,
                          global_score: bool = True, regional: bool = True, per_image: int = 24,
                          batch_size: int = 16) -> dict[str, object]:  # fmt: skip
    """Fit the frozen teacher's Gaussians of the training images ``records`` in one pass over them (each image
    decoded and seen by the teacher once; the teacher is frozen, so this needs no training):

    - ``model.global_score``'s, to the pooled features of each image, with the standardisation of their distance
      (out of sample); the map score's statistics follow in :func:`fit_map_statistics`;
    - ``model.regional``'s, to ``per_image`` window vectors drawn at random positions of each image (generator seeded
      by ``cfg.train.seed``, the only random draw here).

    ``global_score`` / ``regional`` = False leaves that one alone. Returns the Ledoit-Wolf shrinkages:
    ``{"global": [per stage], "regional": {stage: shrinkage}}`` for those fitted."""
    fit_global = global_score and model.global_score is not None
    fit_regional = regional and model.regional is not None
    if not (fit_global or fit_regional):
        return {}
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.train.seed)
    pooled: list[list[torch.Tensor]] = [[] for _ in model.global_score.stages] if fit_global else []
    vectors: dict[int, list[torch.Tensor]] = {s: [] for s in model.regional.windows} if fit_regional else {}
    for batch in image_batches(records, cfg, batch_size):
        teacher = model.teacher_features(model.normalize(batch.to(device)))
        if fit_global:
            for i, z in enumerate(model.global_score.pooled(teacher)):
                pooled[i].append(z.double().cpu())
        if fit_regional:
            for stage, v in model.regional.window_vectors(teacher).items():
                pick = torch.randint(0, v.shape[1], (v.shape[0], per_image), generator=gen).to(v.device)
                windows = torch.gather(v, 1, pick[..., None].expand(-1, -1, v.shape[2]))
                vectors[stage].append(windows.flatten(0, 1).cpu())
    shrinkages: dict[str, object] = {}
    if fit_global:  # on the CPU, in float64
        shrinkages["global"] = model.global_score.fit([torch.cat(z) for z in pooled])
    if fit_regional:
        shrinkages["regional"] = model.regional.fit({s: torch.cat(v) for s, v in vectors.items()})
    model.train(was_training)
    return shrinkages
