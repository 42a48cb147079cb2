"""Every parallel layout computes the same RL update as one device: the layout-invariance suite.

For a small Mixture-of-Experts policy (the bench-tiny Mixtral shrunk to fit CI: vocab 32,
hidden 32, 4 layers, 4 heads, 2 KV heads, 8 experts, top-2, dropless routing, a value head)
and one GRPO and one PPO update built from the trainer's own pieces
(:func:`~novarl_jax.trainer.steps.make_apply_fn`,
:func:`~novarl_jax.trainer.steps.make_update_step`, the registry's loss functions and the
trainer's optimizer), every layout of 8 fake devices (and a 1-device mesh) must give

* the same sampled tokens, log-probs and expert choices for the same key (KV-cache sampler);
* the same loss and metrics, the same summed gradient and the same updated parameters;

as the single-device run without a mesh, in float32 to a relative 1e-5. Pipeline microbatch
counts 1, 2 and 4 and gradient-accumulation splits 1, 2 and 4 must give the same update too.

Why dropless routing: with a capacity factor, which choices an expert drops depends on the
routing group (the tokens of one expert-parallel shard, or of one microbatch), so layouts
legitimately route differently. Dropless routing makes the block's output independent of the
grouping, so any difference here would be a bug.

The measured maximum relative differences are printed as a table by the last test (run with
``-rA`` or ``-s`` to see it) and recorded in docs/layout_invariance.md.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from novarl_jax.algorithms.registry import make_loss_fn
from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.core.sharding import batch_spec
from novarl_jax.models import ModelConfig, init_params, shard_params
from novarl_jax.rollout.sampler import sample
from novarl_jax.trainer import steps
from novarl_jax.trainer.state import init_train_state, make_optimizer

RTOL = 1e-5
# Initial weights are normal(0, 0.02); scaled by 2.5 (std 0.05) the logits, routing and
# values clearly depend on the input while the problem stays well conditioned. (At std 0.1
# the 4-layer model's gradients reach norm 30 and float32 reassociation alone moves the
# loss by 3e-5 relative between dp8 and one device, with no pipeline involved.)
SCALE = 2.5

CONFIG = ModelConfig(
    vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
    capacity_factor=None, max_position_embeddings=64, value_head=True,
    router_aux_loss_coef=0.01, router_z_loss_coef=0.001,
)  # fmt: skip
PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS = 4, 4, 8, 8  # 16 rollouts of 8 + 8 tokens
PAD, STOP = 0, 1

# name -> (layout, pipeline microbatches). The pipeline layouts run 2 microbatches, so the
# schedule really interleaves stages; `test_pipeline_microbatches_*` covers 1 and 4.
LAYOUTS = {
    "1dev": (ParallelLayout(), 1),
    "dp8": (ParallelLayout(dp=8), 1),
    "tp8": (ParallelLayout(tp=8), 1),
    "ep8": (ParallelLayout(ep=8), 1),
    "pp2_dp4": (ParallelLayout(pp=2, dp=4), 2),
    "tp2_ep2_dp2": (ParallelLayout(tp=2, ep=2, dp=2), 1),
    "tp2_pp2_ep2_demo": (ParallelLayout(tp=2, pp=2, ep=2), 2),
    "pp2_tp2_dp2": (ParallelLayout(pp=2, tp=2, dp=2), 2),
    "pp4_ep2": (ParallelLayout(pp=4, ep=2), 2),
}

# Measured differences: (case, quantity) -> max relative difference (printed at the end).
_MEASURED: dict[tuple[str, str], float] = {}


def max_rel(got, want) -> float:
    """Largest ``max|got - want| / max|want|`` over the leaves of two pytrees.

    Normalising each leaf by its own largest entry (not elementwise) is what float32
    reassociation noise is proportional to; an elementwise ratio would be dominated by entries
    that are zero up to that noise.
    """
    worst = 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape
        if w.size == 0:
            continue
        scale = np.max(np.abs(w))
        diff = np.max(np.abs(g - w))
        worst = max(worst, float(diff / scale) if scale > 0 else float(diff))
    return worst


def _record(case: str, quantity: str, got, want) -> float:
    value = max_rel(got, want)
    _MEASURED[(case, quantity)] = max(value, _MEASURED.get((case, quantity), 0.0))
    return value


def _optim():
    """The trainer's optimizer (global-norm clip + AdamW) with a large Adam epsilon.

    Adam's first step moves every weight by about ``lr * sign(g)`` when ``|g| >> eps``: a
    gradient entry that is zero up to float32 noise (1e-9 here, 1e-10 there, of either sign)
    would move by +lr on one layout and -lr on another, so the updated parameters would
    differ by ``2 * lr`` although the gradients agree to 1e-7. With ``eps = 1`` the step is
    ``lr * (1 - b1) * g / (sqrt(1 - b2) * |g| + 1)``, smooth in g, and the comparison of the
    updated parameters measures the layout, not Adam's amplification of noise.
    """
    return types.SimpleNamespace(
        learning_rate=1e-2, schedule="constant", warmup_steps=0, decay_steps=0,
        end_learning_rate=0.0, weight_decay=0.01, max_grad_norm=1.0, b1=0.9, b2=0.99, eps=1.0,
    )  # fmt: skip


def _keep_gradients() -> optax.GradientTransformation:
    """An optax stage that stores the incoming (summed, unclipped) gradients in its state."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda updates, state, params=None: (updates, updates),
    )


OPTIMIZER = optax.chain(_keep_gradients(), make_optimizer(_optim()))

ALGORITHMS = {
    # GRPO with its KL-to-reference term and an entropy bonus (the value head is unused).
    "grpo": dict(loss=dict(entropy_coef=0.01), router_replay=False),
    # PPO with the shared critic, value clipping, and router replay of the sampled choices.
    "ppo": dict(loss=dict(kl_coef=0.05), router_replay=True),
}


def _loss_fn(name: str, *, moe: bool = True):
    coefs = dict(
        moe_aux_loss_coef=CONFIG.router_aux_loss_coef if moe else 0.0,
        moe_z_loss_coef=CONFIG.router_z_loss_coef if moe else 0.0,
    )
    return make_loss_fn(name, **ALGORITHMS[name]["loss"], **coefs)


# --------------------------------------------------------------------------------------------
# The single-device reference


@pytest.fixture(scope="module")
def reference():
    return _reference()


@functools.cache
def _reference():
    """Params, prompts, the single-device sample, the two training batches and updates."""
    key = jax.random.key(0)
    k_params, k_prompt, k_len, k_sample, k_noise = jax.random.split(key, 5)
    params = init_params(CONFIG, k_params)
    # Weights with std 0.05 rather than 0.02: logits, routing and values clearly depend on
    # the input, so every layer's gradient is far above float32 noise.
    params = jax.tree.map(lambda x: x * SCALE if x.ndim >= 2 else x, params)
    prompts = jax.random.randint(k_prompt, (PROMPTS, PROMPT_LEN), 2, CONFIG.vocab_size)
    lengths = jax.random.randint(k_len, (PROMPTS, 1), 3, PROMPT_LEN + 1)
    prompt_mask = (jnp.arange(PROMPT_LEN)[None, :] < lengths).astype(jnp.int32)  # right-padded
    prompts = jnp.where(prompt_mask > 0, prompts, PAD).astype(jnp.int32)
    sampled = _sample(params, prompts, prompt_mask, k_sample, mesh=None)
    assert 0 < int(sampled.response_mask.sum()) < sampled.response_mask.size  # some stop early

    batches = {name: _batch(name, params, sampled, k_noise) for name in ALGORITHMS}
    updates = {
        name: _update(name, params, batches[name], mesh=None, micro_batches=1, microbatches=1)
        for name in ALGORITHMS
    }
    return dict(
        params=params, prompts=prompts, prompt_mask=prompt_mask, key=k_sample,
        sampled=sampled, batches=batches, updates=updates,
    )  # fmt: skip


def _sample(params, prompts, prompt_mask, key, *, mesh):
    return sample(
        params, CONFIG, prompts, prompt_mask, key, max_new_tokens=NEW_TOKENS, temperature=1.0,
        stop_token_ids=(STOP,), pad_id=PAD, mesh=mesh, num_samples=GROUP, return_routing=True,
    )  # fmt: skip


def _batch(name: str, params, sampled, key) -> dict:
    """A training minibatch from the sampled rollouts, as the trainer builds it."""
    batch = steps.model_inputs(sampled)
    # Rows first, as the trainer's loop keeps it (minibatches slice rows); the model's
    # [L, B, T, K] is restored inside apply_fn (`_update_fn`).
    batch["routing"] = jnp.moveaxis(sampled.routing, 1, 0)
    mask = batch["response_mask"].astype(jnp.float32)
    spec = steps.ModelSpec(policy=CONFIG, prompt_length=PROMPT_LEN)
    scored = jax.jit(
        lambda p, b: steps.score_batch(steps.make_apply_fn(spec), p, p, b, need_ref=False)
    )({"policy": params}, batch)
    k_old, k_ref, k_adv, k_ret = jax.random.split(key, 4)
    shape = mask.shape
    # Old/reference log-probs a little away from the current ones, so ratios are not all 1
    # and some are clipped.
    batch["old_logprobs"] = scored["old_logprobs"] + 0.2 * jax.random.normal(k_old, shape)
    batch["ref_logprobs"] = scored["old_logprobs"] + 0.2 * jax.random.normal(k_ref, shape)
    if name == "grpo":
        rewards = jax.random.normal(k_adv, (PROMPTS, GROUP))
        adv = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-6)
        batch["advantages"] = jnp.repeat(adv.reshape(-1, 1), shape[1], 1) * mask
    else:
        batch["advantages"] = jax.random.normal(k_adv, shape) * mask
        batch["old_values"] = scored["old_values"]
        batch["returns"] = (scored["old_values"] + jax.random.normal(k_ret, shape)) * mask
    return batch


@functools.cache
def _update_fn(name: str, mesh, micro_batches: int, microbatches: int, moe: bool):
    spec = steps.ModelSpec(
        policy=CONFIG,
        prompt_length=PROMPT_LEN,
        router_replay=ALGORITHMS[name]["router_replay"],
        num_microbatches=microbatches,
    )
    inner = steps.make_apply_fn(spec, mesh)

    def apply_fn(params, batch):
        return inner(params, {**batch, "routing": jnp.moveaxis(batch["routing"], 0, 1)})

    update = steps.make_update_step(
        _loss_fn(name, moe=moe), apply_fn, OPTIMIZER, micro_batches=micro_batches, mesh=mesh
    )
    return jax.jit(update)


def _update(name, params, batch, *, mesh, micro_batches, microbatches, moe=True):
    """(metrics, summed gradients, updated params) of one update step."""
    placed = {"policy": params if mesh is None else shard_params(params, CONFIG, mesh)}
    state = init_train_state(placed, OPTIMIZER, jax.random.key(1))
    if mesh is not None:
        batch = _shard_batch(batch, mesh)
    new_state, metrics = _update_fn(name, mesh, micro_batches, microbatches, moe)(state, batch)
    grads = new_state.opt_state[0]["policy"]
    return metrics, grads, new_state.params["policy"]


def _shard_batch(batch, mesh):
    def put(x):
        spec = batch_spec(x.ndim, mesh, batch_size=x.shape[0])
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    return jax.tree.map(put, batch)


def _compare_update(case, got, want, *, skip_metrics=()):
    (g_metrics, g_grads, g_params), (w_metrics, w_grads, w_params) = got, want
    g_metrics = {k: v for k, v in g_metrics.items() if k not in skip_metrics}
    w_metrics = {k: v for k, v in w_metrics.items() if k not in skip_metrics}
    assert float(g_metrics["train/skipped"]) == 0.0
    loss = _record(case, "loss", g_metrics["train/loss"], w_metrics["train/loss"])
    metrics = _record(case, "metrics", g_metrics, w_metrics)
    grads = _record(case, "gradients", g_grads, w_grads)
    params = _record(case, "params", g_params, w_params)
    assert loss <= RTOL, f"{case}: loss differs by {loss:.2e}"
    assert metrics <= RTOL, f"{case}: metrics differ by {metrics:.2e}"
    assert grads <= RTOL, f"{case}: gradients differ by {grads:.2e}"
    assert params <= RTOL, f"{case}: updated params differ by {params:.2e}"


# --------------------------------------------------------------------------------------------
# The suite


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_device(name, reference, devices):
    layout, microbatches = LAYOUTS[name]
    mesh = layout.make_mesh(devices[: layout.world_size])
    ref = reference
    params = shard_params(ref["params"], CONFIG, mesh)

    got = _sample(params, ref["prompts"], ref["prompt_mask"], ref["key"], mesh=mesh)
    want = ref["sampled"]
    np.testing.assert_array_equal(got.tokens, want.tokens, err_msg=f"{name}: sampled tokens")
    np.testing.assert_array_equal(got.response_mask, want.response_mask)
    np.testing.assert_array_equal(got.routing, want.routing, err_msg=f"{name}: expert choices")
    logprobs = _record(name, "sampled log-probs", got.policy_logprobs, want.policy_logprobs)
    assert logprobs <= RTOL

    for algo in ALGORITHMS:
        got = _update(
            algo, ref["params"], ref["batches"][algo], mesh=mesh, micro_batches=1,
            microbatches=microbatches,
        )  # fmt: skip
        _compare_update(f"{name} / {algo}", got, ref["updates"][algo])


def _pipeline_microbatches(count: int) -> str:
    return f"{count} pipeline microbatch{'' if count == 1 else 'es'}"


@pytest.mark.parametrize("microbatches", [1, 4])
def test_pipeline_microbatches_give_the_same_update(microbatches, reference, devices):
    """The demo layout with 1 and 4 pipeline microbatches (2 is in the layout test)."""
    layout, _ = LAYOUTS["tp2_pp2_ep2_demo"]
    mesh = layout.make_mesh(devices)
    got = _update(
        "grpo", reference["params"], reference["batches"]["grpo"], mesh=mesh, micro_batches=1,
        microbatches=microbatches,
    )  # fmt: skip
    _compare_update(f"demo, {_pipeline_microbatches(microbatches)} / grpo", got,
                    reference["updates"]["grpo"])  # fmt: skip


@pytest.mark.parametrize("micro_batches,microbatches", [(2, 2), (4, 1)])
def test_gradient_accumulation_splits_give_the_same_update(
    micro_batches, microbatches, reference, devices
):
    """The trainer's gradient-accumulation micro-batches (on the demo layout, pipelined).

    The policy loss is split-invariant because every micro-batch divides by the whole
    minibatch's token count. The MoE router losses are not: each micro-batch's forward sees
    only its own tokens, and the load-balancing loss ``E * sum_e f_e P_e`` of a union of
    token sets is not a weighted sum of the parts' losses. So this test turns the router
    losses off (``moe_*_coef = 0``); `test_router_losses_under_gradient_accumulation` measures
    what they change. (Pipeline microbatches, by contrast, combine the router statistics
    exactly: see `test_pipeline_microbatches_give_the_same_update`.)
    """
    batch = reference["batches"]["grpo"]
    want = _plain_grpo_reference()
    layout, _ = LAYOUTS["tp2_pp2_ep2_demo"]
    got = _update(
        "grpo", reference["params"], batch, mesh=layout.make_mesh(devices),
        micro_batches=micro_batches, microbatches=microbatches, moe=False,
    )  # fmt: skip
    case = f"demo, {micro_batches} accumulation x {_pipeline_microbatches(microbatches)} / grpo"
    # The router-loss metrics are reported per forward (as above), whatever their weight.
    skip = ("actor/moe_aux_loss", "actor/moe_z_loss")
    _compare_update(case + " (no router losses)", got, want, skip_metrics=skip)


@functools.cache
def _plain_grpo_reference():
    ref = _reference()
    return _update(
        "grpo", ref["params"], ref["batches"]["grpo"], mesh=None, micro_batches=1,
        microbatches=1, moe=False,
    )  # fmt: skip


def test_router_losses_under_gradient_accumulation(reference):
    """With router losses on, 2 accumulation micro-batches change only the router terms.

    Measured and recorded, not required to vanish: the router losses are per-forward
    statistics (see above). The policy-gradient and KL terms, aggregated over the global
    token count, still agree to 1e-5; the router-loss metric does not.
    """
    got = _update(
        "grpo", reference["params"], reference["batches"]["grpo"], mesh=None, micro_batches=2,
        microbatches=1,
    )  # fmt: skip
    want = reference["updates"]["grpo"]
    case = "1 device, 2 accumulation micro-batches, router losses on / grpo"
    for name in ("loss", "gradients", "params"):
        index = {"loss": 0, "gradients": 1, "params": 2}[name]
        got_x = got[0]["train/loss"] if name == "loss" else got[index]
        want_x = want[0]["train/loss"] if name == "loss" else want[index]
        _record(case, name, got_x, want_x)
    for name in ("actor/pg_loss", "actor/kl_loss", "actor/entropy"):
        assert max_rel(got[0][name], want[0][name]) <= RTOL, name
    router = _record(case, "metrics", got[0]["actor/moe_aux_loss"], want[0]["actor/moe_aux_loss"])
    assert router > 1e-3  # a real difference, which the test above removes


def test_zz_report_measured_differences():
    """Prints the table of measured differences (run last: the module's final test)."""
    if not _MEASURED:
        pytest.skip("no layout test ran")
    quantities = ["sampled log-probs", "loss", "metrics", "gradients", "params"]
    cases = list(dict.fromkeys(case for case, _ in _MEASURED))
    lines = ["", "max relative difference to the single-device run (float32)", ""]
    lines.append("| case | " + " | ".join(quantities) + " |")
    lines.append("|---" * (len(quantities) + 1) + "|")
    for case in cases:
        cells = [
            f"{_MEASURED[(case, q)]:.1e}" if (case, q) in _MEASURED else "" for q in quantities
        ]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
