"""model.compute_dtype='bfloat16': the trainer computes in bfloat16 and keeps float32 weights."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from quiet_train import train_quietly
from tiny_grpo import tiny_grpo_config

from novarl_jax.trainer.build import build_run
from novarl_jax.trainer.checklist import checklist_rows
from novarl_jax.trainer.config import validate_config


def _config():
    c = tiny_grpo_config()
    c.model.compute_dtype = "bfloat16"
    return c


def test_the_policy_reference_and_checklist_compute_in_bfloat16():
    spec = validate_config(_config())
    run = build_run(spec)
    assert run.model.policy.compute_dtype == "bfloat16"
    assert run.model.policy.dtype == "float32"
    rows = {(s, i): v for s, i, v in checklist_rows(spec, None, run)}
    assert rows[("model", "precision")] == "float32 weights, bfloat16 compute"
    default = validate_config(tiny_grpo_config())
    rows = {(s, i): v for s, i, v in checklist_rows(default, None, build_run(default))}
    assert rows[("model", "precision")] == "float32"


def test_training_on_the_mesh_keeps_float32_weights_and_optimizer_state(tmp_path, devices):
    c = _config()
    c.experiment.update(world_size=8, tensor_parallel_size=2, expert_parallel_size=2)
    c.experiment.steps = 2
    out = train_quietly(c, tmp_path)
    state = out["state"]
    floats = [
        x
        for x in jax.tree.leaves((state.params, state.opt_state))
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert floats and {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
    assert all(np.isfinite(np.asarray(x)).all() for x in floats)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        for key in ("actor/pg_loss", "actor/kl_loss", "actor/grad_norm", "actor/entropy"):
            assert math.isfinite(m[key]), (m["step"], key)
        assert m["actor/grad_norm"] > 0
    # The reference computes as the policy does: identical at the start (KL exactly 0 in
    # the first update), apart after it.
    assert lines[0]["actor/kl_loss"] == 0.0 and lines[1]["actor/kl_loss"] > 0
