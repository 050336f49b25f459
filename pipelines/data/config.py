"""The settings of the `prepare` stage of both pipelines, and its datasets. Imports no ML library.

Which config a `prepare` section is validated against depends on the dataset: a relevance dataset (taosr1) is
prepared with :class:`PrepareConfig`, a click dataset (autofas) with :class:`ClickPrepareConfig`
(:func:`prepare_config_class`, :data:`PREPARE_CONFIGS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from pipelines.training.config import check_choices

RELEVANCE_DATASETS = ("crowdflower", "homedepot", "esci", "table")
CLICK_DATASETS = ("movielens", "criteo", "avazu", "synthetic")  # synthetic: generated, needs no path
# How the prepare stages run their row checks: Ray Data map_batches or in-process pandas.
Engine = Literal["ray", "pandas"]
ENGINES: tuple[str, ...] = get_args(Engine)


def pipeline_of(dataset: str) -> str:
    if dataset in RELEVANCE_DATASETS:
        return "taosr1"
    if dataset in CLICK_DATASETS:
        return "autofas"
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(RELEVANCE_DATASETS + CLICK_DATASETS)}")


@dataclass
class PrepareConfig:
    """Settings of the `prepare` stage of the TaoSR1 pipeline."""

    seed: int = field(default=0, metadata={"help": "Seed of the query split (and of query subsampling)."})
    val_fraction: float = field(default=0.1, metadata={"help": "Share of queries in the validation split."})
    test_fraction: float = field(default=0.2, metadata={"help": "Share of queries in the test split."})
    max_bad_fraction: float = field(
        default=0.05,
        metadata={"help": "Fail the stage when more than this share of rows is quarantined (a broken file)."},
    )
    max_query_chars: int = field(default=300, metadata={"help": "Longer queries are quarantined as oversized."})
    max_text_chars: int = field(
        default=20_000, metadata={"help": "Titles or descriptions longer than this are quarantined as oversized."}
    )
    homedepot_cuts: list[float] = field(
        default_factory=lambda: [1.5, 2.25, 2.75],
        metadata={
            "help": "Cut points on Home Depot's 1-3 rater mean: <=c1 -> 1 Irrelevant, <=c2 -> 2 Mismatch, "
            "<=c3 -> 3 Related, above -> 4 Excellent. The defaults put the common values 1.0/1.33 in 1, "
            "1.67/2.0 in 2, 2.33/2.67 in 3 and only unanimous 3.0 in 4."
        },
    )
    columns: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "For dataset=table: canonical column -> source column (query, title, label required; "
            "query_id, item_id, description optional). Other datasets have fixed mappings."
        },
    )
    label_map: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "For dataset=table: source label value -> level 1-4. Empty: labels must be 1-4."},
    )
    max_queries: int = field(
        default=0, metadata={"help": "Keep only this many queries (seeded choice) before splitting; 0 keeps all."}
    )
    engine: Engine = field(default="ray", metadata={"help": f"{' or '.join(ENGINES)}: ray (Ray Data map_batches) or "
                                                          "pandas (in-process)."})
    batch_size: int = field(default=8192, metadata={"help": "Rows per Ray Data batch."})

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class SyntheticConfig:
    """Size and ground truth of the synthetic click set (`--dataset synthetic`)."""

    rows: int = field(default=200_000, metadata={"help": "Rows in total (all splits)."})
    chunk_rows: int = field(default=250_000, metadata={"help": "Rows generated per chunk; part of the seed: "
                                                                 "changing it changes the rows."})
    users: int = field(default=2_000, metadata={"help": "Distinct users (user_id cardinality)."})
    items: int = field(default=1_000, metadata={"help": "Distinct items (item_id cardinality)."})
    cardinality: int = field(default=50, metadata={"help": "Values per main/interaction/noise feature."})
    n_main: int = field(default=4, metadata={"help": "Categorical main-effect features main_0..."})
    n_interaction_pairs: int = field(default=2, metadata={"help": "Pairs inter_{p}a/inter_{p}b that act only "
                                                                  "through their product."})
    n_noise: int = field(default=4, metadata={"help": "Categorical pure-noise features noise_0..."})
    n_redundant: int = field(default=2, metadata={"help": "Noisy copies copy_main_k of the first main features."})
    numeric: bool = field(default=True, metadata={"help": "Add `price` (numeric main effect) and `noise_num`."})
    base_logit: float = field(default=-1.0, metadata={"help": "Intercept of the click logit."})
    main_scale: float = field(default=0.6, metadata={"help": "Std of each main feature's per-value effect."})
    inter_scale: float = field(default=0.7, metadata={"help": "Size of each interaction pair's +-effect."})
    id_scale: float = field(default=0.4, metadata={"help": "Std of the user and item biases."})
    affinity: float = field(default=0.6, metadata={"help": "Weight of the user-item latent dot product."})
    affinity_dim: int = field(default=4, metadata={"help": "Dimension of the user/item latent vectors."})
    price_coef: float = field(default=-0.5, metadata={"help": "Effect of standardised log(price)."})
    copy_noise: float = field(default=0.1, metadata={"help": "Share of a redundant copy's rows replaced at random."})
    retrieval_cost_low_us: float = field(default=5.0, metadata={"help": "Simulated fetch cost, lower bound "
                                                                          "(us per 1,000 candidates)."})
    retrieval_cost_high_us: float = field(default=40.0, metadata={"help": "Simulated fetch cost, upper bound."})
    val_fraction: float = field(default=0.1, metadata={"help": "Share of rows in val (seeded per row)."})
    test_fraction: float = field(default=0.1, metadata={"help": "Share of rows in test (seeded per row)."})


@dataclass
class ClickPrepareConfig:
    """Settings of the `prepare` stage of the AutoFAS pipeline."""

    seed: int = field(default=0, metadata={"help": "Seed recorded with the data (the splits are rule-based)."})
    min_count: int = field(
        default=2, metadata={"help": "Categorical values seen fewer times in train map to the out-of-vocabulary id."}
    )
    synthetic: SyntheticConfig = field(
        default_factory=SyntheticConfig, metadata={"help": "Generator settings for --dataset synthetic."}
    )
    max_bad_fraction: float = field(
        default=0.05,
        metadata={"help": "Fail the stage when more than this share of click rows is quarantined (a broken file)."},
    )
    engine: Engine = field(
        default="pandas",
        metadata={"help": "pandas (in-process: the click row checks are vectorised, MovieLens-100k takes about a "
                          "second) or ray (Ray Data map_batches, on the cluster of RAY_ADDRESS when set)."},
    )
    batch_size: int = field(default=8192, metadata={"help": "Rows per Ray Data batch."})

    def __post_init__(self) -> None:
        check_choices(self)


# Dataset -> the config class of its `prepare` section.
PREPARE_CONFIGS: dict[str, type] = {
    **dict.fromkeys(RELEVANCE_DATASETS, PrepareConfig),
    **dict.fromkeys(CLICK_DATASETS, ClickPrepareConfig),
}


def prepare_config_class(dataset: str) -> type:
    """The config class of the `prepare` section for `dataset` (an unknown dataset: ValueError naming them)."""
    pipeline_of(dataset)
    return PREPARE_CONFIGS[dataset]


# Pipeline -> the config class of its `prepare` section (each pipeline's SECTIONS lists it as "prepare").
PREPARE_BY_PIPELINE: dict[str, type] = {"taosr1": PrepareConfig, "autofas": ClickPrepareConfig}
