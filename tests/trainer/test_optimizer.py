"""The optimizer chain and learning-rate schedules built from the ``optim`` config section."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax

from novarl_jax.trainer.state import make_optimizer, make_schedule


def _optim(**kw):
    base = dict(learning_rate=1.0, schedule="constant", warmup_steps=0, decay_steps=0,
                end_learning_rate=0.0, weight_decay=0.0, max_grad_norm=0.0,
                b1=0.9, b2=0.999, eps=1e-8)  # fmt: skip
    return types.SimpleNamespace(**{**base, **kw})


def test_warmup_reaches_the_learning_rate_after_warmup_steps():
    sched = make_schedule(_optim(warmup_steps=4))
    got = [float(sched(i)) for i in range(6)]
    np.testing.assert_allclose(got, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0], rtol=1e-6)


def test_cosine_decays_to_end_learning_rate_over_decay_steps():
    sched = make_schedule(_optim(learning_rate=2.0, schedule="cosine", decay_steps=10,
                                 end_learning_rate=0.5), default_decay_steps=100)  # fmt: skip
    np.testing.assert_allclose(float(sched(0)), 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(sched(5)), 0.5 + 1.5 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(50)), 0.5, rtol=1e-6)


def test_linear_decay_uses_the_configured_decay_steps():
    sched = make_schedule(_optim(schedule="linear", decay_steps=4), default_decay_steps=100)
    got = [float(sched(i)) for i in (0, 2, 4, 8)]
    np.testing.assert_allclose(got, [1.0, 0.5, 0.0, 0.0], atol=1e-7)
    # decay_steps = 0: the run's number of updates.
    sched = make_schedule(_optim(schedule="linear"), default_decay_steps=10)
    np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)


def test_with_warmup_the_default_decay_ends_where_the_run_does():
    """decay_steps = 0 with a warmup: the decay takes the updates left after it, for both
    decaying schedules, and an explicit decay_steps counts from the warmup's end."""
    for schedule in ("linear", "cosine"):
        sched = make_schedule(_optim(schedule=schedule, warmup_steps=4, end_learning_rate=0.1),
                              default_decay_steps=10)  # fmt: skip
        np.testing.assert_allclose(float(sched(4)), 1.0, rtol=1e-6)
        np.testing.assert_allclose(float(sched(7)), 0.55, rtol=1e-6)  # halfway, either shape
        np.testing.assert_allclose(float(sched(10)), 0.1, rtol=1e-6)
    sched = make_schedule(_optim(schedule="linear", warmup_steps=4, decay_steps=2),
                          default_decay_steps=10)  # fmt: skip
    np.testing.assert_allclose([float(sched(i)) for i in (5, 6)], [0.5, 0.0], atol=1e-7)
    # A warmup as long as the run (or longer) leaves one update to decay over, not none.
    for schedule in ("linear", "cosine"):
        for warmup in (10, 12):
            optim = _optim(schedule=schedule, warmup_steps=warmup, end_learning_rate=0.1)
            sched = make_schedule(optim, default_decay_steps=10)
            got = [float(sched(i)) for i in (warmup, warmup + 1, warmup + 5)]
            np.testing.assert_allclose(got, [1.0, 0.1, 0.1], rtol=1e-6)


def test_weight_decay_skips_vectors():
    opt = make_optimizer(_optim(learning_rate=0.1, weight_decay=0.5))
    params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(new["w"]), 1.0 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["scale"]), 1.0)


def test_the_optimizer_clips_gradients_by_max_grad_norm():
    # With eps = learning rate = 1000, AdamW's first update of a gradient g is
    # -1000 * g / (|g| + 1000): close to -g, so the clipped gradient shows through.
    opt = make_optimizer(_optim(learning_rate=1e3, eps=1e3, max_grad_norm=1.0))
    params = {"policy": {"w": jnp.zeros(2)}}
    grads = {"policy": {"w": jnp.array([30.0, 40.0])}}  # norm 50, clipped to [0.6, 0.8]
    updates, _ = opt.update(grads, opt.init(params), params)
    g = np.array([0.6, 0.8])
    np.testing.assert_allclose(np.asarray(updates["policy"]["w"]), -1e3 * g / (g + 1e3), rtol=1e-5)
    # max_grad_norm = 0: no clipping.
    opt = make_optimizer(_optim(learning_rate=1e3, eps=1e3))
    updates, _ = opt.update(grads, opt.init(params), params)
    g = np.array([30.0, 40.0])
    np.testing.assert_allclose(np.asarray(updates["policy"]["w"]), -1e3 * g / (g + 1e3), rtol=1e-5)


def test_each_model_is_clipped_by_its_own_norm_like_verls_actor_and_critic():
    """A separate critic's value-loss gradient, often far larger, must not shrink the
    policy's update: each model's gradients are clipped by their own global norm."""
    from novarl_jax.trainer.state import clip_each_model, model_grad_norms

    grads = {
        "policy": {"w": jnp.array([0.3, 0.4])},  # norm 0.5: under the limit, unchanged
        "critic": {"w": jnp.array([30.0, 40.0]), "b": jnp.zeros(1)},  # norm 50: to 1
    }
    clip = clip_each_model(1.0)
    clipped, _ = clip.update(grads, clip.init(grads))
    np.testing.assert_allclose(np.asarray(clipped["policy"]["w"]), [0.3, 0.4], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(clipped["critic"]["w"]), [0.6, 0.8], rtol=1e-6)
    norms = model_grad_norms(grads)
    np.testing.assert_allclose([float(norms["policy"]), float(norms["critic"])], [0.5, 50.0])
    # One model (no separate critic, or any other tree): optax's global clip, bit for bit.
    for tree in ({"policy": grads["critic"]}, grads["critic"]):
        want, _ = optax.clip_by_global_norm(1.0).update(tree, optax.EmptyState())
        got, _ = clip.update(tree, clip.init(tree))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The clip's state is optax's clip's (none): checkpoints written before stay readable.
    params = jax.tree.map(jnp.zeros_like, grads)
    state = make_optimizer(_optim(max_grad_norm=1.0)).init(params)
    assert state[0] == optax.clip_by_global_norm(1.0).init(params) == optax.EmptyState()


def test_adamw_follows_optax_over_several_updates_with_both_decay_rates():
    # The first update does not depend on b1 or b2 (bias correction): take three.
    settings = dict(learning_rate=0.1, b1=0.9, b2=0.5, eps=1e-8, weight_decay=0.25)
    ours = make_optimizer(_optim(**settings))
    # Weights of rank >= 2 decay, vectors do not.
    want = optax.adamw(**settings, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    params = {"w": jnp.asarray([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.asarray([1.0, -2.0])}
    p_ours, p_want = params, params
    s_ours, s_want = ours.init(params), want.init(params)
    rng = np.random.default_rng(0)
    for _ in range(3):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        u, s_ours = ours.update(g, s_ours, p_ours)
        p_ours = optax.apply_updates(p_ours, u)
        u, s_want = want.update(g, s_want, p_want)
        p_want = optax.apply_updates(p_want, u)
    for name in params:
        np.testing.assert_allclose(p_ours[name], p_want[name], rtol=1e-6)


def test_state_shardings_follow_the_parameters_for_other_optimizers(devices):
    # Moments shaped like their parameter take its sharding; Adafactor's factored rows and
    # columns, counts and the parts optax.masked leaves out are replicated.
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from novarl_jax.trainer.state import init_train_state, train_state_shardings

    mesh = Mesh(np.array(devices[:2]), ("tp",))
    replicated = NamedSharding(mesh, P())
    params = {
        "w": jax.device_put(jnp.zeros((8, 16)), NamedSharding(mesh, P(None, "tp"))),
        "b": jax.device_put(jnp.zeros((16,)), replicated),
    }
    key = jax.random.key(0)
    matrices = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)  # noqa: E731
    for optimizer in (
        optax.chain(optax.clip_by_global_norm(1.0), optax.masked(optax.adam(0.1), matrices)),
        optax.adafactor(0.1),
        optax.MultiSteps(optax.adamw(0.1), 2),
    ):
        shardings = train_state_shardings(params, optimizer, key, replicated)
        init = lambda p, o=optimizer: init_train_state(p, o, key)  # noqa: E731
        state = jax.jit(init, out_shardings=shardings)(params)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
            split = leaf.shape == (8, 16)  # w's moments (Adafactor factors none this small)
            assert leaf.sharding.is_fully_replicated != split, (path, leaf.sharding)
    # An optimizer optax cannot match to the parameters is left to XLA, not an error.
    per_entry = optax.GradientTransformation(
        lambda p: {k: optax.scale_by_adam().init(v) for k, v in p.items()},
        lambda updates, state, params=None: (updates, state),
    )
    assert train_state_shardings(params, per_entry, key, replicated) is None


def test_weight_decay_skips_each_layers_norm_scales_in_a_stacked_model():
    """Layers are stacked on a leading axis: a layer's norm scale is [L, D], still a vector."""
    from novarl_jax.models import ModelConfig, init_params

    config = ModelConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, tie_word_embeddings=False, value_head=True, qkv_bias=True,
    )  # fmt: skip
    params = {"policy": init_params(config, jax.random.key(0))}
    # Every leaf away from zero (biases start there), so a decayed one would move.
    params = jax.tree.map(lambda x: jnp.where(x == 0, 1.0, x).astype(x.dtype), params)
    opt = make_optimizer(_optim(learning_rate=0.1, weight_decay=0.5))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    moved = jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(moved)}
    still = sorted(k for k, v in flat.items() if not v)
    assert still == [
        "['policy']['final_norm']['scale']",
        "['policy']['layers']['attn']['k_bias']",
        "['policy']['layers']['attn']['q_bias']",
        "['policy']['layers']['attn']['v_bias']",
        "['policy']['layers']['input_norm']['scale']",
        "['policy']['layers']['post_attn_norm']['scale']",
        "['policy']['value_head']['bias']",
    ]
    assert len(flat) > len(still) + 8  # the matrices (embeddings, projections, experts) do
