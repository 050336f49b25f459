"""The settings of every AutoFAS stage, one dataclass per profile section. Imports no ML library.

The stage modules (teacher, latency, search, retrain, ...) import their config from here, so a profile or a
`--set stage.field=value` can be validated, and `--help` printed, without torch or Ray. Enum-like fields are
`Literal[...]`: pydantic (`pipelines.config.build_config`) refuses another value naming the field and its choices,
and `check_choices` does the same for a config built directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from pipelines.config import GATE
from pipelines.data.config import ClickPrepareConfig
from pipelines.training.config import check_choices

# thread_cpu: CPU time of the timing thread (process CPU time when threads > 1); wall: elapsed time.
Clock = Literal["thread_cpu", "wall"]
CLOCKS: tuple[str, ...] = get_args(Clock)
# The kinds of model the retrain stage trains (its results' "kind").
ModelKind = Literal["searched", "random", "baseline", "teacher"]
DEFAULT_NAME = "searchrel-autofas"


@dataclass
class TeacherConfig:
    """Settings of the `teacher` stage."""

    embedding_dim: int = field(default=16, metadata={"help": "Embedding size of every feature."})
    cross_layers: int = field(default=3, metadata={"help": "DCN-v2 cross layers."})
    widths: list[int] = field(default_factory=lambda: [256, 128, 64], metadata={"help": "Deep MLP widths."})
    epochs: int = field(default=6, metadata={"help": "Most epochs (early stopping on val AUC)."})
    patience: int = field(default=2, metadata={"help": "Epochs without val AUC gain before stopping."})
    batch_size: int = field(default=1024, metadata={"help": "Rows per step."})
    lr: float = field(default=2e-3, metadata={"help": "Adam learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay."})
    max_train_rows: int = field(default=0, metadata={"help": "Seeded subsample of train rows; 0 = all."})
    threads: int = field(default=2, metadata={"help": "torch threads for training."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, order and subsample."})


@dataclass
class LatencyConfig:
    """Settings of the `latency` stage; it also fixes the search space that the search stage uses."""

    batch: int = field(default=1000, metadata={"help": "Candidates per timed forward pass."})
    repeats: int = field(default=50, metadata={"help": "Timings per measurement; the median is kept."})
    inner: int = field(default=1, metadata={"help": "Calls per timing (their mean is one timing)."})
    warmup: int = field(default=5, metadata={"help": "Untimed calls before timing."})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads while timing (1: one serving "
                                                      "thread per request, and stable on a shared machine)."})
    clock: Clock = field(default="thread_cpu", metadata={"help": "thread_cpu: CPU time of the timing thread "
                                                                "(process CPU time when threads > 1); wall: "
                                                                "elapsed time. See the module docstring."})
    embedding_dim: int = field(default=8, metadata={"help": "Search space: embedding size of every feature."})
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256],
                              metadata={"help": "Search space: candidate MLP widths of each mixed layer."})
    n_layers: int = field(default=3, metadata={"help": "Search space: mixed layers (layer 1 has no skip)."})
    input_grid: int = field(default=6, metadata={"help": "Grid points (feature counts) for the first layer."})
    calibration_archs: int = field(default=5, metadata={"help": "Random architectures that set the intercept."})
    validate_archs: int = field(default=20, metadata={"help": "Random architectures for the validation."})
    default_retrieval_cost_us: float = field(
        default=0.0, metadata={"help": "Retrieval cost per feature where the data has no feature_meta.json."})
    seed: int = field(default=0, metadata={"help": "Seed of the batch and the random architectures."})

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class SearchConfig:
    """Settings of the `search` stage (the search space itself comes from the latency stage's table)."""

    lambdas: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.2, 0.8],
                                 metadata={"help": "Latency weights, one Tune run each (see module docstring)."})
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "Seeds per lambda (trials)."})
    epochs: int = field(default=4, metadata={"help": "Supernet epochs per trial (ASHA's max_t)."})
    warmup_epochs: int = field(default=1, metadata={"help": "Epochs of weight-only updates first."})
    batch_size: int = field(default=1024, metadata={"help": "Rows per weight / architecture step."})
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate of the supernet weights."})
    arch_lr: float = field(default=2e-2, metadata={"help": "Adam learning rate of gate and op logits."})
    arch_fraction: float = field(default=0.2, metadata={"help": "Share of train rows for architecture steps."})
    gate_init: float = field(default=1.0, metadata={"help": "Initial gate logit (sigmoid(1) = 0.73 kept)."})
    gate_threshold: float = field(default=0.5, metadata={"help": "Keep a feature when its probability exceeds it."})
    tau_start: float = field(default=1.0, metadata={"help": "Gumbel temperature at the first epoch."})
    tau_end: float = field(default=0.2, metadata={"help": "Gumbel temperature at the last epoch."})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the distillation term."})
    kd_temperature: float = field(default=1.0, metadata={"help": "Distillation temperature."})
    max_train_rows: int = field(default=0, metadata={"help": "Seeded subsample of train rows; 0 = all."})
    max_val_rows: int = field(default=50_000, metadata={"help": "Seeded subsample of val rows for trial AUC."})
    grace_period: int = field(default=1, metadata={"help": "ASHA: epochs before a trial can be stopped (set it "
                                                           "past warmup_epochs: warm-up AUCs compare nothing)."})
    reduction_factor: int = field(default=2, metadata={"help": "ASHA reduction factor."})
    max_concurrent: int = field(default=2, metadata={"help": "Trials at once (Ray Tune)."})
    cpus_per_trial: float = field(default=1.0, metadata={"help": "Ray CPUs per trial (2 concurrent on 2 CPUs)."})
    trial_threads: int = field(default=1, metadata={"help": "torch threads inside a trial."})
    random_search: bool = field(default=True, metadata={"help": "Run the random-architecture baseline."})
    shared_warmup: bool = field(default=True, metadata={
        "help": "Warm up once per seed and start every lambda's trial from it (see module docstring); off = "
                "each trial runs its own warm-up."})


@dataclass
class RetrainConfig:
    """Settings of the `retrain` stage."""

    epochs: int = field(default=6, metadata={"help": "Most epochs per model (early stopping on val AUC)."})
    patience: int = field(default=2, metadata={"help": "Epochs without val AUC gain before stopping."})
    batch_size: int = field(default=1024, metadata={"help": "Rows per step."})
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate."})
    kd_weight: float = field(default=1.0, metadata={"help": "Distillation weight for distilled models."})
    kd_temperature: float = field(default=1.0, metadata={"help": "Distillation temperature."})
    max_train_rows: int = field(default=0, metadata={"help": "Seeded subsample of train rows; 0 = all."})
    mlp_widths: list[int] = field(default_factory=lambda: [64, 32], metadata={"help": "Hand-made MLP widths."})
    cold_widths: list[int] = field(default_factory=lambda: [256, 128, 64],
                                   metadata={"help": "COLD-like MLP widths (COLD: 1024-512-256-128-64)."})
    two_tower_widths: list[int] = field(default_factory=lambda: [64, 32],
                                        metadata={"help": "Tower widths (the last is the dot-product size)."})
    baselines: bool = field(default=True, metadata={"help": "Train the hand-made baselines too."})
    latency_repeats: int = field(default=30, metadata={"help": "Timings per model (median kept)."})
    threads: int = field(default=2, metadata={"help": "torch threads for training."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, order and subsample."})


@dataclass
class ReportConfig:
    """Settings of the `report` stage."""

    n_boot: int = field(default=1000, metadata={"help": "Bootstrap resamples for every interval."})
    recall_k: int = field(default=10, metadata={"help": "K of recall@K against the teacher's top-K per user."})
    teacher_auc_ratio: float = field(default=0.99, metadata={"help": "Target: share of the teacher's AUC..."})
    teacher_latency_ratio: float = field(default=0.2, metadata={"help": "...at this share of its latency."})
    search_time_ratio: float = field(default=1.5, metadata={"help": "Target: search wall time / teacher time."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})


@dataclass
class RegisterConfig:
    """Settings of the `register` stage."""

    model_name: str = field(default="searchrel-autofas", metadata={"help": "Registered model name in MLflow."})
    alias: str = field(default="challenger", metadata={"help": "Alias given to the new version (promotion to "
                                                                 "champion happens elsewhere)."})
    latency_budget_us: float = field(default=0.0, metadata={"help": "Latency budget per 1,000 candidates (us); "
                                                                      "0 = budget_fraction x the teacher's."})
    budget_fraction: float = field(default=0.2, metadata={"help": "Budget as a share of the teacher's latency."})
    kinds: list[ModelKind] = field(default_factory=lambda: ["searched", "random", "baseline"],
                             metadata={"help": "Which retrained models may be registered."})
    example_rows: int = field(default=5, metadata={"help": "Test rows logged as the input example."})


@dataclass
class PromoteConfig:
    """Settings of the `promote` stage (the AutoFAS promotion gate)."""

    model_name: str = field(default=DEFAULT_NAME, metadata={"help": "Registered model name in MLflow."})
    min_auc_gain: float = field(default=0.001, metadata={GATE: True,
        "help": "The challenger's test AUC must exceed the champion's (or, with no champion, the logistic "
                "baseline's) by more than this."})
    latency_tolerance: float = field(default=0.1, metadata={GATE: True,
        "help": "The challenger's measured latency may exceed the champion's (timed side by side) or the "
                "first champion's budget by at most this fraction (timing noise)."})
    latency_budget_us: float = field(default=0.0, metadata={GATE: True,
        "help": "With no champion yet: latency budget per batch of candidates (us); 0 = the budget the "
                "register stage used (registered.json)."})
    first_baseline: Literal["logistic", "none"] = field(default="logistic", metadata={GATE: True,
        "help": "With no champion yet: logistic (the first model must beat the run's logistic-regression "
                "baseline on the same rows) or none (no AUC bar; the latency budget still applies)."})
    eval_split: Literal["test", "val"] = field(default="test", metadata={GATE: True,
        "help": "Which split of the run's prepare stage is the frozen evaluation set (test or val)."})
    max_rows: int = field(default=0, metadata={"help": "Seeded subsample of the evaluation rows; 0 = all."})
    seed: int = field(default=0, metadata={"help": "Seed of the subsample."})
    latency_repeats: int = field(default=30, metadata={"help": "Timed rounds per model (median kept)."})
    lock_timeout_s: float = field(default=3600.0, metadata={
        "help": "How long to wait for another promotion of the same model to finish."})

    def __post_init__(self) -> None:
        check_choices(self)


# Profile section (`autofas.<section>`) -> its config class.
SECTIONS: dict[str, type] = {
    "prepare": ClickPrepareConfig,
    "teacher": TeacherConfig,
    "latency": LatencyConfig,
    "search": SearchConfig,
    "retrain": RetrainConfig,
    "report": ReportConfig,
    "register": RegisterConfig,
    "promote": PromoteConfig,
}
