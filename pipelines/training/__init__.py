"""The training runtime shared by SFT, DPO and GRPO: one config base, one DeepSpeed worker, one driver.

- `config.TrainingConfig`: the shared settings (no ML import), inherited by `SFTConfig`, `DPOConfig`, `GRPOConfig`.
- `runtime.TrainingWorker`: Ray Train set-up, engine build, resume, checkpoints (with per-algorithm extra
  state), final save (ZeRO-3 gathers on rank 0 only), MLflow metrics and the progress bar; each algorithm
  overrides `setup`, `total_steps`, `training_step` and, where it needs them, `evaluate` / `extra_state`.
- `runtime.run_training`: the driver side: resume keys, the cluster-size check, `TorchTrainer` with
  `FailureConfig(max_failures)`.
- `precision`: `dtype: auto` (bf16 only where it measures fast here) and the matmul peaks MFU is reported against.
- `sharding`: the batch order, a pure function of (seed, epoch), the same step count on every rank.

Names a TRL user looks for, and where searchrel differs on purpose:

| searchrel | TRL | note |
| --- | --- | --- |
| `learning_rate`, `lr_scheduler_type`, `warmup_ratio`, `max_grad_norm`, `weight_decay`, `per_device_train_batch_size`, `gradient_accumulation_steps`, `num_train_epochs`, `max_steps`, `save_steps`, `logging_steps`, `eval_steps`, `seed` | same | same meaning; `lr_scheduler_type` offers linear, cosine and constant |
| `dtype: bfloat16` / `dtype: float32` | `bf16=True` / `bf16=False` | `dtype: auto` (no TRL counterpart) picks bf16 only where a matmul benchmark on the driver's machine measures it at least 1.2x fp32 (`precision.resolve_dtype`), once per stage |
| `zero_stage`, `deepspeed_config` | `deepspeed` (a JSON file or dict) | the stage is a field; a file adds knobs and is checked against the fields |
| `num_workers`, `cpus_per_worker`, `use_gpu`, `memory_per_worker_gb`, `max_failures` | (launcher) | Ray Train's `ScalingConfig` and `FailureConfig` |
| `lora.enabled`, `lora.r`, `lora.alpha`, `lora.dropout`, `lora.target_modules` | `peft_config` | LoRA adapters are merged into the saved weights |
| DPO `beta`, `label_smoothing` | same | |
| DPO `nll_weight` | `rpo_alpha` | weight of the NLL term on chosen responses |
| GRPO `group_size` | `num_generations` | G |
| GRPO `beta_kl` | `beta` | KL coefficient (`beta` is DPO's temperature here) |
| GRPO `epsilon_low`, `epsilon_high` | `epsilon`, `epsilon_high` | ratio clip; TRL's `epsilon` is the lower one |
| GRPO `reward_std_threshold` | (none) | graded rewards: keep a group iff its reward std exceeds this (not a clip) |
| GRPO `max_steps` | `max_steps` | rollout-and-update steps; each takes `mini_batches` optimizer steps |
| GRPO `mini_batches` | `steps_per_generation` / `num_iterations` | optimizer updates per rollout batch |
"""
