"""Losses of TaoSR1 stages 2 and 3: DPO on pass@N pairs, and GRPO with difficulty-based dynamic sampling.

Pure torch, no Ray or DeepSpeed: the trainers call these on whatever engine they run. Every function is checked
against TRL 1.16 (``tests/test_losses.py``): ``dpo_loss`` against ``DPOTrainer._compute_loss``, ``grpo_loss`` and
``grpo_advantages`` against ``GRPOTrainer._compute_loss`` and ``GRPOTrainer._generate_and_score_completions``.

Notation: a batch holds B sequences of T tokens; ``mask`` marks response (completion) tokens; log-probabilities
are natural logs of the model's next-token distribution, ``log pi(y_t | x, y_<t)``.

DPO (Rafailov et al. 2023), per pair with chosen response ``y_w`` and rejected ``y_l``::

    h      = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]     (sequence log-probs, summed)
    loss   = -(1 - ls) * log sigmoid(beta * h) - ls * log sigmoid(-beta * h)      (ls = label smoothing, cDPO)
    reward = beta * [log pi(y) - log pi_ref(y)]                                  (implicit reward, for logging)

GRPO (Shao et al. 2024) with DAPO's clip-higher and token-level mean (Yu et al. 2025), per response token t of
sequence i, with group-normalised advantage ``A_i``::

    r_it   = exp(log pi(y_it) - log pi_old(y_it))                                 (importance ratio)
    l_it   = -min(r_it * A_i, clip(r_it, 1 - eps_low, 1 + eps_high) * A_i)
           + beta_kl * [exp(d_it) - d_it - 1],  d_it = log pi_ref(y_it) - log pi(y_it)   (k3 KL estimator)
    dapo / bnpo: loss = sum_it l_it / sum_it 1          (token mean over the batch)
    grpo:        loss = mean_i (sum_t l_it / T_i)       (sequence mean, then batch mean)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.relevance.config import ADVANTAGE_SCALES, GRPO_LOSS_TYPES
from pipelines.training.modeling import causal_lm_parts  # noqa: F401 (used by the trainers through here)
from pipelines.training.shared_prefix import prefix_hidden_states

STD_EPS = 1e-4  # added to the reward std before dividing, as TRL does


# ------------------------------------------------------------------------------------------- log-probs


def response_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, temperature: float = 1.0,
    share_prefix: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_logps [B, T-1], logits [N, V])``: :func:`sequence_logps`'s per-token log-probs, and the float32
    logits (divided by ``temperature``) at the N masked target positions, in row-major order.

    The output layer runs at the masked positions only when the model exposes its decoder and ``lm_head``:
    prompts are most of every sequence, and on a 49k-token vocabulary the prompt logits would cost a fifth of
    the forward FLOPs and most of its activation memory. Other callables get one full forward pass. The prefix
    the rows share is computed once with `share_prefix` (:func:`prefix_hidden_states`).
    """
    keep = loss_mask[:, 1:].bool()
    parts = causal_lm_parts(model)
    if parts is not None and bool(keep.any()):  # an all-masked (dummy) batch keeps every parameter in the graph
        hidden = prefix_hidden_states(model, input_ids, attention_mask, share_prefix=share_prefix)
        logits = parts[1](hidden[:, :-1][keep]).float()
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        logits = logits.float()[keep]  # an empty selection still backpropagates (zeros) into every parameter
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, 1:][keep]
    # log_softmax gathered at the target = logit[target] - logsumexp(logits), without an [N, V] log-softmax copy
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    token_logps = torch.zeros(keep.shape, dtype=picked.dtype, device=picked.device).masked_scatter(keep, picked)
    return token_logps, logits


def sequence_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, temperature: float = 1.0,
    share_prefix: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the target tokens of a right- or left-padded batch.

    Position t of ``token_logps`` is ``log softmax(logits[:, t] / temperature)[input_ids[:, t + 1]]``: the
    log-prob of token t+1 given the tokens up to t. ``loss_mask`` (``[B, T]``, 1 on response tokens, 0 on
    prompt and padding) is shifted the same way, and ``token_logps`` is 0 where it is 0.

    Returns ``(sum_logps [B], token_logps [B, T-1])``: ``sum_logps = sum_t token_logps[:, t]``, the sequence
    log-probability of the response. Computed in float32 whatever the model dtype. ``temperature`` divides the
    logits (TRL's GRPOTrainer does this with its sampling temperature). The output layer runs at the response
    positions only (:func:`response_logps`).
    """
    token_logps, _ = response_logps(model, input_ids, attention_mask, loss_mask, temperature, share_prefix)
    return token_logps.sum(dim=1), token_logps


def nll_loss(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the masked tokens of the whole batch: ``-sum(logp * m) / sum(m)``.

    For DPO with an SFT term (RPO, TRL's ``rpo_alpha`` / ``loss_type=["sigmoid", "sft"]``), pass the chosen
    rows of ``sequence_logps``'s ``token_logps`` and the shifted mask (``loss_mask[:, 1:]``), then
    ``loss = dpo + alpha * nll``. It is a token mean over the batch (long responses weigh more), as in TRL.
    """
    mask = mask.to(token_logps.dtype)
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1.0)


# ------------------------------------------------------------------------------------------------- DPO


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO loss, averaged over the B pairs, with conservative label smoothing (cDPO).

    All inputs are sequence log-probs ``[B]`` (response tokens summed, see :func:`sequence_logps`); the
    reference ones carry no gradient. With ``h = (pi_w - ref_w) - (pi_l - ref_l)``::

        loss = mean( -(1 - ls) * logsigmoid(beta * h) - ls * logsigmoid(-beta * h) )

    ``ls`` is the assumed probability that a pair's preference is flipped (0 = plain DPO; cDPO suggests <= 0.1).

    Metrics (detached scalars, TRL's names): ``rewards/chosen`` = mean ``beta * (pi_w - ref_w)``,
    ``rewards/rejected`` likewise, ``rewards/margins`` = mean difference, ``rewards/accuracies`` = share of
    pairs whose implicit chosen reward is strictly above the rejected one, ``logps/chosen``, ``logps/rejected``
    = mean policy sequence log-probs.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = chosen_logratios - rejected_logratios
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
    return losses.mean(), metrics


# ------------------------------------------------------------------------------------------------ GRPO


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Group-relative advantages of ``rewards`` (``[n_groups * G]``, the G samples of a prompt contiguous).

    ``A_i = r_i - mean(group of i)``, then divided by ``std + 1e-4`` for ``scale="group"`` (the std of i's
    group) or ``"batch"`` (the std of all rewards), not divided for ``"none"`` (Dr. GRPO). The std is the
    unbiased (n - 1) one, as in TRL's ``nanstd``. A group whose rewards are all equal gets advantages 0.
    Rewards must be finite (TRL's NaN "unscorable" handling is not reproduced).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} items")
    rewards = rewards.float()
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        std = grouped.std(dim=1) if group_size > 1 else torch.zeros(len(grouped))
        advantages = advantages / (std.repeat_interleave(group_size) + STD_EPS)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros(())
        advantages = advantages / (std + STD_EPS)
    return advantages


def grpo_loss(
    new_logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta_kl: float = 0.02,
    loss_type: str = "dapo",
    num_tokens: float | torch.Tensor | None = None,
    kl_bias_correction: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-ratio GRPO/DAPO objective with a k3 KL penalty to the reference, aggregated like TRL.

    Args:
        new_logps: ``[B, T]`` per-token log-probs of the sampled responses under the policy being trained
            (with gradient); T spans the response only (e.g. ``token_logps[:, -T:]`` of :func:`sequence_logps`).
        old_logps: ``[B, T]`` the same under the policy that sampled them (no gradient). ``None`` means
            on-policy (one update per rollout): ``new_logps.detach()``, so the ratio is 1 but keeps its gradient.
        ref_logps: ``[B, T]`` under the frozen reference (the DPO model); ``None`` or ``beta_kl == 0`` skips KL.
        advantages: ``[B]`` one advantage per sequence (:func:`grpo_advantages`).
        mask: ``[B, T]`` 1 on response tokens that count (0 on padding after EOS).
        epsilon_low, epsilon_high: ratio clip range ``[1 - epsilon_low, 1 + epsilon_high]``; DAPO's clip-higher
            is ``epsilon_high > epsilon_low`` (e.g. 0.2 / 0.28).
        beta_kl: KL coefficient (DyKnow-RAG uses 0.02; TRL's default is 0).
        loss_type: ``"dapo"`` (token mean: sum of per-token losses over the batch / number of response tokens),
            ``"bnpo"`` (the same, always over this batch's own tokens) or ``"grpo"`` (mean over each sequence's
            tokens, then mean over sequences: short responses weigh more per token).
        num_tokens: ``"dapo"`` only: the divisor, when it is not this batch's token count. TRL divides by
            the response tokens of the whole generation batch (``num_items_in_batch``) divided by the number of
            processes, times gradient-accumulation steps / ``steps_per_generation``, so that accumulated
            micro-batches sum to one token mean. ``None`` = ``mask.sum()``.
        kl_bias_correction: multiply the per-token KL by the (differentiable) ratio ``r``, which makes its
            gradient the unbiased reverse-KL gradient (DeepSeek-V3.2). Off by default: the plain k3 penalty of
            GRPO / DyKnow-RAG / ROLL. TRL 1.16's ``use_bias_correction_kl`` defaults to True, so a TRL run with
            ``beta > 0`` computes this variant unless told otherwise; the value is the same on-policy (``r = 1``),
            the gradient is not.

    Per token: ``l = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta_kl * (exp(d) - d - 1)`` with
    ``r = exp(new - old)`` and ``d = ref - new`` (the KL term times ``r`` with ``kl_bias_correction``).

    Returns ``(loss, metrics)``; metrics are detached scalars, means over response tokens:
    ``clip_ratio/low_mean`` (``r < 1 - eps_low`` and ``A < 0``: the clip removed the gradient of a token whose
    probability already fell), ``clip_ratio/high_mean`` (``r > 1 + eps_high`` and ``A > 0``),
    ``clip_ratio/region_mean`` (either), ``kl`` (mean per-token KL term before ``beta_kl``, only when KL is
    on) and ``ratio/mean``.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    if old_logps is None:
        old_logps = new_logps.detach()
    mask = mask.to(new_logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(new_logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    use_kl = ref_logps is not None and beta_kl != 0.0
    if use_kl:
        delta = ref_logps - new_logps
        per_token_kl = torch.exp(delta) - delta - 1
        if kl_bias_correction:
            per_token_kl = per_token_kl * ratio
        per_token = per_token + beta_kl * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:
        divisor = mask.sum() if loss_type == "bnpo" or num_tokens is None else num_tokens
        loss = (per_token * mask).sum() / torch.as_tensor(divisor, dtype=per_token.dtype).clamp(min=1.0)

    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)

        def masked_mean(x: torch.Tensor) -> torch.Tensor:
            return (x.to(mask.dtype) * mask).sum() / n

        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + epsilon_high) & (adv > 0)
        metrics = {
            "clip_ratio/low_mean": masked_mean(low),
            "clip_ratio/high_mean": masked_mean(high),
            "clip_ratio/region_mean": masked_mean(low | high),
            "ratio/mean": masked_mean(ratio),
        }
        if use_kl:
            metrics["kl"] = masked_mean(per_token_kl)
    return loss, metrics


# ------------------------------------------------------------------------- difficulty-based dynamic sampling


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} items")
    return rewards.view(-1, group_size)


def keep_by_correct_count(correct_counts: torch.Tensor, group_size: int, gamma: int | None = None) -> torch.Tensor:
    """TaoSR1's rule for 0/1 rewards: keep a group iff ``0 < #correct < gamma``.

    ``correct_counts`` is ``[n_groups]``; ``gamma=None`` means ``group_size`` (the minimal rejection the paper
    found best: drop only all-correct and all-wrong groups). A smaller gamma also drops easy groups.
    """
    gamma = group_size if gamma is None else gamma
    if not 0 < gamma <= group_size:
        raise ValueError(f"gamma must lie in (0, group_size={group_size}], got {gamma}")
    counts = torch.as_tensor(correct_counts)
    return (counts > 0) & (counts < gamma)


def keep_by_reward_std(rewards: torch.Tensor, group_size: int, epsilon: float = 1e-6) -> torch.Tensor:
    """Graded rewards: keep a group iff the (unbiased) std of its rewards is above ``epsilon``.

    A group with no spread has zero advantages everywhere, so it only dilutes the token mean (DAPO).
    """
    grouped = _grouped(rewards, group_size)
    std = grouped.std(dim=1) if group_size > 1 else torch.zeros(len(grouped))
    return std > epsilon


def keep_by_mean_range(rewards: torch.Tensor, group_size: int, low: float, high: float) -> torch.Tensor:
    """ROLL's / DyKnow-RAG's form: keep a group iff ``low < mean(group rewards) < high`` (e.g. 0.01 / 0.9)."""
    mean = _grouped(rewards, group_size).mean(dim=1)
    return (mean > low) & (mean < high)


def difficulty_filter(
    rewards: torch.Tensor,
    group_size: int,
    gamma: int | None = None,
    epsilon: float = 1e-6,
    binary: bool | None = None,
) -> torch.Tensor:
    """Which groups to keep, ``[n_groups]`` bool, from the rewards ``[n_groups * G]`` of the G samples per prompt.

    Binary rewards (all in {0, 1}; or ``binary=True``): :func:`keep_by_correct_count` with ``gamma``.
    Otherwise: :func:`keep_by_reward_std` with ``epsilon``. Expand to samples with
    ``mask.repeat_interleave(group_size)``.
    """
    grouped = _grouped(rewards, group_size)
    if binary is None:
        binary = bool(((grouped == 0) | (grouped == 1)).all())
    if binary:
        return keep_by_correct_count((grouped > 0.5).sum(dim=1), group_size, gamma)
    return keep_by_reward_std(grouped.view(-1), group_size, epsilon)
