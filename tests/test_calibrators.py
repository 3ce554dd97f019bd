"""Range calibrators: entropy vs an independent loop reference of NVIDIA's published algorithm,
mse vs ``torch.ao.quantization.HistogramObserver``, minmax / percentile vs numpy, registry.

Reference for ``entropy``: S. Migacz, "8-bit Inference with TensorRT" (GTC 2017), "Entropy
Calibration - pseudocode", with the conventions documented in ``calibrators/entropy.py``:
Q built from the unclipped bins, bin ``j`` in group ``j * L // i``, KL = inf when P > 0 where
Q == 0, first minimum wins, threshold ``(m + 0.5) * bin_width``.
"""

from __future__ import annotations

import math
from importlib.metadata import EntryPoint

import numpy as np
import pytest
import torch

import uadc.calibrators as calibrators
from uadc.calibrators import base, get_calibrator
from uadc.calibrators.base import AbsHistogram, Calibrator, available_calibrators, register
from uadc.calibrators.entropy import EntropyCalibrator, optimal_bin_count
from uadc.calibrators.mse import MSECalibrator
from uadc.calibrators.percentile import PercentileCalibrator

BUILTINS = ["entropy", "minmax", "mse", "percentile"]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _abs_hist(x: np.ndarray, bins: int) -> tuple[np.ndarray, float]:
    a = np.abs(x)
    return np.histogram(a, bins=bins, range=(0.0, float(a.max())))[0], float(a.max()) / bins


# ------------------------------------------------------------------ entropy: loop reference

def reference_entropy_bin(hist: list[float], levels: int = 128) -> int:
    """NVIDIA's entropy calibration written as plainly as possible: returns m (bins kept)."""
    hist = [float(h) for h in hist]
    n = len(hist)
    best_i, best_kl = None, math.inf
    for i in range(levels, n + 1):
        # reference distribution P: first i bins, outliers folded into the last one
        p = hist[:i]
        p[i - 1] += sum(hist[i:])
        # candidate Q: the first i bins merged into `levels` groups ...
        group_sum = [0.0] * levels
        group_nonzero = [0] * levels
        for j in range(i):
            g = j * levels // i
            group_sum[g] += hist[j]
            if hist[j] > 0:
                group_nonzero[g] += 1
        # ... and expanded back uniformly over each group's non-empty bins
        q = [0.0] * i
        for j in range(i):
            if hist[j] > 0:
                g = j * levels // i
                q[j] = group_sum[g] / group_nonzero[g]
        p_sum, q_sum = sum(p), sum(q)
        kl = 0.0
        for j in range(i):
            if p[j] == 0:
                continue
            if q[j] == 0:
                kl = math.inf
                break
            pj, qj = p[j] / p_sum, q[j] / q_sum
            kl += pj * math.log(pj / qj)
        if kl < best_kl:
            best_i, best_kl = i, kl
    assert best_i is not None
    return best_i


def _gauss(n: int = 100_000) -> np.ndarray:
    return _rng(1).standard_normal(n)


def _gauss_outliers() -> np.ndarray:
    return np.r_[_rng(2).standard_normal(100_000), [40.0, -45.0, 50.0]]


def _uniform() -> np.ndarray:
    return _rng(3).uniform(-1.0, 1.0, 100_000)


def _laplace() -> np.ndarray:
    return _rng(4).laplace(size=50_000)


def _relu() -> np.ndarray:
    return np.maximum(_rng(5).standard_normal(50_000), 0.0)


# 2048 bins is the real configuration (about 1 s each for the loop reference); the smaller
# 512-bin histograms cover more shapes cheaply (the algorithm does not depend on n).
@pytest.mark.parametrize("data, bins", [
    (_gauss, 2048), (_gauss_outliers, 2048), (_uniform, 2048),
    (_laplace, 512), (_relu, 512), (_gauss_outliers, 512),
])
def test_entropy_matches_reference_on_data(data, bins):
    x = data()
    hist, width = _abs_hist(x, bins)
    m = reference_entropy_bin(hist.tolist())
    assert optimal_bin_count(hist) == m
    cal = EntropyCalibrator(num_bins=bins)
    cal.observe(x)
    lo, hi = cal.compute_range()
    assert hi == pytest.approx((m + 0.5) * width, rel=1e-12)
    assert lo == -hi


def test_entropy_matches_reference_on_crafted_histograms():
    rng = _rng(6)
    sparse = np.zeros(400)
    sparse[::7] = rng.integers(1, 100, size=len(sparse[::7]))  # empty bins: Q == 0 < P cases
    sparse[395] = 3
    flat = np.full(512, 10.0)                                  # exact uniform: keep everything
    spike = np.r_[np.full(100, 1000.0), np.zeros(300), [1.0] * 12]  # far, tiny tail
    decaying = np.floor(1e4 * np.exp(-np.arange(600) / 60.0))   # exponential, ends in zeros
    flat_head = np.r_[np.full(128, 10.0), np.zeros(384)]          # KL == 0 for i = 128, 256, ...
    for hist in (sparse, flat, spike, decaying, flat_head):
        assert optimal_bin_count(hist) == reference_entropy_bin(hist.tolist())
    assert optimal_bin_count(flat) == 512
    assert optimal_bin_count(flat_head) == 128  # ties: the first (smallest) candidate wins


def test_entropy_behaviour():
    # outliers: the threshold clips them and sits at the bulk of the gaussian
    cal = get_calibrator("entropy")
    for batch in np.array_split(_gauss_outliers(), 4):
        cal.observe(batch)
    lo, hi = cal.compute_range()
    assert 2.5 < hi < 6.0 and lo == -hi
    # uniform: nothing worth clipping, threshold ~ max|x|
    cal = get_calibrator("entropy")
    x = _uniform()
    cal.observe(x)
    assert cal.compute_range()[1] == pytest.approx(np.abs(x).max(), rel=2e-3)
    # only zeros -> empty range; nothing observed -> error
    cal = get_calibrator("entropy")
    cal.observe(np.zeros((3, 4)))
    assert cal.compute_range() == (0.0, 0.0)


def test_entropy_streaming_equals_single_batch_when_range_fixed():
    x = _laplace()
    x[0] = 20.0  # the first batch holds the global max|x|, so no re-binning happens
    whole, parts = EntropyCalibrator(), EntropyCalibrator()
    whole.observe(x)
    for batch in np.array_split(x, 5):
        parts.observe(batch.reshape(-1, 2) if batch.size % 2 == 0 else batch)
    assert parts.compute_range() == whole.compute_range()


# ------------------------------------------------------------------- streaming |x| histogram

def test_abs_histogram_extends_with_same_width_then_halves():
    w = 0.01
    centers = lambda k: (np.asarray(k) + 0.5) * w  # noqa: E731  (bin centres: no edge ties)
    rng = _rng(7)
    b1 = np.r_[centers(rng.integers(0, 2048, 5000)), 2048 * w]  # max = 20.48 -> width 0.01
    b2 = -centers(rng.integers(0, 3000, 5000))                   # needs 3000 bins: appended
    h = AbsHistogram(2048)
    h.add(np.abs(b1))
    h.add(np.abs(b2))
    assert h.width == pytest.approx(w) and len(h.counts) == 3000
    # b1's max sits on the closed right edge of its range, i.e. in bin 2047
    index = np.r_[np.minimum(b1 // w, 2047), np.abs(b2) // w].astype(int)
    expected = np.bincount(index, minlength=3000)
    np.testing.assert_array_equal(h.counts, expected)
    b3 = centers(rng.integers(0, 10_000, 5000))                  # 10000 bins > 4096: merge x4
    h.add(b3)
    assert h.width == pytest.approx(4 * w) and len(h.counts) <= 4096
    allv = np.abs(np.r_[b1, b2, b3])
    index = np.r_[index // 4, (b3 // (4 * w)).astype(int)]  # merged bins keep their counts
    expected = np.bincount(index, minlength=len(h.counts))
    np.testing.assert_array_equal(h.counts, expected)
    assert h.total == allv.size and h.max_abs == allv.max()


# --------------------------------------------------------------------- mse vs torch observer

def _laplace_outliers() -> list[np.ndarray]:
    x = _rng(8).laplace(size=50_000)
    x[:5] = [30.0, -25.0, 40.0, 28.0, -33.0]
    return [x]


def _growing_batches() -> list[np.ndarray]:
    rng = _rng(9)
    return [rng.standard_normal((4, 8, 16, 16)) * s + o
            for s, o in [(0.5, 0.0), (1.0, 0.2), (2.0, -0.3), (3.0, 1.0)]]


MSE_CASES = {
    "normal": lambda: [_rng(10).standard_normal(100_000)],
    "relu": lambda: [np.maximum(_rng(11).standard_normal(100_000), 0.0)],
    "laplace_outliers": _laplace_outliers,
    "lognormal": lambda: [_rng(12).lognormal(0.0, 1.5, 50_000)],
    "student_t3": lambda: [_rng(13).standard_t(3, 50_000)],
    "growing_multibatch": _growing_batches,
    "constant_then_normal": lambda: [np.full(100, 2.5), _rng(14).standard_normal(1000)],
}


@pytest.mark.parametrize("case", list(MSE_CASES))
def test_mse_matches_torch_histogram_observer(case):
    """Compare with the observer's ``_non_linear_param_search()`` (the (min, max) it selects,
    before ``calculate_qparams`` widens it to contain 0); tolerance 1 % of torch's range width."""
    observer = torch.ao.quantization.HistogramObserver(
        dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    cal = get_calibrator("mse")
    for batch in MSE_CASES[case]():
        batch = np.asarray(batch, dtype=np.float32)
        observer(torch.from_numpy(batch))
        cal.observe(batch)
    t_lo, t_hi = (float(v) for v in observer._non_linear_param_search())
    lo, hi = cal.compute_range()
    tol = 0.01 * (t_hi - t_lo)
    assert abs(lo - t_lo) <= tol and abs(hi - t_hi) <= tol, ((lo, hi), (t_lo, t_hi))
    # same histogram up to float32-vs-float64 edge ties when old bins are re-mapped
    t_hist = observer.histogram.numpy().astype(np.float64)
    assert cal.hist.sum() == pytest.approx(t_hist.sum())
    assert np.abs(cal.hist - t_hist).sum() <= 1e-3 * t_hist.sum()


def test_mse_clips_relative_to_minmax_and_is_asymmetric():
    x = MSE_CASES["normal"]()[0]
    cal = MSECalibrator()
    cal.observe(x)
    lo, hi = cal.compute_range()
    assert x.min() <= lo < hi <= x.max() and (lo, hi) != (x.min(), x.max())
    assert not MSECalibrator.symmetric


# --------------------------------------------------------------------- minmax and percentile

def test_minmax_matches_numpy():
    batches = _growing_batches()
    x = np.concatenate([b.ravel() for b in batches])
    asym, sym = get_calibrator("minmax"), get_calibrator("minmax", symmetric=True)
    for batch in batches:
        asym.observe(batch)
        sym.observe(batch)
    assert asym.compute_range() == (x.min(), x.max())
    m = np.abs(x).max()
    assert sym.compute_range() == (-m, m)
    assert sym.symmetric and not asym.symmetric


@pytest.mark.parametrize("q", [99.0, 99.9, 99.99, 100.0])
def test_percentile_matches_numpy(q):
    """The histogram's q-quantile lies in the bin of the ceil(q N / 100)-th smallest |x|, i.e.
    numpy's ``inverted_cdf`` percentile, so they differ by less than one bin width. (Numpy's
    default linear method interpolates between order statistics, which in a sparse tail can be
    many bins apart.)"""
    batches = _growing_batches() + _laplace_outliers()
    a = np.abs(np.concatenate([b.ravel() for b in batches]))
    cal = PercentileCalibrator(percentile=q)
    for batch in batches:
        cal.observe(batch)
    lo, hi = cal.compute_range()
    expected = np.percentile(a, q, method="inverted_cdf")
    assert lo == -hi
    assert abs(hi - expected) <= cal.hist.width, (hi, expected, cal.hist.width)
    if q == 100.0:
        assert hi == a.max()


def test_percentile_single_batch_within_one_bin():
    x = _gauss()
    cal = get_calibrator("percentile", percentile=99.9)
    cal.observe(x)
    width = np.abs(x).max() / 2048
    expected = np.percentile(np.abs(x), 99.9, method="inverted_cdf")
    assert abs(cal.compute_range()[1] - expected) <= width
    with pytest.raises(ValueError):
        PercentileCalibrator(percentile=0.0)


# ---------------------------------------------------------------------------------- common

@pytest.mark.parametrize("name", BUILTINS)
def test_compute_range_before_observe_raises(name):
    cal = get_calibrator(name)
    cal.observe(np.array([], dtype=np.float32))  # empty batches do not count
    with pytest.raises(ValueError):
        cal.compute_range()


@pytest.mark.parametrize("name", BUILTINS)
def test_non_finite_values_are_ignored(name):
    x = _gauss(20_000)
    clean, dirty = get_calibrator(name), get_calibrator(name)
    clean.observe(x)
    dirty.observe(np.r_[x, np.inf, -np.inf, np.nan])
    assert dirty.compute_range() == clean.compute_range()


@pytest.mark.parametrize("name", BUILTINS)
def test_float16_tensors_calibrate_as_their_float32_values(name):
    """entropy and percentile raised numpy's 'Too many bins for data range' on float16 tensors."""
    x = _gauss(20_000).astype(np.float16)
    half, full = get_calibrator(name), get_calibrator(name)
    half.observe(x)
    full.observe(x.astype(np.float32))
    assert half.compute_range() == full.compute_range()


@pytest.mark.parametrize("name", BUILTINS)
def test_a_tensor_that_barely_varies_calibrates(name):
    """mse stopped the compile ('Too many bins for data range') on a tensor of 5 +- 3e-6 (a saturated sigmoid's)."""
    x = (_gauss(20_000) * 1e-6 + 5).astype(np.float32)
    cal = get_calibrator(name)
    cal.observe(x)
    lo, hi = cal.compute_range()
    assert lo <= float(x.max()) and hi >= float(np.median(x)) and np.isfinite([lo, hi]).all()


def test_symmetric_flags():
    assert EntropyCalibrator.symmetric and PercentileCalibrator.symmetric
    assert not MSECalibrator.symmetric and not calibrators.MinMaxCalibrator.symmetric


# -------------------------------------------------------------------------------- registry

@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))


def test_available_and_lookup():
    assert set(BUILTINS) <= set(available_calibrators())
    assert available_calibrators() == sorted(available_calibrators())
    for name in BUILTINS:
        cal = get_calibrator(name)
        assert isinstance(cal, Calibrator) and cal.name == name


def test_unknown_name_lists_available():
    with pytest.raises(ValueError) as err:
        get_calibrator("no-such-calibrator")
    for name in BUILTINS:
        assert name in str(err.value)


def test_unknown_option_is_rejected():
    with pytest.raises(TypeError):
        get_calibrator("entropy", percentile=99.0)


def test_register_plugin(isolated_registry):
    @register("absmean")
    class AbsMean(Calibrator):
        symmetric = True

        def __init__(self, *, scale: float = 1.0) -> None:
            super().__init__(scale=scale)
            self.scale, self.sum, self.n = scale, 0.0, 0

        def observe(self, x: np.ndarray) -> None:
            self.sum += float(np.abs(x).sum())
            self.n += np.size(x)

        def compute_range(self) -> tuple[float, float]:
            if not self.n:
                raise ValueError("nothing observed")
            t = self.scale * self.sum / self.n
            return -t, t

    assert "absmean" in available_calibrators()
    cal = get_calibrator("absmean", scale=2.0)
    cal.observe(np.array([1.0, -3.0]))
    assert cal.compute_range() == (-4.0, 4.0) and AbsMean.name == "absmean"
    with pytest.raises(ValueError, match="already registered"):
        register("absmean")(EntropyCalibrator)
    with pytest.raises(TypeError):
        register("not-a-calibrator")(dict)


def test_entry_point_plugin(isolated_registry, monkeypatch):
    ep = EntryPoint(name="ep-minmax", value="uadc.calibrators.minmax:MinMaxCalibrator",
                    group=base.ENTRY_POINT_GROUP)
    monkeypatch.setattr(base, "entry_points", lambda group: [ep] if group == ep.group else [])
    assert "ep-minmax" in available_calibrators()
    cal = get_calibrator("ep-minmax", symmetric=True)
    assert isinstance(cal, calibrators.MinMaxCalibrator)
    assert calibrators.MinMaxCalibrator.name == "minmax"  # built-in keeps its own name
    # a plug-in's class re-exported from its package (`pkg:Cls`, defined in pkg.mod) is not "another" calibrator
    ep2 = EntryPoint(name="ep-minmax", value="uadc.calibrators:MinMaxCalibrator", group=base.ENTRY_POINT_GROUP)
    monkeypatch.setattr(base, "entry_points", lambda group: [ep, ep2] if group == ep.group else [])
    assert isinstance(get_calibrator("ep-minmax"), calibrators.MinMaxCalibrator)


def test_a_plugin_that_does_not_load_or_shadows_another_is_named(isolated_registry, monkeypatch, tmp_path):
    """Its import error was a traceback; an entry point named like a built-in was silently not used."""
    eps = [EntryPoint(name="gone", value="qa_no_such_module_x:X", group=base.ENTRY_POINT_GROUP),
           EntryPoint(name="minmax", value="qa_plugin:Clash", group=base.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(base, "entry_points", lambda group: eps if group == base.ENTRY_POINT_GROUP else [])
    with pytest.raises(ValueError, match=r"cannot load plug-in qa_no_such_module_x:X: ModuleNotFoundError"):
        get_calibrator("gone")
    with pytest.raises(ValueError, match=r"calibrator 'minmax' is .*MinMaxCalibrator, and a plug-in declares "
                                         r"another under the same name \(qa_plugin:Clash\): rename"):
        get_calibrator("minmax")
    # `calibrators list` showed both as usable
    from click.testing import CliRunner
    from uadc.cli import main
    out = CliRunner().invoke(main, ["calibrators", "list"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert "entropy" in lines and "mse" in lines
    assert any(x.startswith("gone  (unusable: cannot load plug-in qa_no_such_module_x:X") for x in lines)
    assert any(x.startswith("minmax  (unusable: calibrator 'minmax' is ") for x in lines)

    class Fails(Calibrator):
        def __init__(self, **options):
            raise KeyError("setting")
        observe = compute_range = None
    register("fails")(Fails)
    with pytest.raises(ValueError, match=r"KeyError: 'setting'"):
        get_calibrator("fails")


def test_fingerprint_follows_the_calibrators_code(isolated_registry, monkeypatch, tmp_path):
    """A cached `calibrators compare` cell kept a plug-in's old ranges after its code changed."""
    import importlib
    mod = tmp_path / "qa_fp_plugin.py"
    body = ("from uadc.calibrators import Calibrator\nclass G(Calibrator):\n    def observe(self, x): pass\n"
            "    def compute_range(self): return {}\n")
    mod.write_text(body.format("(0.0, 1.0)"))
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EntryPoint(name="qa-fp", value="qa_fp_plugin:G", group=base.ENTRY_POINT_GROUP)
    monkeypatch.setattr(base, "entry_points", lambda group: [ep] if group == ep.group else [])
    before = calibrators.fingerprint("qa-fp")
    assert before == calibrators.fingerprint("qa-fp") and before != calibrators.fingerprint("minmax")
    mod.write_text(body.format("(-1.0, 1.0)"))
    importlib.invalidate_caches()
    assert calibrators.fingerprint("qa-fp") != before
