"""Which examples each rank trains on, step by step: a pure function of (seed, epoch), for any world size.

Every optimizer step reads `gradient_accumulation_steps` global batches of `per_device_train_batch_size x world`
examples; rank r takes every world-th example of a batch (`rank_share`). The last batch of an epoch can be
short. It is **padded** to a multiple of the world size by repeating examples from the start of the epoch's
order, as torch's `DistributedSampler(drop_last=False)` does, rather than dropped: the data sets here are small
(a few thousand pairs), dropping a remainder would leave some pairs unseen every epoch, and padding repeats at
most world - 1 examples an epoch. So every rank gets the same number of non-empty micro-batches, and no rank
waits forever in an all-reduce the others never reach.
"""

from __future__ import annotations

import numpy as np


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, window: int,
                  world_size: int = 1) -> list[np.ndarray]:
    """The global batches of one epoch: seeded shuffle, sort by length within windows (little padding), then
    shuffle the batch order. A batch shorter than `world_size` x its share is padded to a multiple of
    `world_size` with examples repeated from the start of the epoch's order."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    span = batch_size * window
    batches = []
    for start in range(0, len(order), span):
        chunk = order[start:start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    batches = [pad_to_multiple(b, world_size, order) for b in batches]
    return [batches[i] for i in rng.permutation(len(batches))]


def pad_to_multiple(batch: np.ndarray, world_size: int, pool: np.ndarray) -> np.ndarray:
    """`batch` extended to a multiple of `world_size` with the first examples of `pool` (cycled if needed)."""
    missing = -len(batch) % world_size
    if not missing:
        return batch
    return np.concatenate([batch, np.resize(pool, missing)])


def rank_share(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s examples of a global batch (the same count on every rank after `epoch_batches`)."""
    return batch[rank::world_size]
