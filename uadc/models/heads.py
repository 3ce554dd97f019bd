"""Scoring heads: teacher/student features -> anomaly map (N,1,H,W) and image score (N,).

Heads are plain torch ops (normalise, distance, upsample, combine, gaussian smoothing, max or
mean of the top-k) so the exported ONNX graph needs nothing but a runtime."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from uadc.config.validation import short
from uadc.core.errors import UadcError


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = int(4 * sigma + 0.5)  # same truncation as scipy.ndimage.gaussian_filter
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class GaussianBlur(nn.Module):
    """Separable gaussian smoothing of a 1-channel map with reflect padding."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = float(sigma)
        k = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        self.radius = (k.numel() - 1) // 2
        self.register_buffer("kx", k.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("ky", k.view(1, 1, -1, 1), persistent=False)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        if self.radius == 0:
            return m
        r = self.radius
        m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="reflect"), self.kx)
        return F.conv2d(F.pad(m, (0, 0, r, r), mode="reflect"), self.ky)


def _reflect(i: int, n: int) -> int:
    """Index ``i`` mirrored into [0, n) without repeating the edge (``F.pad(mode="reflect")``)."""
    period = 2 * (n - 1)
    i = abs(i) % period if period else 0
    return period - i if i > n - 1 else i


def upsample_matrix(h: int, n: int) -> torch.Tensor:
    """(n, h): bilinear upsampling of a length-``h`` axis to ``n`` (half-pixel centres, as
    ``F.interpolate(..., align_corners=False)`` and ONNX Resize), read off the identity."""
    eye = torch.eye(h, dtype=torch.float64).view(1, 1, h, h)
    return F.interpolate(eye, size=(n, h), mode="bilinear", align_corners=False)[0, 0]


class MatrixBlur(nn.Module):
    """``GaussianBlur`` of an n x n map as two matrix products, K @ m @ K^T, with the reflect
    padding folded into K. Same result up to float rounding (<= 4e-7 on [0, 1) maps); ORT runs a
    1-channel 1x33 Conv poorly (im2col, NCHWc reorders, pads) and MatMul well
    (``bench/head_equivalence.py`` times the heads).

    A smaller h x w map is bilinearly upsampled to n x n first, folded into the same two products:
    upsampling is separable and linear, so ``blur(up(m)) = (K U_h) m (K U_w)^T`` with U the
    upsampling matrices. At 256 px from a 64 x 64 map that is 5 M multiply-adds instead of a Resize
    and 34 M."""

    def __init__(self, sigma: float, n: int):
        super().__init__()
        self.sigma, self.n = float(sigma), int(n)
        k = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        r = (k.numel() - 1) // 2
        mat = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(-r, r + 1):
                mat[i, _reflect(i + j, n)] += float(k[j + r])
        self.identity = r == 0
        self._mat = mat
        self._folded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # h -> K @ U_h and its transpose
        self.register_buffer("k", mat.float(), persistent=False)
        self.register_buffer("kt", mat.t().float().contiguous(), persistent=False)

    def folded(self, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K @ U_h (n, h) and its transpose, in float64 rounded once: constants of the exported graph."""
        if h not in self._folded:
            a = self._mat @ upsample_matrix(h, self.n)
            self._folded[h] = (a.float(), a.t().float().contiguous())
        return self._folded[h]

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        h, w = m.shape[-2:]
        if (h, w) == (self.n, self.n):
            return m if self.identity else torch.matmul(torch.matmul(self.k, m), self.kt)
        a_h, a_wt = self.folded(int(h))[0].to(m.device), self.folded(int(w))[1].to(m.device)
        return torch.matmul(torch.matmul(a_h, m), a_wt)


def topk_count(frac: float, pixels: int) -> int:
    """Pixels the top-k mean averages: ``frac`` of the map, at least one."""
    return max(1, min(pixels, round(frac * pixels)))


def reduce_score(amap: torch.Tensor, reduction: str = "max", topk: float = 0.01,
                 ordered: bool = True, pool: int = 1) -> torch.Tensor:
    """Image score (N,) from the map (N,1,H,W): its max, or the mean of its top ``topk`` fraction of
    pixels (ONNX TopK + ReduceMean; k is fixed by the map size, so it is a constant in the graph).
    A mean over the top pixels asks a defect to cover an area, not one hot pixel, to score high.
    ``ordered=False`` exports TopK with sorted=0: the same pixels, only the summation order differs,
    and ORT's TopK skips the final sort (about 20 % of its time at 128 px). ``pool`` > 1 reads the map
    average-pooled ``pool`` x ``pool`` (k counts pooled pixels): ORT's TopK costs about 20 ns per
    input pixel, 0.34 ms of a 1-2 ms head at 128 px, and a smoothed map ranks images the same."""
    if pool > 1:
        amap = F.avg_pool2d(amap, pool)
    flat = amap.flatten(1)
    if reduction == "max":
        return flat.amax(dim=1)
    return torch.topk(flat, topk_count(topk, flat.shape[1]), dim=1, sorted=ordered).values.mean(dim=1)


def l2_normalized_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """0.5 * ||t/|t| - s/|s| ||^2 over channels, (N,1,h,w), in [0, 2] (STFPM)."""
    t = F.normalize(t, dim=1)
    s = F.normalize(s, dim=1)
    return 0.5 * ((t - s) ** 2).sum(dim=1, keepdim=True)


def cosine_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """1 - cos(t, s) over channels, (N,1,h,w) (Reverse Distillation)."""
    return 1.0 - F.cosine_similarity(t, s, dim=1).unsqueeze(1)


#: the compiled graph's bank initializers (``head`` . ``image_knn`` . buffer): ``knn_bank`` re-describes them
BANK_INITIALIZER = "head.image_knn.bank_t"
CENTER_INITIALIZER = "head.image_knn.center"
BANK_SQ_INITIALIZER = "head.image_knn.bank_sq"


class _Bank(nn.Module):
    """A nearest-neighbour bank: ``bank_t`` (D, M) centred descriptors as MatMul reads them, ``center``
    (D,) their mean, ``bank_sq`` (M,) their squared norms, ``stats`` its scale. Sized by the data it was
    fitted on: loading takes the checkpoint's sizes."""

    @property
    def bank_size(self) -> int:
        return self.bank_t.shape[1]

    def set_bank(self, bank: torch.Tensor) -> None:
        """``bank`` (M, D): the training descriptors; the scale is unset until ``set_stats``."""
        bank = bank.detach().float()
        self.center = bank.mean(dim=0)
        centred = bank - self.center
        self.bank_t = centred.t().contiguous()
        self.bank_sq = (centred * centred).sum(dim=1)
        self.stats = torch.zeros(0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, _ in self.named_buffers(recurse=False):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ImageKNN(_Bank):
    """Image-level evidence for the score: how far the image's pooled teacher features lie from the
    nearest training normals. Per tap the spatial mean is L2-normalised; the squared distance is
    ``|q-c|^2 + |b-c|^2 - 2 (q-c).(b-c)`` around the bank's mean ``c``, one MatMul in the graph. The
    centring keeps the terms small: with unit vectors (``2 taps - 2 q.b``) the dot products sit
    near 1, where bf16 (OpenVINO on AMX) resolves 0.004, about the distances' spread on normals.

    ``score' = score + weight * (std_s / std_d) * dist``: the distance in units of the map score, each
    term's spread measured on the validation normals of every category pooled (``fit``). It ranks as
    the sum of the two standardised terms does, and stays a positive score on the map's scale, so
    thresholds and score ratios keep their meaning. The raw score until fitted. The bank's size is
    the training set's, so loading resizes the buffers to the checkpoint's."""

    def __init__(self, tap_index: list[int], weight: float, k: int = 1):
        super().__init__()
        self.tap_index, self.weight, self.k = list(tap_index), float(weight), int(k)
        self.register_buffer("bank_t", torch.zeros(0, 0))  # (D, M): M centred descriptors, as MatMul reads them
        self.register_buffer("center", torch.zeros(0))     # (D,): the bank's mean descriptor
        self.register_buffer("bank_sq", torch.zeros(0))    # (M,): squared norms of the centred descriptors
        self.register_buffer("stats", torch.zeros(0))      # score mean, std, distance mean, std

    @property
    def fitted(self) -> bool:
        return self.stats.numel() == 4 and self.bank_t.numel() > 0

    def describe(self, t_feats) -> torch.Tensor:
        """(N, D): per tap, the L2-normalised spatial mean of the teacher's features."""
        return torch.cat([F.normalize(t_feats[i].mean(dim=(2, 3)), dim=1) for i in self.tap_index], 1)

    def distance(self, t_feats) -> torch.Tensor:
        return self.distance_from(self.describe(t_feats))

    def distance_from(self, desc: torch.Tensor) -> torch.Tensor:
        """(N,) mean squared distance to the ``k`` nearest bank descriptors."""
        q = desc - self.center
        d = (q * q).sum(dim=1, keepdim=True) + self.bank_sq - 2.0 * torch.matmul(q, self.bank_t)
        k = min(self.k, self.bank_size)
        near = d.amin(dim=1) if k == 1 else -torch.topk(-d, k, dim=1).values.mean(dim=1)
        return torch.clamp(near, min=0.0)

    def combine(self, score: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        _, s_std, _, d_std = self.stats
        return score + (self.weight * s_std / d_std) * dist

    def forward(self, t_feats, score: torch.Tensor) -> torch.Tensor:
        return self.combine(score, self.distance(t_feats)) if self.fitted else score

    @staticmethod
    def bank_indices(n: int, max_bank: int, seed: int) -> torch.Tensor:
        """Which of ``n`` training images (in dataset order) the bank holds: all, or a seeded subset."""
        if n <= max_bank:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_bank].sort().values

    def set_stats(self, scores: torch.Tensor, dists: torch.Tensor) -> dict[str, float]:
        """Standardisation from validation normals' raw scores and distances."""
        stats = [float(scores.mean()), _spread(scores), float(dists.mean()), _spread(dists)]
        self.stats = torch.tensor(stats, dtype=torch.float32, device=self.center.device)  # beside the bank
        return dict(zip(("score_mean", "score_std", "dist_mean", "dist_std"), stats))



#: the patch kNN's bank initializers (``knn_bank`` re-describes only the image kNN's)
PATCH_BANK_INITIALIZER = "head.patch_knn.bank_t"


class PatchKNN(_Bank):
    """Location-level evidence for the map (PatchCore-style): how far each location's teacher features
    lie from the nearest training patch. Per tap the features are 3x3 averaged (a location sees its
    neighbourhood) and resized to the finest chosen tap; the squared distance to the nearest of the
    bank's patches (a greedy coreset of the training patches, ``training.fit``) is computed around
    the bank's mean as in ``ImageKNN``: one MatMul and a ReduceMin in the graph.

    ``map' = map + weight * (std_m / std_d) * dist`` where the head combines its layer maps, before
    smoothing: the distance in units of the map, both spreads measured there on the validation
    normals of every category pooled. It ranks as the standardised sum does and keeps the map positive;
    the plain map until fitted. Buffers take the checkpoint's sizes on loading."""

    def __init__(self, tap_index: list[int], weight: float):
        super().__init__()
        self.tap_index, self.weight = list(tap_index), float(weight)
        self.register_buffer("bank_t", torch.zeros(0, 0))  # (D, M): M centred patch descriptors
        self.register_buffer("center", torch.zeros(0))     # (D,)
        self.register_buffer("bank_sq", torch.zeros(0))    # (M,)
        self.register_buffer("stats", torch.zeros(0))      # map std, distance std (validation normals)

    @property
    def fitted(self) -> bool:
        return self.stats.numel() == 2 and self.bank_t.numel() > 0

    def describe(self, t_feats) -> torch.Tensor:
        """(N, D, h, w): the chosen taps 3x3 averaged, at the finest one's size, channels concatenated."""
        feats = [F.avg_pool2d(t_feats[i], 3, stride=1, padding=1, count_include_pad=False) for i in self.tap_index]
        h, w = max((f.shape[-2:] for f in feats), key=lambda hw: hw[0] * hw[1])
        return torch.cat([f if f.shape[-2:] == (h, w) else
                          F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False) for f in feats], 1)

    @staticmethod
    def patches(desc: torch.Tensor) -> torch.Tensor:
        """(N*h*w, D): one row per location."""
        return desc.flatten(2).transpose(1, 2).reshape(-1, desc.shape[1])

    def distance(self, t_feats) -> torch.Tensor:
        """(N, 1, h, w): squared distance of each location to its nearest bank patch."""
        q = self.describe(t_feats)
        h, w = q.shape[-2:]
        q = (q - self.center.view(1, -1, 1, 1)).flatten(2).transpose(1, 2)    # (N, hw, D)
        d = (q * q).sum(dim=2, keepdim=True) + self.bank_sq - 2.0 * torch.matmul(q, self.bank_t)
        return torch.clamp(d.amin(dim=2), min=0.0).reshape(-1, 1, h, w)

    def resized(self, t_feats, size) -> torch.Tensor:
        d = self.distance(t_feats)
        return d if tuple(d.shape[-2:]) == tuple(size) else F.interpolate(d, size=size, mode="bilinear",
                                                                          align_corners=False)

    def forward(self, t_feats, amap: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            return amap
        m_std, d_std = self.stats
        return amap + (self.weight * m_std / d_std) * self.resized(t_feats, amap.shape[-2:])

    def set_stats(self, maps: torch.Tensor, dists: torch.Tensor) -> dict[str, float]:
        """Scale from validation normals' combined maps and distances (same size, before smoothing)."""
        stats = [_spread(maps), _spread(dists)]
        self.stats = torch.tensor(stats, dtype=torch.float32, device=self.center.device)
        return dict(zip(("map_std", "dist_std"), stats))


def _spread(x: torch.Tensor) -> float:
    # a floor keeps one repeated value (or a single image) from dividing by zero
    return max(float(x.std()) if x.numel() > 1 else 0.0, 1e-6)


class DistanceHead(nn.Module):
    """Per-layer distance maps, upsampled to the input size, combined, smoothed; score = max (or
    top-k mean, ``reduce_score``)."""

    def __init__(self, image_size: int, distance: str = "l2", combine: str = "product", sigma: float = 4.0,
                 skip_teacher: int = 0, score_reduction: str = "max", score_topk: float = 0.01,
                 score_pool: int = 1):
        super().__init__()
        self.score_reduction = score_reduction
        self.score_topk = float(score_topk)
        self.score_pool = int(score_pool)
        self.image_size = image_size
        self.distance = distance
        self.combine = combine
        self.skip_teacher = skip_teacher  # leading teacher outputs that are not compared (PaSTe split)
        self.blur = GaussianBlur(sigma)
        self.image_knn: ImageKNN | None = None
        self.patch_knn: PatchKNN | None = None

    ordered_topk = True

    def layer_maps(self, t_feats, s_feats) -> list[torch.Tensor]:
        fn = l2_normalized_distance if self.distance == "l2" else cosine_distance
        return [fn(t, s) for t, s in zip(t_feats[self.skip_teacher:], s_feats)]

    def combined(self, t_feats, s_feats) -> torch.Tensor:
        """The layer maps upsampled to the input size and combined, before smoothing."""
        size = (self.image_size, self.image_size)
        maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in self.layer_maps(t_feats, s_feats)]
        amap = maps[0]
        for m in maps[1:]:
            amap = amap * m if self.combine == "product" else amap + m
        return amap

    def finish(self, amap: torch.Tensor) -> torch.Tensor:
        """The combined map at the input size, smoothed."""
        return self.blur(amap)

    def forward(self, t_feats, s_feats) -> tuple[torch.Tensor, torch.Tensor]:
        amap = self.combined(t_feats, s_feats)
        if self.patch_knn is not None:
            amap = self.patch_knn(t_feats, amap)
        amap = self.finish(amap)
        return amap, self.image_score(t_feats, reduce_score(amap, self.score_reduction, self.score_topk,
                                                            ordered=self.ordered_topk, pool=self.score_pool))

    def image_score(self, t_feats, score: torch.Tensor) -> torch.Tensor:
        return score if self.image_knn is None else self.image_knn(t_feats, score)


class FastDistanceHead(DistanceHead):
    """Same decisions as ``DistanceHead`` from less work: per-layer distances as one dot product
    (for unit vectors 0.5*||a-b||^2 = 1 - a.b), maps combined at the finest feature resolution,
    then the upsampling to the input size and the same full-resolution smoothing as one pair of
    matrix products (``MatrixBlur``), and the top-k mean from an unsorted TopK.

    Smoothing at feature resolution too (sigma / stride) was cheaper still, but moved image AUROC
    by 0.3 point on magnetic_tile and map correlation to 0.998 (``bench/head_equivalence.py``), so
    only the combine moved down."""

    def __init__(self, image_size: int, *args, **kwargs):
        super().__init__(image_size, *args, **kwargs)
        self.blur = MatrixBlur(self.blur.sigma, image_size)

    def layer_maps(self, t_feats, s_feats) -> list[torch.Tensor]:
        maps = []
        for t, s in zip(t_feats[self.skip_teacher:], s_feats):
            norms = torch.clamp((t * t).sum(1, keepdim=True) * (s * s).sum(1, keepdim=True), min=1e-24)
            cos = (t * s).sum(1, keepdim=True) * torch.rsqrt(norms)
            maps.append(1.0 - cos)  # l2 of unit vectors (STFPM) and cosine distance (RD) alike
        return maps

    ordered_topk = False

    def combined(self, t_feats, s_feats) -> torch.Tensor:
        """The layer maps combined at the finest one's resolution."""
        maps = self.layer_maps(t_feats, s_feats)
        h, w = max((m.shape[-2:] for m in maps), key=lambda hw: hw[0] * hw[1])
        amap = None
        for m in maps:
            if m.shape[-2:] != (h, w):
                m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
            amap = m if amap is None else (amap * m if self.combine == "product" else amap + m)
        return amap

    def finish(self, amap: torch.Tensor) -> torch.Tensor:
        # MatrixBlur upsamples as it smooths; a replaced blur (bench.loco's unsmoothed maps) does not
        if not isinstance(self.blur, MatrixBlur) and amap.shape[-2:] != (self.image_size, self.image_size):
            amap = F.interpolate(amap, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.blur(amap)


def distance_head(m: dict, image_size: int, distance: str, skip_teacher: int = 0) -> DistanceHead:
    """The recipe's scoring head: ``model.head`` exact (reference) or fast (same decisions, less work)."""
    cls = FastDistanceHead if m.get("head", "exact") == "fast" else DistanceHead
    head = cls(image_size, distance, m["combine"], m["smoothing_sigma"], skip_teacher=skip_teacher,
               score_reduction=m.get("score_reduction", "max"), score_topk=m.get("score_topk", 0.01),
               score_pool=m.get("score_pool", 1))
    knn = m.get("image_knn") or {}
    if knn.get("weight", 0) > 0:
        head.image_knn = ImageKNN(_tap_index(m, knn, "image_knn", skip_teacher), knn["weight"], knn.get("k", 1))
    patch = m.get("patch_knn") or {}
    if patch.get("weight", 0) > 0:
        head.patch_knn = PatchKNN(_tap_index(m, patch, "patch_knn", skip_teacher), patch["weight"])
    return head


def _tap_index(m: dict, knn: dict, name: str, skip_teacher: int) -> list[int]:
    """Positions in the teacher's outputs of a kNN's taps (default: all of ``model.taps``)."""
    taps = knn.get("taps") or m["taps"]
    unknown = [t for t in taps if t not in m["taps"]]
    if unknown:
        raise UadcError(f"model.{name}.taps: {short(unknown[0])} is not one of model.taps ({', '.join(m['taps'])})")
    return [skip_teacher + m["taps"].index(t) for t in taps]


def fast_like(head: DistanceHead) -> FastDistanceHead:
    """The fast head with every setting of ``head`` (the map part holds no weights, so it scores the same
    model; the kNNs, which hold the banks, are shared; the patch kNN keeps the scale measured where the
    fitting head combines its maps)."""
    fast = FastDistanceHead(head.image_size, head.distance, head.combine, head.blur.sigma, head.skip_teacher,
                            head.score_reduction, head.score_topk, head.score_pool)
    fast.image_knn, fast.patch_knn = head.image_knn, head.patch_knn
    return fast


def mean_layer_distance(head: DistanceHead, t_feats, s_feats) -> list[float]:
    return [float(m.mean()) for m in head.layer_maps(t_feats, s_feats)]


def conv_out(size: int, stride: int) -> int:
    return math.ceil(size / stride)
