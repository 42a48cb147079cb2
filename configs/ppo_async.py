"""Asynchronous PPO: rollout workers sample while the trainer learns (the quickstart's cadence).

Weights are broadcast to the rollout workers every 4 updates, or as soon as any worker lags
the trainer by 6 policy versions, or at least every 30 seconds while updates are pending.
A rollout batch is trained only if it is at most 6 versions older than the trainer when the
trainer takes it; staler batches are dropped (``sync/dropped_samples``). With PPO's
2 epochs x 2 minibatches = 4 updates per step, a batch sampled one step behind the trainer
(staleness 4) is trained and one sampled two steps behind (staleness 8) is dropped. The
loss corrects for the older policy that sampled a batch with truncated importance weights
(``ppo.tis_cap``). See docs/async.md.

Run:
    python -m novarl_jax.train --config=configs/ppo_async.py --workdir=/tmp/ppo_async

With two rollout workers (two rollouts sampled ahead, so a batch can be two steps, 8
versions, behind), append ``experiment.rollout_workers=2 experiment.weight_sync_max_staleness=8``;
with the bound left at 6 such batches are dropped (the run warns at start).
"""

from configs import ppo


def get_config():
    config = ppo.get_config()
    exp = config.experiment
    exp.async_rollouts = True  # rollout workers sample while the trainer learns
    exp.weight_sync_interval = 4  # broadcast every 4 optimizer updates...
    exp.weight_sync_max_staleness = 6  # ...or when a worker lags by 6 versions (also the bound)
    exp.weight_sync_timeout_s = 30.0  # ...or at least every 30 s while updates are pending
    # A batch sampled by an older policy: each token's loss weighted by
    # min(pi_old / pi_behavior, 2), pi_old the trainer's scoring of the batch (docs/async.md).
    config.ppo.tis_cap = 2.0
    return config
