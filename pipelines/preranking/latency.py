"""Measured latency of the AutoFAS search space, the latency model built from it, and its validation.

What is measured (torch on CPU, `threads` intra-op threads, a batch of `batch` candidates drawn from the real
validation rows, the median over `repeats` timings of `inner` calls each, after `warmup` calls), in
microseconds per batch. The clock is, by default, the CPU time of the timing thread, not wall time: on a
shared machine (ours: 2 cores, load ~10) a call longer than a scheduler slice is descheduled part of the time,
so its wall time measures the neighbours, and short parts and long whole networks are inflated differently.
CPU time is what the call costs a dedicated serving core (AutoFAS reports "CPU cost" too); `clock: wall`
measures elapsed time for a quiet machine.

All parts are timed inside whole forward passes of networks built to contain them (`_parts_in_context`):

- per feature: its lookup/transform inside the model (`FeatureEmbedding.one`: the id column gather plus the
  embedding lookup, or the numeric (value, missing) -> vector map), plus its retrieval cost where the data set
  sets one (synthetic data: simulated, from `feature_meta.json`; real data: `default_retrieval_cost_us`). The
  vocabulary lookup and numeric standardisation are done once per candidate when the table is encoded and are
  not part of this figure.
- the concatenation of k feature vectors, fitted as a + b k;
- per candidate layer: Linear+ReLU for every (input width, output width): first layer inputs on a grid of
  embedding_dim x (number of features), later layers' inputs in `widths`; the output layer per input width;
- an intercept (`overhead_us`: call overheads not in any part), the median residual of `calibration_archs`
  random discrete architectures.

The latency model (differentiable, used by the search):

    E[lat] = overhead + concat(sum_f p_f) + sum_f p_f * cost_f
           + sum_k P_1k * T1(embedding_dim * sum_f p_f, w_k)                  (first layer, no skip)
           + sum_{l>=2} sum_k P_lk sum_j q_{l-1}(w_j) * T(w_j, w_k)          (later layers)
           + sum_j q_L(w_j) * T_out(w_j)

with q_l the distribution of layer l's output width (q_l = P_l[widths] + P_l[skip] * q_{l-1}) and T1
interpolated linearly between grid points. For a discrete architecture the probabilities are 0/1 and this is
the sum of its measured parts. Validation: predicted against measured full forward passes of
`validate_archs` random discrete architectures; Pearson r and MAPE, on the compute part alone and on the
total with retrieval costs (the simulated part is exact by construction, so the compute-only figure is the
honest one).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pipelines.data.clicks import FeatureSpec
from pipelines.preranking.config import LatencyConfig
from pipelines.preranking.models import Student

__all__ = ["LatencyConfig", "LatencyModel", "measure_cost_table", "measure_model_us", "measure_models_us",
           "random_arch",
           "validate_latency_model"]


def _clock(cfg: LatencyConfig):
    if cfg.clock == "wall":
        return time.perf_counter_ns
    return time.thread_time_ns if cfg.threads == 1 else time.process_time_ns


def _timer(fn, cfg: LatencyConfig) -> float:
    """Median microseconds of one call of `fn` (the mean of `inner` calls per timing)."""
    clock = _clock(cfg)
    with torch.inference_mode():
        for _ in range(cfg.warmup):
            fn()
        times = []
        for _ in range(cfg.repeats):
            t0 = clock()
            for _ in range(cfg.inner):
                fn()
            times.append((clock() - t0) / cfg.inner / 1e3)
    return float(np.median(times))


class _Threads:
    def __init__(self, n: int) -> None:
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def retrieval_costs(spec: FeatureSpec, meta: dict[str, dict], default_us: float) -> dict[str, float]:
    return {f.name: float(meta.get(f.name, {}).get("retrieval_cost_us", default_us)) for f in spec.features}


def _parts_in_context(model: Student, cat: torch.Tensor, num: torch.Tensor, cfg: LatencyConfig) -> np.ndarray:
    """Median time of each part of `model`'s forward measured inside whole forward passes: per feature,
    the concatenation, each layer, the output layer. Timed in context, not one op repeated alone: a lone
    op repeated keeps its weights, input and output buffer hot in cache and measured 2-5x faster here than
    the same op inside a network."""
    clock = _clock(cfg)
    embed = model.embed
    rows = []
    with torch.inference_mode():
        for rep in range(cfg.warmup + cfg.repeats):
            t = [clock()]
            parts = []
            for i in range(len(embed.features)):
                parts.append(embed.one(i, cat, num))
                t.append(clock())
            x = torch.cat(parts, dim=1)
            t.append(clock())
            for layer in model.layers:
                x = torch.relu(layer(x))
                t.append(clock())
            model.out(x).squeeze(1)
            t.append(clock())
            if rep >= cfg.warmup:
                rows.append(np.diff(np.asarray(t, dtype=np.float64)) / 1e3)
    return np.median(np.asarray(rows), axis=0)


def measure_cost_table(spec: FeatureSpec, cat: torch.Tensor, num: torch.Tensor, meta: dict[str, dict],
                       cfg: LatencyConfig) -> dict[str, Any]:
    """Time every part of the search space on the first `cfg.batch` rows of (cat, num), in context."""
    cat, num = cat[:cfg.batch].contiguous(), num[:cfg.batch].contiguous()
    d, widths = cfg.embedding_dim, sorted(set(cfg.widths))
    torch.manual_seed(cfg.seed)
    names = [f.name for f in spec.features]
    n = len(names)
    retrieval = retrieval_costs(spec, meta, cfg.default_retrieval_cost_us)
    counts = sorted({1, n, *np.linspace(1, n, cfg.input_grid).round().astype(int).tolist()})
    lookups: dict[str, list[float]] = {name: [] for name in names}
    concat: dict[int, list[float]] = {k: [] for k in counts}
    first = np.zeros((len(counts), len(widths)))
    hidden = np.zeros((len(widths), len(widths)))
    output: dict[int, list[float]] = {w: [] for w in widths}
    with _Threads(cfg.threads):
        # First layer: every (feature count on the grid, width); the second layer has the same width.
        for a, k in enumerate(counts):
            for b, w in enumerate(widths):
                t = _parts_in_context(Student(spec, names[:k], [w, w], d), cat, num, cfg)
                concat[k].append(float(t[k]))
                first[a, b] = t[k + 1]
                if k == n:
                    for name, v in zip(names, t[:k], strict=True):
                        lookups[name].append(float(v))
        # Later layers: every (input width, output width), behind all features and a first layer of w_in.
        for a, w_in in enumerate(widths):
            for b, w in enumerate(widths):
                t = _parts_in_context(Student(spec, names, [w_in, w], d), cat, num, cfg)
                hidden[a, b] = t[n + 2]
                output[w].append(float(t[n + 3]))
                for name, v in zip(names, t[:n], strict=True):
                    lookups[name].append(float(v))
    slope, intercept = np.polyfit(counts, [np.median(concat[k]) for k in counts], 1) if len(counts) > 1 else \
        (0.0, float(np.median(concat[counts[0]])))
    table = {
        "batch": len(cat), "threads": cfg.threads, "clock": cfg.clock, "embedding_dim": d, "widths": widths,
        "n_layers": cfg.n_layers, "feature_order": names,
        "features": {name: {"lookup_us": float(np.median(lookups[name])), "retrieval_us": retrieval[name]}
                     for name in names},
        "concat_us": {"intercept": float(intercept), "per_feature": float(slope), "counts": counts,
                      "measured": [float(np.median(concat[k])) for k in counts]},
        "first_layer_inputs": [d * k for k in counts], "first_layer_us": first.tolist(),
        "hidden_layer_us": hidden.tolist(), "output_layer_us": [float(np.median(output[w])) for w in widths],
        "overhead_us": 0.0, "unit": "microseconds per batch", "torch": torch.__version__,
    }
    rng = np.random.default_rng([cfg.seed, 21])
    model = LatencyModel(table)
    residuals = []
    for _ in range(cfg.calibration_archs):
        arch = random_arch(rng, names, widths, cfg.n_layers, d)
        residuals.append(measure_model_us(Student(spec, arch["features"], arch["widths"], d), cat, num, cfg)
                         - model.predict(arch, with_retrieval=False))
    table["overhead_us"] = float(np.median(residuals)) if residuals else 0.0
    table["calibration_residuals_us"] = residuals
    return table


def measure_model_us(model: torch.nn.Module, cat: torch.Tensor, num: torch.Tensor, cfg: LatencyConfig) -> float:
    """Median microseconds of one forward pass of `model` over the batch, with `cfg.threads` threads."""
    model.eval()
    with _Threads(cfg.threads):
        return _timer(lambda: model(cat, num), cfg)


def measure_models_us(models: dict[str, torch.nn.Module], cat: torch.Tensor, num: torch.Tensor,
                      cfg: LatencyConfig) -> dict[str, float]:
    """Median microseconds per forward pass of several models, timed in interleaved rounds (each round times
    every model once, in a seeded random order), so that a burst of load from other processes falls on all
    of them alike instead of on whichever model was being timed then."""
    clock = _clock(cfg)
    rng = np.random.default_rng([cfg.seed, 23])
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    with _Threads(cfg.threads), torch.inference_mode():
        for m in models.values():
            m.eval()
            for _ in range(cfg.warmup):
                m(cat, num)
        for _ in range(cfg.repeats):
            for i in rng.permutation(len(names)):
                model = models[names[i]]
                t0 = clock()
                for _ in range(cfg.inner):
                    model(cat, num)
                times[names[i]].append((clock() - t0) / cfg.inner / 1e3)
    return {n: float(np.median(t)) for n, t in times.items()}


def random_arch(rng: np.random.Generator, features: list[str], widths: list[int], n_layers: int,
                dim: int) -> dict[str, Any]:
    """A uniformly random discrete architecture of the search space: a non-empty feature subset (its size
    uniform in 1..F), a width for layer 1, and a width or skip for each later layer."""
    size = int(rng.integers(1, len(features) + 1))
    keep = sorted(rng.choice(len(features), size, replace=False).tolist())
    ops: list[Any] = [int(rng.choice(widths))]
    for _ in range(n_layers - 1):
        j = int(rng.integers(0, len(widths) + 1))
        ops.append("skip" if j == len(widths) else int(widths[j]))
    return {"type": "student", "features": [features[i] for i in keep], "widths": [w for w in ops if w != "skip"],
            "ops": ops, "embedding_dim": dim}


class LatencyModel:
    """E[lat] from a cost table (see the module docstring)."""

    def __init__(self, table: dict[str, Any]) -> None:
        self.table = table
        self.names = list(table["feature_order"])
        self.widths = list(table["widths"])
        self.lookup = torch.tensor([table["features"][n]["lookup_us"] for n in self.names], dtype=torch.float32)
        self.retrieval = torch.tensor([table["features"][n]["retrieval_us"] for n in self.names],
                                      dtype=torch.float32)
        self.grid = torch.tensor(table["first_layer_inputs"], dtype=torch.float32)
        self.first = torch.tensor(table["first_layer_us"], dtype=torch.float32)  # (grid, widths)
        self.hidden = torch.tensor(table["hidden_layer_us"], dtype=torch.float32)  # (widths, widths)
        self.output = torch.tensor(table["output_layer_us"], dtype=torch.float32)  # (widths,)
        self.dim = int(table["embedding_dim"])

    def _first_layer(self, in_width: torch.Tensor) -> torch.Tensor:
        """Cost of each first-layer width at a (possibly fractional) input width: linear interpolation on the
        grid, extrapolated with the end slopes."""
        g = self.grid
        if len(g) == 1:
            return self.first[0]
        i = int(torch.clamp(torch.searchsorted(g, in_width.detach().reshape(1)), 1, len(g) - 1))
        t = (in_width - g[i - 1]) / (g[i] - g[i - 1])
        return self.first[i - 1] + t * (self.first[i] - self.first[i - 1])

    def expected(self, keep: torch.Tensor, ops: list[torch.Tensor], with_retrieval: bool = True) -> torch.Tensor:
        """E[lat] in microseconds. `keep`: (F,) keep-probabilities in `feature_order`; `ops[l]`: layer l's op
        probabilities (widths, then skip for l >= 1)."""
        concat = self.table["concat_us"]
        n = keep.sum()
        cost = self.table["overhead_us"] + concat["intercept"] + concat["per_feature"] * n + (keep * self.lookup).sum()
        if with_retrieval:
            cost = cost + (keep * self.retrieval).sum()
        k = len(self.widths)
        cost = cost + (ops[0][:k] * self._first_layer(self.dim * n)).sum()
        q = ops[0][:k]
        for p in ops[1:]:
            cost = cost + (p[:k] * (q @ self.hidden)).sum()
            q = p[:k] + (p[k] if len(p) > k else 0.0) * q
        return cost + (q * self.output).sum()

    def one_hot(self, arch: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        keep = torch.tensor([1.0 if n in set(arch["features"]) else 0.0 for n in self.names])
        layer_ops = arch.get("ops") or list(arch["widths"])
        ops = []
        for i, op in enumerate(layer_ops):
            p = torch.zeros(len(self.widths) + (1 if i else 0))
            p[len(self.widths) if op == "skip" else self.widths.index(int(op))] = 1.0
            ops.append(p)
        return keep, ops

    def predict(self, arch: dict[str, Any], with_retrieval: bool = True) -> float:
        """Predicted latency of a discrete student architecture (its `ops`, or its `widths` as layers)."""
        unknown = [w for w in arch["widths"] if int(w) not in self.widths]
        if unknown:
            raise ValueError(f"widths {unknown} are not in the measured table {self.widths}; rerun latency")
        keep, ops = self.one_hot(arch)
        return float(self.expected(keep, ops, with_retrieval))

    def retrieval_us(self, features: list[str]) -> float:
        return float(sum(self.table["features"][n]["retrieval_us"] for n in features))

    def full_reference(self) -> float:
        """Latency of the largest architecture (all features, widest op everywhere): the normaliser of the
        latency term in the search loss."""
        wmax = max(self.widths)
        return self.predict({"features": self.names, "widths": [wmax] * int(self.table["n_layers"]),
                             "ops": [wmax] * int(self.table["n_layers"])})


def validate_latency_model(spec: FeatureSpec, cat: torch.Tensor, num: torch.Tensor, table: dict[str, Any],
                           cfg: LatencyConfig) -> dict[str, Any]:
    """Predicted vs measured latency of `cfg.validate_archs` random discrete architectures (not the
    calibration ones: another seed stream)."""
    cat, num = cat[:cfg.batch].contiguous(), num[:cfg.batch].contiguous()
    model = LatencyModel(table)
    rng = np.random.default_rng([cfg.seed, 22])
    rows = []
    for _ in range(cfg.validate_archs):
        arch = random_arch(rng, model.names, model.widths, cfg.n_layers, cfg.embedding_dim)
        torch.manual_seed(cfg.seed)
        measured = measure_model_us(Student(spec, arch["features"], arch["widths"], cfg.embedding_dim), cat, num,
                                    cfg)
        retrieval = model.retrieval_us(arch["features"])
        rows.append({"features": len(arch["features"]), "ops": "-".join(map(str, arch["ops"])),
                     "predicted_compute_us": model.predict(arch, with_retrieval=False),
                     "measured_compute_us": measured, "retrieval_us": retrieval})

    def stats(pred: np.ndarray, meas: np.ndarray) -> dict[str, float]:
        r = float(np.corrcoef(pred, meas)[0, 1]) if len(pred) > 1 and np.std(pred) > 0 and np.std(meas) > 0 \
            else float("nan")
        return {"pearson_r": r, "mape": float(np.mean(np.abs(pred - meas) / meas))}

    pred = np.array([r["predicted_compute_us"] for r in rows])
    meas = np.array([r["measured_compute_us"] for r in rows])
    extra = np.array([r["retrieval_us"] for r in rows])
    return {"archs": rows, "compute": stats(pred, meas), "total": stats(pred + extra, meas + extra)}
