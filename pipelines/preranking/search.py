"""The AutoFAS search: supernet training with alternating weight and architecture updates, run as Ray Tune
trials over latency weights (lambda) and seeds, plus random architecture search with as many trials.

Loss (architecture step):

    L = BCE(s, y) + kd_weight * KD(s, teacher) + lambda * E[lat] / lat_full

with E[lat] from `pipelines.preranking.latency.LatencyModel` (microseconds) and lat_full the predicted latency
of the largest architecture (all features, widest op in every layer), so lambda is unit-free: lambda = 0.1
trades 0.1 nats of log-loss against the whole latency of the largest network. ProxylessNAS's additive form is
`CE + lambda * (E[lat] - ref) / ref`: with a fixed ref this has the same gradient as ours for ref = lat_full
(the offset is constant), so the difference is only where lambda is anchored. Its multiplicative form
`CE * (log E[lat] / log ref)^0.6` targets one budget per run; we instead sweep lambda across trials to trace the
AUC-latency front, and a latency budget is applied afterwards by picking the best retrained student whose
measured latency is under it (`report`). The weight step uses the same loss without the latency term
(it does not depend on the weights).

Procedure per trial (one lambda, one seed): the training rows are split (seeded) into a weight part and an
architecture part (`arch_fraction`, first-order DARTS: architecture logits are fitted on rows the weights were
not fitted on; the validation split stays untouched for ASHA and selection). `warmup_epochs` epochs update
only the weights (every feature on, ops sampled so every width and skip path gets trained: features that
matter only jointly, like interaction pairs, must be learnt before their gates are judged), then every step is one weight
step on a weight-part batch followed by one architecture step on an architecture-part batch.

Shared warm-up (`shared_warmup`, the default): the warm-up does not depend on lambda, so it runs once per seed
(a Tune run of its own) and every lambda's trial with that seed starts from its weights (safetensors in the
stage's scratch folder; the Adam state starts fresh). That divides the warm-up's cost by the number of lambdas,
which buys the longer warm-up on more rows that interaction-only features need: with 2 warm-up epochs on 60k
rows per trial, the supernet had not learnt them when their gates were judged and dropped them from lambda=0.05
up. Epochs are counted from the first warm-up epoch either way; ASHA reads the `epoch` reported. The Gumbel
temperature decays geometrically from tau_start to tau_end over the epochs. After each epoch the derived
architecture (gates p_f > gate_threshold, argmax op per layer) is scored on validation with the shared
weights; that AUC is what ASHA reads.

ASHA and lambda: trials with a larger lambda are meant to be less accurate, so one ASHA run across lambdas
would stop exactly the fast architectures the front needs. Each lambda is therefore its own Tune run, and
ASHA prunes among its seeds (and any repeats). The best trial of each lambda by final validation AUC gives
that lambda's derived architecture.

Random search baseline: `len(lambdas) * len(seeds)` uniformly random discrete architectures of the same space
(`latency.random_arch`), each trained standalone with distillation for `epochs` epochs (no ASHA: ASHA on AUC
would again favour slow architectures). For each lambda, the random architecture with the best validation AUC
among those predicted no slower than that lambda's derived architecture is retrained next to it.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.preranking.config import SearchConfig
from pipelines.preranking.latency import LatencyModel, random_arch
from pipelines.preranking.models import Student, Supernet
from pipelines.preranking.training import ClickData, auc, fit, kd_loss, predict
from pipelines.raycluster import ensure_ray

__all__ = ["SearchConfig", "pick_random_matches", "run_search", "train_supernet"]


def _tau(cfg: SearchConfig, epoch: int) -> float:
    if cfg.epochs <= 1:
        return cfg.tau_end
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (epoch / (cfg.epochs - 1))


def train_supernet(train: ClickData, val: ClickData, teacher_train: np.ndarray | None, table: dict[str, Any],
                   cfg: SearchConfig, lam: float, seed: int, spec, report=None,
                   warm_start: dict[str, torch.Tensor] | None = None, warmup_only: bool = False) -> dict[str, Any]:
    """One search trial. `report(metrics)` is called after every epoch (Ray Tune's `tune.report` in a trial);
    returns the last epoch's metrics with the derived architecture and the final probabilities.

    `warmup_only` runs just the weight-only warm-up epochs and adds the supernet's weights to the result
    (`"state"`); `warm_start` (such weights, from the same seed) skips the warm-up."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 31])
    latency = LatencyModel(table)
    ref = latency.full_reference()
    net = Supernet(spec, int(table["embedding_dim"]), list(table["widths"]), int(table["n_layers"]), cfg.gate_init)
    if net.features != latency.names:
        raise ValueError("the latency table was measured on other features than the data has; rerun latency")
    first_epoch, last_epoch = 0, (cfg.warmup_epochs if warmup_only else cfg.epochs)
    if warm_start is not None:
        net.load_state_dict(warm_start)
        first_epoch = cfg.warmup_epochs
        torch.manual_seed(seed + 1)  # not the warm-up's sampling noise over again
    w_opt = torch.optim.Adam(net.weight_parameters(), lr=cfg.lr)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=cfg.arch_lr)
    order = rng.permutation(len(train))
    n_arch = int(len(order) * cfg.arch_fraction)
    arch_rows, weight_rows = order[:n_arch], order[n_arch:]
    teacher = torch.from_numpy(np.array(teacher_train, dtype=np.float32)) if teacher_train is not None else None
    use_kd = teacher is not None and cfg.kd_weight > 0
    y_val = val.label.numpy()

    def loss_of(idx: torch.Tensor, tau: float, open_gates: bool = False) -> torch.Tensor:
        logits = net(train.cat[idx], train.num[idx], tau=tau, open_gates=open_gates)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, train.label[idx])
        if use_kd:
            loss = loss + cfg.kd_weight * kd_loss(logits, teacher[idx], cfg.kd_temperature)
        return loss

    started = time.perf_counter()
    last: dict[str, Any] = {}
    for epoch in range(first_epoch, last_epoch):
        tau = _tau(cfg, epoch)
        net.train()
        w_order = torch.from_numpy(rng.permutation(weight_rows))
        a_order = torch.from_numpy(rng.permutation(arch_rows)) if len(arch_rows) else None
        search = epoch >= cfg.warmup_epochs and a_order is not None
        total, lat_total, steps = 0.0, 0.0, 0
        for step, i in enumerate(range(0, len(w_order), cfg.batch_size)):
            loss = loss_of(w_order[i:i + cfg.batch_size], tau, open_gates=not search)
            w_opt.zero_grad(set_to_none=True)
            loss.backward()
            w_opt.step()
            total += float(loss.detach())
            steps += 1
            if search:
                j = (step * cfg.batch_size) % len(a_order)
                expected = latency.expected(net.keep_probs(), net.op_probs())
                a_loss = loss_of(a_order[j:j + cfg.batch_size], tau) + lam * expected / ref
                a_opt.zero_grad(set_to_none=True)
                w_opt.zero_grad(set_to_none=True)
                a_loss.backward()
                a_opt.step()
                lat_total += float(expected.detach())
        arch = net.derive(cfg.gate_threshold)
        val_auc = auc(y_val, predict(net, val, hard=True, threshold=cfg.gate_threshold))
        with torch.no_grad():
            expected_us = float(latency.expected(net.keep_probs(), net.op_probs()))
        last = {"epoch": epoch + 1, "val_auc": val_auc, "train_loss": total / max(steps, 1), "tau": tau,
                "expected_us": expected_us, "derived_predicted_us": latency.predict(arch),
                "n_features": len(arch["features"]), "ops": "-".join(map(str, arch["ops"])),
                "seconds": time.perf_counter() - started, "lambda": lam, "seed": seed,
                "arch": json.dumps(arch, sort_keys=True)}
        if report is not None:
            report(last)
    if warmup_only:
        last["state"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return last


# --------------------------------------------------------------------------------------------- Ray Tune


def _warm_file(warm_dir: Path, seed: int) -> Path:
    return Path(warm_dir) / f"supernet-warmup-seed{seed}.safetensors"


def _warmup_trainable(config: dict[str, Any], train=None, val=None, teacher=None, table=None, cfg=None, spec=None,
                      warm_dir=None):
    from ray import tune  # heavy: loaded only when used
    from safetensors.torch import save_file  # heavy: loaded only when used

    torch.set_num_threads(cfg.trial_threads)
    seed = int(config["seed"])
    result = train_supernet(train, val, teacher, table, cfg, 0.0, seed, spec, report=tune.report, warmup_only=True)
    target = _warm_file(warm_dir, seed)
    tmp = target.with_suffix(".tmp")
    save_file(result["state"], str(tmp))
    tmp.replace(target)  # a trial never reads a half-written file


def _nas_trainable(config: dict[str, Any], train=None, val=None, teacher=None, table=None, cfg=None, spec=None,
                   warm_dir=None):
    from ray import tune  # heavy: loaded only when used
    from safetensors.torch import load_file  # heavy: loaded only when used

    torch.set_num_threads(cfg.trial_threads)
    seed = int(config["seed"])
    warm_start = load_file(str(_warm_file(warm_dir, seed))) if warm_dir is not None else None
    train_supernet(train, val, teacher, table, cfg, float(config["lambda"]), seed, spec, report=tune.report,
                   warm_start=warm_start)


def _random_trainable(config: dict[str, Any], train=None, val=None, teacher=None, table=None, cfg=None,
                      spec=None):
    from ray import tune  # heavy: loaded only when used

    torch.set_num_threads(cfg.trial_threads)
    arch = json.loads(config["arch"])
    torch.manual_seed(int(config["seed"]))
    model = Student(spec, arch["features"], arch["widths"], int(arch["embedding_dim"]))
    latency = LatencyModel(table)

    def log(h):
        tune.report({"epoch": h["epoch"], "val_auc": h["val_auc"], "derived_predicted_us": latency.predict(arch),
                     "n_features": len(arch["features"]), "ops": "-".join(map(str, arch["ops"])),
                     "arch": json.dumps(arch, sort_keys=True), "seconds": h["seconds"]})

    fit(model, train, val, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, patience=cfg.epochs,
        seed=int(config["seed"]), teacher_logits=teacher, kd_weight=cfg.kd_weight,
        kd_temperature=cfg.kd_temperature, log=log)


def _tune(trainable, param_space: dict[str, Any], cfg: SearchConfig, storage: Path, name: str, data: dict,
          asha: bool) -> list[dict[str, Any]]:
    from ray import tune  # heavy: loaded only when used
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # heavy: loaded only when used

    scheduler = ASHAScheduler(time_attr="epoch", max_t=max(cfg.epochs, 1),
                              grace_period=min(cfg.grace_period, cfg.epochs),
                              reduction_factor=cfg.reduction_factor) if asha else FIFOScheduler()
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, **data), {"cpu": cfg.cpus_per_trial}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="val_auc", mode="max", scheduler=scheduler,
                                    max_concurrent_trials=cfg.max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0),
    )
    grid = tuner.fit()
    out = []
    for result in grid:
        if result.error is not None:
            raise RuntimeError(f"search trial {result.config} failed: {result.error}")
        history = result.metrics_dataframe
        keep = ["epoch", "val_auc", "train_loss", "expected_us", "derived_predicted_us", "n_features", "tau"]
        out.append({"config": dict(result.config), "final": {k: v for k, v in result.metrics.items()
                                                             if k in keep + ["arch", "ops", "seconds"]},
                    "history": history[[c for c in keep if c in history.columns]].to_dict("records")
                    if history is not None else [],
                    "stopped_early": int(result.metrics.get("epoch", 0)) < cfg.epochs})
    return out


def pick_random_matches(derived: list[dict[str, Any]], randoms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each derived architecture, the random one with the best val AUC among those predicted no slower
    (the fastest random one when none is)."""
    picks = []
    for d in derived:
        budget = d["predicted_us"]
        under = [r for r in randoms if r["predicted_us"] <= budget]
        best = max(under, key=lambda r: r["val_auc"]) if under else min(randoms, key=lambda r: r["predicted_us"])
        picks.append({**best, "matched_lambda": d["lambda"], "budget_us": budget})
    return picks


def run_search(train: ClickData, val: ClickData, teacher_train: np.ndarray | None, table: dict[str, Any],
               cfg: SearchConfig, spec, scratch: Path, log_trial=None) -> dict[str, Any]:
    """All NAS trials (one Tune run per lambda) and the random baseline; returns what the stage writes.
    `log_trial(kind, trial)` is called in the driver for each finished trial (MLflow logging)."""
    from ray import tune  # heavy: loaded only when used

    if not cfg.lambdas or not cfg.seeds:
        raise ValueError("search.lambdas and search.seeds must each list at least one value")
    ensure_ray()
    data = {"train": train, "val": val, "teacher": teacher_train, "table": table, "cfg": cfg, "spec": spec}
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    latency = LatencyModel(table)
    started = time.perf_counter()
    warmups, nas_data = [], data
    if cfg.shared_warmup and 0 < cfg.warmup_epochs < cfg.epochs:
        warm_dir = Path(tempfile.mkdtemp(dir=scratch))
        warmups = _tune(_warmup_trainable, {"seed": tune.grid_search(list(cfg.seeds))}, cfg,
                        Path(tempfile.mkdtemp(dir=scratch)), "warmup", {**data, "warm_dir": warm_dir}, asha=False)
        nas_data = {**data, "warm_dir": warm_dir}
    warmup_seconds = time.perf_counter() - started
    nas, derived = [], []
    for lam in cfg.lambdas:
        trials = _tune(_nas_trainable, {"lambda": lam, "seed": tune.grid_search(list(cfg.seeds))}, cfg,
                       Path(tempfile.mkdtemp(dir=scratch)), f"nas-lambda-{lam}", nas_data, asha=True)
        for t in trials:
            if log_trial is not None:
                log_trial("nas", t)
        nas.extend(trials)
        finished = [t for t in trials if not t["stopped_early"]] or trials
        best = max(finished, key=lambda t: t["final"]["val_auc"])
        arch = json.loads(best["final"]["arch"])
        derived.append({"lambda": lam, "seed": best["config"]["seed"], "arch": arch,
                        "val_auc_shared_weights": best["final"]["val_auc"], "predicted_us": latency.predict(arch)})
    nas_seconds = time.perf_counter() - started

    randoms, matches = [], []
    random_seconds = 0.0
    if cfg.random_search:
        n_trials = len(cfg.lambdas) * len(cfg.seeds)
        rng = np.random.default_rng([int(cfg.seeds[0]), 41])
        archs = [random_arch(rng, latency.names, latency.widths, int(table["n_layers"]), int(table["embedding_dim"]))
                 for _ in range(n_trials)]
        space = {"arch": tune.grid_search([json.dumps(a, sort_keys=True) for a in archs]), "seed": int(cfg.seeds[0])}
        t0 = time.perf_counter()
        trials = _tune(_random_trainable, space, cfg, Path(tempfile.mkdtemp(dir=scratch)), "random", data,
                       asha=False)
        random_seconds = time.perf_counter() - t0
        for t in trials:
            if log_trial is not None:
                log_trial("random", t)
            arch = json.loads(t["config"]["arch"])
            best_auc = max((h["val_auc"] for h in t["history"]), default=t["final"]["val_auc"])
            randoms.append({"arch": arch, "val_auc": best_auc, "predicted_us": latency.predict(arch)})
        matches = pick_random_matches(derived, randoms)
    return {"derived": derived, "nas_trials": nas, "random_trials": randoms, "random_matches": matches,
            "nas_seconds": nas_seconds, "warmup_seconds": warmup_seconds, "random_seconds": random_seconds,
            "warmup_trials": [{"config": w["config"], "history": w["history"]} for w in warmups], "n_trials": len(nas),
            "config": asdict(cfg), "reference_us": latency.full_reference()}


def monotone_check(derived: list[dict[str, Any]]) -> bool:
    """True when the predicted latency of the derived architectures never rises with lambda."""
    ordered = sorted(derived, key=lambda d: d["lambda"])
    return all(b["predicted_us"] <= a["predicted_us"] + 1e-9 for a, b in zip(ordered, ordered[1:], strict=False))

