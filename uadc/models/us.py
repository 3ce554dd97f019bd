"""Uninformed Students (Bergmann et al., CVPR 2020, "Uninformed Students: Student-Teacher Anomaly
Detection with Discriminative Latent Embeddings"), adapted to a CPU training budget.

Teacher: the frozen pretrained backbone tapped at ONE stage (``taps[0]``), followed by a small
descriptor network (3x3 conv -> LeakyReLU -> 1x1 conv to ``descriptor_dim`` channels). The paper
distils its descriptor network from a pretrained ResNet on image patches; here the descriptor
sits on top of the pretrained features and is distilled from them: it is trained together with
a throw-away linear decoder to reconstruct the (channel-standardised) backbone features, plus
the paper's compactness loss (decorrelated descriptor channels). Afterwards it is frozen and its
outputs are standardised per channel with the training-set mean/std (buffers ``teacher.mean`` /
``teacher.std``), as the students regress normalised descriptors in the paper.

Student: an ensemble of ``students`` small conv nets trained from scratch on the image, each
reaching the tap's stride with strided 3x3 convs, then three 3x3 convs (dilations 1, 2, 1: a
39-pixel receptive field at stride 4, near the teacher's, at no extra cost) and a 1x1 read-out,
regressing the normalised descriptors. Loss: sum over students
of their mean squared error.

Head: per position, regression error ``e = ||mean_i(s_i) - t||^2`` (sum over channels) plus
predictive variance ``v = mean over channels of var_i(s_i)``; each standardised with its mean/std
over the training images (buffers in ``head``, set by ``fit_head_stats``; identity until then),
summed, upsampled to the image size, gaussian-smoothed; image score = max.

Training order (``uadc/training/run.py`` for method ``us``)::

    model.pretrain_teacher(images, epochs=t["epochs"], lr=t["lr"], batch_size=t["batch_size"],
                           seed=recipe.seed)       # before fit(): it changes teacher outputs
    history = fit(model, images, t, seed, ...)       # the students, as for every method
    model.fit_head_stats(images)                     # after fit(): needs trained students

Measured (3 students, ``descriptor_dim`` 128, ``student_width`` 1; 256x256 input, batch 1; conv
MACs by forward hooks; forward = whole model incl. head, best of 7, 1 intra-op thread on the
shared 2-core machine). Students do not depend on the backbone: 0.14 M parameters and 0.58 GMACs
each.

===================  ====================  ============  ===============  =======
backbone (tap)       teacher par. (desc.)  student par.  MACs T + S       forward
===================  ====================  ============  ===============  =======
efficientnet_lite0   0.06 M (0.04 M)       0.42 M        0.28 G + 1.73 G  49 ms
mobilenet_v2         0.06 M (0.04 M)       0.42 M        0.28 G + 1.73 G  54 ms
resnet18             0.25 M (0.09 M)       0.42 M        1.13 G + 1.73 G  57 ms
wide_resnet50_2      0.96 M (0.31 M)       0.42 M        4.01 G + 1.73 G  93 ms
===================  ====================  ============  ===============  =======

Training cost at 256x256 with 1 thread: a student step (batch 16, cached teacher) ~1.4 s, i.e.
~45 s per epoch of 500 images; descriptor pretraining ~25 s per epoch of 500 images (backbone
features are cached: ~0.4 MB per image for efficientnet_lite0, recomputed per batch instead if
the cache would exceed 2 GiB); ``fit_head_stats`` ~50 ms per image.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from uadc.core.scoped import streams_kept
from uadc.models.backbones import FeatureExtractor, build_backbone
from uadc.models.base import KDModel
from uadc.models.heads import GaussianBlur, reduce_score
from uadc.models.rd import tap_shapes

COMPACTNESS_WEIGHT = 1.0
CACHE_LIMIT_BYTES = 2 << 30  # above this, backbone features are recomputed per pretraining batch


class Descriptor(nn.Module):
    """Backbone features -> patch descriptors; the 3x3 conv widens the receptive field a little."""

    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.leaky_relu(self.conv1(f), 0.1))


class USTeacher(nn.Module):
    """Frozen backbone tap + descriptor, standardised with training-set channel statistics."""

    def __init__(self, features: FeatureExtractor, cin: int, dim: int):
        super().__init__()
        self.features = features
        self.descriptor = Descriptor(cin, dim)
        self.register_buffer("mean", torch.zeros(1, dim, 1, 1))
        self.register_buffer("std", torch.ones(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        d = self.descriptor(self.features(x)[0])
        return [(d - self.mean) / self.std]


def student_net(dim: int, stride: int, width: float) -> nn.Sequential:
    """Strided 3x3 convs down to ``stride``, three 3x3 convs (dilations 1, 2, 1), 1x1 read-out."""
    def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False), nn.BatchNorm2d(cout),
                nn.LeakyReLU(0.1)]

    layers, cin = [], 3
    for k in range(int(math.log2(stride))):
        cout = max(8, round(min(32 * 2 ** k, 128) * width))
        layers += block(cin, cout, 2)
        cin = cout
    if cin == 3:  # stride 1 tap: no downsampling convs
        cin = max(8, round(32 * width))
        layers += block(3, cin)
    for dilation in (1, 2, 1):
        layers += block(cin, cin, 1, dilation)
    layers.append(nn.Conv2d(cin, dim, 1))
    return nn.Sequential(*layers)


class USStudents(nn.Module):
    def __init__(self, n: int, dim: int, stride: int, width: float):
        super().__init__()
        self.nets = nn.ModuleList([student_net(dim, stride, width) for _ in range(n)])

    def forward(self, x: torch.Tensor, t_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        size = t_feats[0].shape[-2:]
        outs = [net(x) for net in self.nets]
        # Odd input sizes: strided convs round up; the check is static at export.
        return [o if o.shape[-2:] == size else F.interpolate(o, size=size, mode="bilinear", align_corners=False)
                for o in outs]


def error_and_variance(t_feats, s_feats) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression error of the ensemble mean and predictive variance, each (N,1,h,w)."""
    s = torch.stack(list(s_feats), 0)
    mu = s.mean(0)
    e = ((mu - t_feats[0]) ** 2).sum(1, keepdim=True)
    v = ((s - mu) ** 2).mean(0).mean(1, keepdim=True)
    return e, v


class USHead(nn.Module):
    def __init__(self, image_size: int, sigma: float, score_reduction: str = "max", score_topk: float = 0.01,
                 score_pool: int = 1):
        super().__init__()
        self.image_size = image_size
        self.score_reduction, self.score_topk, self.score_pool = score_reduction, float(score_topk), int(score_pool)
        self.blur = GaussianBlur(sigma)
        for name, value in (("e_mean", 0.0), ("e_std", 1.0), ("v_mean", 0.0), ("v_std", 1.0)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, t_feats, s_feats) -> tuple[torch.Tensor, torch.Tensor]:
        e, v = error_and_variance(t_feats, s_feats)
        m = (e - self.e_mean) / self.e_std + (v - self.v_mean) / self.v_std
        m = F.interpolate(m, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        m = self.blur(m)
        return m, reduce_score(m, self.score_reduction, self.score_topk, pool=self.score_pool)


def compactness(d: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal channel correlation of descriptors (paper's compactness loss,
    squared so that anti-correlation is not rewarded)."""
    z = d.transpose(0, 1).flatten(1)  # (D, N*h*w)
    z = (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-6)
    corr = z @ z.T / z.shape[1]
    off = corr - torch.diag(torch.diag(corr))
    n = corr.shape[0]
    return (off ** 2).sum() / (n * (n - 1))


def channel_stats(chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std over (N,h,w) of an iterable of (N,C,h,w) tensors, in float64."""
    s = sq = None
    count = 0
    for c in chunks:
        c = c.double()
        cs, csq = c.sum((0, 2, 3)), (c ** 2).sum((0, 2, 3))
        s, sq = (cs, csq) if s is None else (s + cs, sq + csq)
        count += c.shape[0] * c.shape[2] * c.shape[3]
    mean = s / count
    std = (sq / count - mean ** 2).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def scalar_stats(chunks) -> tuple[float, float]:
    mean, std = channel_stats(chunks)
    return float(mean[0]), float(std[0])


class UninformedStudents(KDModel):
    method = "us"
    discrepancy_per = "student"   # its students all describe one tap

    def loss(self, t_feats, s_feats) -> torch.Tensor:
        return sum(F.mse_loss(s, t_feats[0]) for s in s_feats)

    def discrepancy(self, t_feats, s_feats) -> list[float]:
        # Per student: mean squared error per descriptor channel (1.0 = predicting the mean).
        return [float(F.mse_loss(s, t_feats[0])) for s in s_feats]

    # ------------------------------------------------------------------ teacher pretraining

    @torch.no_grad()
    def _backbone(self, images: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
        self.teacher.eval()
        return [self.teacher.features(images[i:i + batch_size])[0] for i in range(0, len(images), batch_size)]

    def pretrain_teacher(self, images: torch.Tensor, epochs: int, lr: float, batch_size: int,
                         seed: int) -> list[dict]:
        """Distil the descriptor from the frozen backbone tap, then freeze it and fit the teacher's
        descriptor mean/std on ``images`` (normalised, (N,3,H,W)). Returns per-epoch history with
        ``reconstruction`` (MSE on channel-standardised backbone features) and ``compactness``."""
        feats = self._feature_source(images)
        f_mean, f_std = channel_stats(feats(torch.arange(i, min(i + 32, len(images))))
                                      for i in range(0, len(images), 32))
        f_mean, f_std = f_mean.view(1, -1, 1, 1), f_std.view(1, -1, 1, 1)
        desc = self.teacher.descriptor
        with streams_kept():  # own seed, leave the global stream to the students (one thread at a time)
            torch.default_generator.manual_seed(seed)   # initialised on the CPU, moved after
            decoder = nn.Conv2d(desc.conv2.out_channels, f_mean.shape[1], 1).to(images.device)
        params = list(desc.parameters()) + list(decoder.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        bs = min(batch_size, len(images))
        history = []
        for epoch in range(epochs):
            t0, rec_sum, comp_sum, steps = time.time(), 0.0, 0.0, 0
            perm = torch.randperm(len(images), generator=gen)
            for b in range(max(1, len(images) // bs)):
                f = feats(perm[b * bs:(b + 1) * bs])
                d = desc(f)
                rec = F.mse_loss(decoder(d), (f - f_mean) / f_std)
                comp = compactness(d)
                opt.zero_grad(set_to_none=True)
                (rec + COMPACTNESS_WEIGHT * comp).backward()
                opt.step()
                rec_sum, comp_sum, steps = rec_sum + rec.item(), comp_sum + comp.item(), steps + 1
            history.append({"epoch": epoch + 1, "loss": (rec_sum + COMPACTNESS_WEIGHT * comp_sum) / steps,
                            "reconstruction": rec_sum / steps,
                            "compactness": comp_sum / steps, "seconds": round(time.time() - t0, 2)})
        for p in desc.parameters():
            p.requires_grad_(False)
        self._fit_teacher_stats(feats, len(images))
        return history

    def _feature_source(self, images: torch.Tensor):
        """idx -> backbone features of images[idx]; cached when they fit in CACHE_LIMIT_BYTES."""
        probe = self._backbone(images[:1])[0]
        if probe.numel() * probe.element_size() * len(images) > CACHE_LIMIT_BYTES:
            return lambda idx: self._backbone(images[idx], len(idx))[0]
        cache = torch.cat(self._backbone(images))
        return lambda idx: cache[idx]

    @torch.no_grad()
    def _fit_teacher_stats(self, feats, n: int) -> None:
        desc = self.teacher.descriptor
        mean, std = channel_stats(desc(feats(torch.arange(i, min(i + 32, n)))) for i in range(0, n, 32))
        self.teacher.mean.copy_(mean.view_as(self.teacher.mean))
        self.teacher.std.copy_(std.view_as(self.teacher.std))

    # ------------------------------------------------------------------ head statistics

    @torch.no_grad()
    def fit_head_stats(self, images: torch.Tensor, batch_size: int = 8) -> dict:
        """Mean/std of the regression error and predictive variance over ``images`` (the paper uses
        anomaly-free validation images); call after student training. Small batches are faster
        per image on CPU (cache-resident activations)."""
        was_training = self.training
        self.eval()
        es, vs = [], []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size]
            t = self.teacher(x)
            e, v = error_and_variance(t, self.student(x, t))
            es.append(e)
            vs.append(v)
        self.train(was_training)
        h = self.head
        (em, esd), (vm, vsd) = scalar_stats(es), scalar_stats(vs)
        for name, value in (("e_mean", em), ("e_std", esd), ("v_mean", vm), ("v_std", vsd)):
            getattr(h, name).fill_(value)
        return {"e_mean": em, "e_std": esd, "v_mean": vm, "v_std": vsd}


def build_us(m: dict, image_size: int) -> UninformedStudents:
    features = FeatureExtractor(build_backbone(m["backbone"], m["pretrained"], m["weights"]), m["taps"][:1])
    (cin, stride), = tap_shapes(features)
    dim = int(m.get("descriptor_dim", 128))
    teacher = USTeacher(features, cin, dim)
    student = USStudents(int(m.get("students", 3)), dim, stride, float(m.get("student_width", 1.0)))
    head = USHead(image_size, m["smoothing_sigma"], m.get("score_reduction", "max"), m.get("score_topk", 0.01),
                  m.get("score_pool", 1))
    return UninformedStudents(teacher, student, head)
