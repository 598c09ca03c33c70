"""HiRED's token selection as pure tensor functions: CLS attention, budgets, sub-image shares, top-k.

No model and no hooks here; tests compare each function with a plain reference on full attention maps.
"""
from __future__ import annotations

import math

import torch

from compress.errors import CompressError

from .config import HiredConfig

_EPS = 1e-9  # floor(P * N * rate) must not lose a token to float error (0.29 * 100 = 28.999...)


def cls_attention(queries: torch.Tensor, keys: torch.Tensor, head_dim: int, scale: float,
                  head_reduce: str = "sum", num_prefix: int = 1) -> torch.Tensor:
    """CLS attention over the patch tokens, from one layer's projected queries and keys.

    queries, keys: (B, T, H * head_dim), any float dtype, token 0 being CLS. Returns (B, T -
    num_prefix) float32: softmax over all T keys of the CLS query row, per head, then summed (or
    maxed) over the H heads, keeping the columns of the tokens after the ``num_prefix`` prefix.
    """
    batch, tokens, width = keys.shape
    heads = width // head_dim
    q = queries[:, 0].float().view(batch, heads, head_dim)                       # (B, H, d)
    k = keys.float().view(batch, tokens, heads, head_dim)                        # (B, T, H, d)
    probs = (torch.einsum("bhd,bthd->bht", q, k) * scale).softmax(dim=-1)        # (B, H, T)
    probs = probs[:, :, num_prefix:]
    return probs.sum(dim=1) if head_reduce == "sum" else probs.amax(dim=1)


def token_budget(num_partitions: int, num_tokens: int, rate: float) -> int:
    """B = max(1, floor(P * N * rate)): the number of patch tokens an image keeps."""
    return max(1, math.floor(num_partitions * num_tokens * rate + _EPS))


def region_weights(full_attention: torch.Tensor, sub_grid: tuple[int, int],
                   content: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> torch.Tensor:
    """Initial-layer attention mass of the full image over each sub-image's 2-D region.

    full_attention: (gh, gw) attention of the full image's patch tokens in raster order.
    sub_grid: (nh, nw) sub-images tiling the high-resolution canvas in raster order.
    content: (top, left, height, width) of the full image's content inside that canvas, as
    fractions of the canvas (LLaVA-Next pads the canvas but not the downsampled full image).
    Each token's attention is split between the sub-images by the area of overlap, so the
    returned (nh * nw,) float64 weights sum to the attention inside the canvas.
    """
    gh, gw = full_attention.shape
    nh, nw = sub_grid
    top, left, height, width = content

    def overlap(count: int, start: float, extent: float, cells: int) -> torch.Tensor:
        # (count, cells): fraction of each token's span (along one axis) inside each cell's span
        t0 = start + extent * torch.arange(count, dtype=torch.float64) / count
        c0 = torch.arange(cells, dtype=torch.float64) / cells
        lo = torch.maximum(t0[:, None], c0[None, :])
        hi = torch.minimum(t0[:, None] + extent / count, c0[None, :] + 1.0 / cells)
        return (hi - lo).clamp_min(0.0) * count / extent

    rows = overlap(gh, top, height, nh)                                          # (gh, nh)
    cols = overlap(gw, left, width, nw)                                          # (gw, nw)
    return (rows.T @ full_attention.double().cpu() @ cols).flatten()


def row_band_weights(full_attention: torch.Tensor, num_sub: int, alpha: float) -> torch.Tensor:
    """The released code's sub-image shares: binarised top tokens counted in row bands.

    full_attention: (N,) initial-layer attention of the full image. The top floor(N * (1 - alpha))
    tokens count 1, the rest 0, and the flattened list is cut into ``num_sub`` equal bands.
    Returns (num_sub,) float64 counts.
    """
    n = full_attention.numel()
    if n % num_sub:
        raise CompressError(f"row_bands allocation needs N={n} patch tokens divisible by {num_sub} sub-images")
    marked = torch.zeros(n, dtype=torch.float64)
    marked[full_attention.flatten().topk(int(n * (1 - alpha))).indices.cpu()] = 1.0
    return marked.view(num_sub, -1).sum(dim=1)


def apportion(weights: torch.Tensor, total: int, cap: int) -> list[int]:
    """Split ``total`` tokens in proportion to ``weights`` (S,), each share at most ``cap``.

    Shares over the cap are fixed at the cap and the rest re-split; the fractional parts are then
    rounded by largest remainder (ties to the lower index), so the shares add up to ``total``
    exactly. All-zero weights split evenly. Requires total <= S * cap.
    """
    w = weights.double().cpu().clamp_min(0.0)
    size = w.numel()
    if total > size * cap:
        raise CompressError(f"cannot place {total} tokens in {size} partitions of {cap}")
    quotas = torch.zeros(size, dtype=torch.float64)
    free = torch.ones(size, dtype=torch.bool)
    remaining = float(total)
    while remaining > 0 and free.any():
        fw = torch.where(free, w, torch.zeros_like(w))
        fw = fw if fw.sum() > 0 else free.double()
        share = remaining * fw / fw.sum()
        over = free & (share > cap)
        if not over.any():
            quotas[free] = share[free]
            break
        quotas[over] = cap
        remaining -= cap * int(over.sum())
        free &= ~over
    shares = quotas.floor().clamp(max=cap)
    left = total - int(shares.sum())
    if left > 0:
        frac = torch.where(shares < cap, quotas - shares, torch.full_like(quotas, -1.0))
        order = sorted(range(size), key=lambda i: (-float(frac[i]), i))
        for i in order[:left]:
            shares[i] += 1
    return [int(s) for s in shares]


def partition_budgets(num_partitions: int, num_tokens: int, config: HiredConfig,
                      sub_weights: torch.Tensor | None = None) -> list[int]:
    """Tokens kept per partition: (full image, sub-image 1, ...) for one image.

    sub_weights: (P - 1,) shares of the sub-images (``region_weights`` or ``row_band_weights``);
    required when P > 1. With allocation "region" the budgets add up to ``token_budget`` exactly:
    what the sub-images cannot hold goes back to the full image. With "row_bands" they follow the
    released code (floored, so they may add up to less).
    """
    total = token_budget(num_partitions, num_tokens, config.rate)
    if num_partitions == 1:
        return [total]
    full = min(math.floor(config.alpha * total + _EPS), num_tokens)
    sub_cap = (num_partitions - 1) * num_tokens
    if config.allocation == "row_bands":
        sub_total = min(total - full, sub_cap)
        w = sub_weights.double().cpu()
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / w.numel())
        return [full] + [min(int(x), num_tokens) for x in (w * sub_total).tolist()]
    sub_total = total - full
    if sub_total > sub_cap:
        full, sub_total = full + sub_total - sub_cap, sub_cap
    return [full] + apportion(sub_weights, sub_total, num_tokens)


def select_tokens(scores: torch.Tensor, budgets: list[int]) -> list[torch.Tensor]:
    """Top-``budgets[p]`` tokens of each partition by ``scores`` (P, N), in ascending (raster) order.

    Returns P int64 tensors of token indices in [0, N).
    """
    return [scores[p].topk(k).indices.sort().values for p, k in enumerate(budgets)]


def hired_keep_indices(final_attention: torch.Tensor, config: HiredConfig,
                       initial_attention: torch.Tensor | None = None,
                       sub_grid: tuple[int, int] | None = None,
                       content: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> list[torch.Tensor]:
    """HiRED's kept token indices for one image of P partitions.

    final_attention, initial_attention: (P, N) CLS attention of the final / initial layer,
    partition 0 being the full image. sub_grid: (nh, nw) with nh * nw = P - 1, needed when P > 1.
    The full image's N tokens must form a square grid for "region" allocation. Returns P sorted
    int64 index tensors.
    """
    parts, n = final_attention.shape
    weights = None
    if parts > 1:
        if sub_grid is None or sub_grid[0] * sub_grid[1] != parts - 1:
            raise CompressError(f"{parts} partitions need a sub-image grid of {parts - 1} cells, got {sub_grid}")
        full = initial_attention[0]
        if config.allocation == "row_bands":
            weights = row_band_weights(full, parts - 1, config.alpha)
        else:
            side = math.isqrt(n)
            if side * side != n:
                raise CompressError(f"region allocation needs a square patch grid, got N={n} tokens")
            weights = region_weights(full.view(side, side), sub_grid, content)
    return select_tokens(final_attention, partition_budgets(parts, n, config, weights))

