"""AutoFAS (arXiv 2205.09394): joint feature and architecture search for a pre-ranking model under a measured
latency budget, guided by a ranking teacher.

    prepare -> teacher -> latency -> search -> retrain -> report -> register -> promote      (pipeline.py)

Modules: `synthetic` (click generator with known ground truth), `models` (embeddings, DCN-v2 teacher,
baselines, supernet, discrete student; safetensors + arch.json), `training` (data loading, the training loop
with distillation, bootstrap AUC, paired differences, recall@K), `latency` (measured cost table, latency
model, validation), `search` (supernet training, Ray Tune trials, random search), `teacher`, `retrain`,
`report`, `serving` (MLflow pyfunc and the register stage's choice), `promotion` (the gate to
`champion`).

Choices the paper leaves open (PAPERS.md: relaxation, widths, latency and distillation formulas, all numbers
are unpublished; no public code), each a config field unless noted:

- Feature mask relaxation: one logit per feature, keep-probability sigmoid(alpha); training samples a
  binary-concrete (Gumbel-sigmoid) gate per row at temperature tau (geometric decay tau_start -> tau_end);
  a feature is kept when its probability exceeds `gate_threshold` (0.5). At least one feature is kept.
- Mixop: L layers (`latency.n_layers`, 3), candidate widths `latency.widths` (16..256) plus a skip (not in
  layer 1, whose input is the feature concatenation, not a layer width). Ops share weights by channel
  masking (FBNetV2-style: width w = the first w units of one max-width Linear), so the supernet costs one
  max-width MLP per step; ops are mixed with a per-row Gumbel-softmax sample; "strongest operator" = argmax
  of the op logits.
- Latency term: lambda * E[lat] / lat_full, with E[lat] the expected sum of measured feature and layer
  costs (latency.py docstring) and lat_full the largest architecture's predicted latency; equivalent in
  gradient to ProxylessNAS's additive form with ref = lat_full. Budgets are met by sweeping lambda (one Tune
  run per lambda) and choosing under the budget after retraining, not by a per-run budget term.
- Distillation: binary KD on logits, BCE(sigmoid(s/T), sigmoid(t/T)) * T^2, weight 1, T = 1, added to the
  click log-loss (training.py); the teacher is DCN-v2 (parallel cross + deep), embedding 16, 3 cross layers.
- Alternation: first-order DARTS; weights on 80% of train, architecture logits on the other 20%
  (`arch_fraction`), one step each in turn after `warmup_epochs` of weight-only training with every
  feature on; validation is left to ASHA and selection. The warm-up is shared: run once per seed, and every
  lambda's trial starts from its weights (`shared_warmup`), so it can be long enough for features that matter
  only through interactions to be learnt before their gates are judged (search.py docstring).
- Latency measurement: torch CPU, 1 intra-op thread, batch 1,000, median of repeats, CPU time of the timing
  thread (wall time on a shared 2-core machine measures the neighbours), every part timed inside whole
  forward passes (ops timed alone ran 2-5x faster: hot caches); an intercept calibrated on 5 random
  architectures. Retrieval cost per feature is added as a number: simulated on synthetic data, 0 (config) on
  real data, which has none.
- ASHA: on validation AUC of the derived architecture under shared weights, within one lambda (across seeds);
  across lambdas it would stop the fast architectures the front needs.
- Random search baseline: as many trials as NAS trials, uniform over the same space, each trained standalone
  with distillation (no ASHA); the one matched to each lambda is the best by validation AUC among those
  predicted no slower than that lambda's derived architecture.
- Evaluation: percentile bootstrap (rows resampled) for every AUC and paired difference; recall@K per user
  (per 100-row block where a data set has no user); the registered model is the best validation AUC under
  the budget (register.budget_fraction x teacher latency), never chosen on test.
"""
