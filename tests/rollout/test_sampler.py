"""KV-cache sampler: masks vs NumPy, log-probs vs the training forward, naive-sampler equality.

Every model configuration compiles once (module-scoped fixtures); the tiny models keep the
whole file within a few tens of seconds on two CPU cores.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.models import ModelConfig, forward, init_params, shard_params
from novarl_jax.rollout import sampler as S

VOCAB = 32
EOS = 2
PAD = 0
MAX_NEW = 6


# ------------------------------------------------------------------------------------------
# NumPy float64 references (plain loops).


def np_temperature(logits, t):
    return np.asarray(logits, np.float64) / t


def np_top_k_mask(logits, k):
    logits = np.asarray(logits, np.float64)
    out = np.ones(logits.shape, bool)
    if k <= 0 or k >= logits.shape[-1]:
        return out
    for idx in np.ndindex(logits.shape[:-1]):
        row = logits[idx]
        kth = sorted(row.tolist(), reverse=True)[k - 1]
        out[idx] = [x >= kth for x in row]
    return out


def np_top_p_mask(logits, p):
    logits = np.asarray(logits, np.float64)
    out = np.ones(logits.shape, bool)
    if p >= 1:
        return out
    for idx in np.ndindex(logits.shape[:-1]):
        row = logits[idx]
        finite = np.isfinite(row)
        probs = np.where(finite, np.exp(row - row[finite].max()), 0.0)
        probs /= probs.sum()
        order = sorted(range(len(row)), key=lambda i: -probs[i])
        mass, smallest = 0.0, None
        for i in order:
            if mass >= p:
                break
            smallest = probs[i]
            mass += probs[i]
        out[idx] = [q >= smallest for q in probs]
    return out


def np_sampling_logprobs(logits, t, k, p):
    x = np_temperature(logits, t)
    x = np.where(np_top_k_mask(x, k), x, -np.inf)
    x = np.where(np_top_p_mask(x, p), x, -np.inf)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_left_pad(tokens, mask, pad):
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    out_t, out_m = np.full_like(tokens, pad), np.zeros_like(mask)
    for b in range(tokens.shape[0]):
        real = [int(x) for x, m in zip(tokens[b], mask[b], strict=True) if m]
        if real:
            out_t[b, -len(real) :] = real
            out_m[b, -len(real) :] = 1
    return out_t, out_m


logits_rows = st.lists(
    st.lists(
        st.floats(-4, 4, allow_nan=False, allow_subnormal=False, width=32), min_size=6, max_size=6
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=25, deadline=None)
@given(logits_rows, st.integers(0, 7), st.floats(0.3, 2.0))
def test_top_k_and_temperature_match_numpy(rows, k, t):
    x = np.asarray(rows, np.float32)
    np.testing.assert_array_equal(S.top_k_mask(x, k), np_top_k_mask(x, k))
    np.testing.assert_array_equal(
        jax.jit(S.top_k_mask, static_argnums=1)(x, k), np_top_k_mask(x, k)
    )
    np.testing.assert_allclose(
        S.apply_temperature(x, t), np_temperature(x, t), rtol=1e-6, atol=1e-30
    )


@settings(max_examples=25, deadline=None)
@given(logits_rows, st.floats(0.05, 1.0))
def test_top_p_matches_numpy(rows, p):
    x = np.asarray(rows, np.float32)
    # Skip inputs where float32 rounding could move a token across the nucleus boundary.
    probs = np.exp(x - x.max(-1, keepdims=True)).astype(np.float64)
    probs /= probs.sum(-1, keepdims=True)
    sorted_probs = -np.sort(-probs, -1)
    before = np.cumsum(sorted_probs, -1) - sorted_probs
    assume(np.all(np.abs(before - p) > 1e-4))
    # ... and near-ties: logits a few ulps apart are one probability in float32 (ties are all
    # kept) but two in float64.
    gaps = np.diff(np.sort(x, -1), axis=-1)
    assume(np.all((gaps == 0) | (gaps > 1e-5)))
    expected = np_top_p_mask(x, p)
    np.testing.assert_array_equal(S.top_p_mask(x, p), expected)
    np.testing.assert_array_equal(jax.jit(S.top_p_mask, static_argnums=1)(x, p), expected)
    assert np.all(np.asarray(S.top_p_mask(x, p)).sum(-1) >= 1)


def test_masks_hand_made_ties_and_combination():
    x = np.float32([[3.0, 1.0, 3.0, 0.0, 2.0]])
    np.testing.assert_array_equal(S.top_k_mask(x, 1), [[True, False, True, False, False]])
    np.testing.assert_array_equal(S.top_k_mask(x, 3), [[True, False, True, False, True]])
    # probs of [log .5, log .3, log .2]: p=0.45 keeps one, p=0.7 keeps two, p=0.85 keeps three.
    y = np.log(np.float32([[0.5, 0.3, 0.2]]))
    for p, kept in [(0.45, 1), (0.7, 2), (0.85, 3)]:
        assert int(S.top_p_mask(y, p).sum()) == kept
    got = S.sampling_logits(x, temperature=0.5, top_k=3, top_p=0.9)
    np.testing.assert_allclose(
        jax.nn.log_softmax(got), np_sampling_logprobs(x, 0.5, 3, 0.9), rtol=1e-5, atol=1e-6
    )
    # top_k = V - 1 drops exactly the least likely token; V and more keep every one.
    y = np.float32([[0.3, -2.0, 1.0, 0.5, 0.0]])
    kept = np.isfinite(np.asarray(S.sampling_logits(y, top_k=4)))
    np.testing.assert_array_equal(kept, [[True, False, True, True, True]])
    assert np.isfinite(np.asarray(S.sampling_logits(y, top_k=5))).all()
    # Out of range, they were accepted as "off" (sample() refuses them).
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\] \(1 = off\), got 2.0"):
        S.sampling_logits(x, top_p=2.0)
    with pytest.raises(ValueError, match=r"top_k must be an integer >= 0 \(0 = off\), got -3"):
        S.sampling_logits(x, top_k=-3)


def test_masks_under_the_8_device_mesh(devices):
    mesh = ParallelLayout(dp=2, tp=2, ep=2).make_mesh()
    x = np.asarray(jax.random.normal(jax.random.key(0), (8, 16)), np.float32)
    sharded = jax.device_put(
        x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("dp", "ep")))
    )
    fn = jax.jit(functools.partial(S.sampling_logits, temperature=0.7, top_k=5, top_p=0.8))
    np.testing.assert_allclose(
        jax.nn.log_softmax(fn(sharded)), np_sampling_logprobs(x, 0.7, 5, 0.8), rtol=1e-5, atol=1e-5
    )


@settings(max_examples=20, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=5, max_size=5), min_size=1, max_size=4))
def test_left_pad_matches_numpy(mask_rows):
    mask = np.asarray(mask_rows, np.int32)
    tokens = np.arange(mask.size, dtype=np.int32).reshape(mask.shape) + 3
    got_t, got_m = S.left_pad(tokens, mask, PAD)
    ref_t, ref_m = np_left_pad(tokens, mask, PAD)
    np.testing.assert_array_equal(got_t, ref_t)
    np.testing.assert_array_equal(got_m, ref_m)


# ------------------------------------------------------------------------------------------
# Models and references.


def _config(moe: bool) -> ModelConfig:
    extra = dict(num_local_experts=4, num_experts_per_tok=2, capacity_factor=None) if moe else {}
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **extra,
    )


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request):
    config = _config(request.param == "moe")
    return config, init_params(config, jax.random.key(0))


def _prompts():
    """Four prompts, right-padded (the sampler converts them to left padding)."""
    tokens = np.array(
        [[1, 5, 6, 7, 8], [1, 9, 0, 0, 0], [1, 10, 11, 12, 0], [1, 13, 14, 0, 0]], np.int32
    )
    return tokens, (tokens > 0).astype(np.int32)


SETTINGS = dict(temperature=0.8, top_k=12, top_p=0.95, num_samples=2)


@functools.partial(jax.jit, static_argnames=("config", "train"))
def _train_logits(params, tokens, mask, *, config, train=True):
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    return forward(params, tokens, config, positions=positions, attention_mask=mask, train=train)[0]


def training_logprobs(params, config, out, mesh=None, temperature=1.0):
    """The training forward's log-probs of the sampled response tokens (no cache), at
    ``temperature``; and the untempered logits."""
    mask = jnp.concatenate([out.prompt_mask, out.response_mask], axis=1)
    if mesh is None:
        logits = _train_logits(params, out.tokens, mask, config=config)
    else:
        logits = jax.jit(
            lambda p, t, m: forward(
                p,
                t,
                config,
                positions=jnp.maximum(jnp.cumsum(m, 1) - 1, 0),
                attention_mask=m,
                mesh=mesh,
            )[0]
        )(params, out.tokens, mask)
    p = out.prompt_tokens.shape[1]
    logits = logits[:, p - 1 : -1]
    logp = jax.nn.log_softmax(logits / temperature, -1)
    logp = jnp.take_along_axis(logp, out.response_tokens[..., None], -1)
    return np.asarray(logp[..., 0] * out.response_mask), np.asarray(logits)


def naive_sample(
    params,
    config,
    tokens,
    mask,
    key,
    *,
    max_new_tokens,
    stop_token_ids,
    pad_id,
    num_samples=1,
    **kw,
):
    """Recompute-everything reference: a full forward over the whole sequence at each step."""
    s = S.make_settings(max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
                        pad_id=pad_id, num_samples=num_samples, **kw)  # fmt: skip
    static, dyn = s.static(), s.dynamic(config.vocab_size)
    tokens, mask = np_left_pad(tokens, mask, pad_id)
    tokens, mask = np.repeat(tokens, num_samples, 0), np.repeat(mask, num_samples, 0)
    rows, p = tokens.shape
    seq = np.concatenate([tokens, np.full((rows, max_new_tokens), pad_id, np.int32)], 1)
    seq_mask = np.concatenate([mask, np.zeros((rows, max_new_tokens), np.int32)], 1)
    done = np.zeros(rows, bool)
    out_logp = np.zeros((rows, max_new_tokens), np.float32)
    for t in range(max_new_tokens):
        # One fixed shape (future slots masked), so the reference compiles once.
        logits = _train_logits(params, seq, seq_mask, config=config)[:, p + t - 1]
        tok, logp, _ = S._choose(logits, jax.random.fold_in(key, t), static, dyn)
        tok, logp = np.asarray(tok), np.asarray(logp)
        seq[:, p + t] = np.where(done, pad_id, tok)
        seq_mask[:, p + t] = ~done
        out_logp[:, t] = np.where(done, 0.0, logp)
        done |= np.isin(tok, stop_token_ids) & ~done
        if done.all():
            break
    return seq[:, p:], seq_mask[:, p:], out_logp


@pytest.fixture(scope="module")
def sampled(model):
    config, params = model
    tokens, mask = _prompts()
    key = jax.random.key(7)
    out = S.sample(params, config, tokens, mask, key, max_new_tokens=MAX_NEW,
                   stop_token_ids=(EOS,), pad_id=PAD, return_routing=config.is_moe,
                   **SETTINGS)  # fmt: skip
    return out, key


# ------------------------------------------------------------------------------------------
# Sampler properties (dense and MoE).


def test_sampler_logprobs_equal_training_forward(model, sampled):
    config, params = model
    out, _ = sampled
    # The policy at the sampling temperature: what the trainer scores the rollout with.
    ref, logits = training_logprobs(params, config, out, temperature=SETTINGS["temperature"])
    np.testing.assert_allclose(out.policy_logprobs, ref, rtol=1e-5, atol=1e-6)
    # The sampled distribution's log-probs against the NumPy reference of the same logits.
    sampled_ref = np_sampling_logprobs(logits, SETTINGS["temperature"], SETTINGS["top_k"],
                                       SETTINGS["top_p"])  # fmt: skip
    picked = np.take_along_axis(sampled_ref, np.asarray(out.response_tokens)[..., None], -1)[..., 0]
    m = np.asarray(out.response_mask) == 1
    assert np.all(np.isfinite(picked[m])), "a sampled token lies outside the top-k/top-p set"
    np.testing.assert_allclose(np.asarray(out.logprobs)[m], picked[m], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out.logprobs)[~m] == 0) and np.all(
        np.asarray(out.policy_logprobs)[~m] == 0
    )


def test_kv_cache_sampling_equals_naive_sampler(model, sampled):
    config, params = model
    out, key = sampled
    tokens, mask = _prompts()
    ref_tokens, ref_mask, ref_logp = naive_sample(
        params,
        config,
        tokens,
        mask,
        key,
        max_new_tokens=MAX_NEW,
        stop_token_ids=(EOS,),
        pad_id=PAD,
        **SETTINGS,
    )
    np.testing.assert_array_equal(out.response_tokens, ref_tokens)
    np.testing.assert_array_equal(out.response_mask, ref_mask)
    np.testing.assert_allclose(out.logprobs, ref_logp, rtol=1e-5, atol=1e-6)


def test_kv_cache_sampling_equals_naive_sampler_when_rows_stop_on_the_way(model, sampled):
    # Stop on tokens this key draws at the second step of some rows, so that rows stop at
    # different steps (the fixture's EOS is rarely drawn).
    config, params = model
    out, key = sampled
    drawn = np.asarray(out.response_tokens)
    stops = tuple(sorted({int(t) for t in drawn[::3, 1]} - {EOS, PAD}))
    tokens, mask = _prompts()
    kw = dict(max_new_tokens=MAX_NEW, stop_token_ids=stops, pad_id=PAD, **SETTINGS)
    stopped = S.sample(params, config, tokens, mask, key, **kw)
    ref_tokens, ref_mask, ref_logp = naive_sample(params, config, tokens, mask, key, **kw)
    np.testing.assert_array_equal(stopped.response_tokens, ref_tokens)
    np.testing.assert_array_equal(stopped.response_mask, ref_mask)
    np.testing.assert_allclose(stopped.logprobs, ref_logp, rtol=1e-5, atol=1e-6)
    lengths = np.asarray(stopped.lengths)
    assert lengths.min() < MAX_NEW and (lengths == 2).any()  # rows stopped, on their stop
    last = np.asarray(stopped.response_tokens)[np.arange(len(lengths)), lengths - 1]
    assert np.isin(last[lengths < MAX_NEW], stops).all()  # the stop token is in the mask


def test_output_layout(model, sampled):
    out, _ = sampled
    tokens, mask = _prompts()
    rows = tokens.shape[0] * SETTINGS["num_samples"]
    assert out.tokens.shape == (rows, tokens.shape[1] + MAX_NEW)
    assert (
        out.response_tokens.shape
        == out.response_mask.shape
        == out.logprobs.shape
        == (rows, MAX_NEW)
    )
    assert out.response_tokens.dtype == jnp.int32 and out.logprobs.dtype == jnp.float32
    np.testing.assert_array_equal(out.lengths, np.asarray(out.response_mask).sum(1))
    # Prompt-major rows, left-padded prompts, tokens = prompt ++ response.
    left_t, left_m = np_left_pad(tokens, mask, PAD)
    np.testing.assert_array_equal(out.prompt_tokens, np.repeat(left_t, 2, 0))
    np.testing.assert_array_equal(out.prompt_mask, np.repeat(left_m, 2, 0))
    np.testing.assert_array_equal(out.tokens[:, tokens.shape[1] :], out.response_tokens)
    # Samples of one prompt share the prefill but not their randomness.
    resp = np.asarray(out.response_tokens)
    assert any((resp[2 * b] != resp[2 * b + 1]).any() for b in range(tokens.shape[0]))
    # Response mask is a prefix of ones; after a stop, pad and 0.
    m = np.asarray(out.response_mask)
    for r in range(rows):
        n = int(m[r].sum())
        assert m[r, :n].all() and not m[r, n:].any()
        assert (resp[r, n:] == PAD).all()
        if n < MAX_NEW:
            assert resp[r, n - 1] == EOS


def test_determinism_and_key_dependence(model, sampled):
    config, params = model
    out, key = sampled
    tokens, mask = _prompts()
    again = S.sample(params, config, tokens, mask, key, max_new_tokens=MAX_NEW,
                     stop_token_ids=(EOS,), pad_id=PAD, return_routing=config.is_moe,
                     **SETTINGS)  # fmt: skip
    for a, b in zip(out, again, strict=True):
        if a is not None:
            np.testing.assert_array_equal(a, b)
    other = S.sample(params, config, tokens, mask, jax.random.key(8), max_new_tokens=MAX_NEW,
                     stop_token_ids=(EOS,), pad_id=PAD, return_routing=config.is_moe,
                     **SETTINGS)  # fmt: skip
    assert (np.asarray(other.response_tokens) != np.asarray(out.response_tokens)).any()


def routing_matches_training_forward(params, config, out, mesh=None):
    """The sampler's expert choices equal the training forward's at every fed real token."""
    mask = jnp.concatenate([out.prompt_mask, out.response_mask], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    aux = jax.jit(
        lambda p, t, m, pos: forward(
            p, t, config, positions=pos, attention_mask=m, mesh=mesh, return_routing=True
        )[2]  # fmt: skip
    )(params, out.tokens, mask, positions)
    want, got = np.asarray(aux["routing"]), np.asarray(out.routing)
    n_layers = config.num_hidden_layers
    assert got.shape == want.shape == (n_layers,) + out.tokens.shape + (config.num_experts_per_tok,)
    # Every real token except the last generated one (never fed to the model) was routed.
    fed = np.asarray(mask).astype(bool).copy()
    p = out.prompt_tokens.shape[1]
    for r, n in enumerate(np.asarray(out.lengths)):
        fed[r, p + n - 1] = False
    np.testing.assert_array_equal(np.sort(got, -1)[:, fed], np.sort(want, -1)[:, fed])
    # The tokens never fed to the sampling model (the last generated one, the padding after a
    # stop) hold -1, "no choice": a replay routes them as usual, so the MoE statistics of a
    # replayed forward equal the model's own.
    unset = (got == -1).all(-1)  # [L, B, T]
    assert not unset[:, fed].any()
    generated = np.zeros_like(fed)
    generated[:, p:] = True
    assert unset[:, generated & ~np.asarray(mask, bool)].all()  # the padding after a stop
    assert unset.any()  # the last token of a row that ran to max_new_tokens, at least
    same = (np.sort(got, -1) == np.sort(want, -1)).all(-1)
    assert np.all(unset | same | ~np.asarray(mask, bool)[None])
    replay = jax.jit(
        lambda p_, t, m, pos, rt: forward(
            p_, t, config, positions=pos, attention_mask=m, routing=rt, mesh=mesh
        )  # fmt: skip
    )(params, out.tokens, mask, positions, out.routing)
    for key in ("expert_load", "moe_aux_loss", "dropped_fraction"):
        np.testing.assert_allclose(replay[2][key], aux[key], rtol=1e-6, atol=1e-7, err_msg=key)
    # Replaying the choices reproduces the sampler's log-probs.
    replay = replay[0]
    tempered = replay[:, p - 1 : -1] / SETTINGS["temperature"]
    logp = (
        jnp.take_along_axis(jax.nn.log_softmax(tempered, -1), out.response_tokens[..., None], -1)[
            ..., 0
        ]
        * out.response_mask
    )
    np.testing.assert_allclose(out.policy_logprobs, logp, rtol=1e-5, atol=1e-6)


def test_routing_for_router_replay(model, sampled):
    config, params = model
    out, _ = sampled
    if not config.is_moe:
        assert out.routing is None
        return
    routing_matches_training_forward(params, config, out)


def test_mixed_precision_sampling_matches_training_forward():
    """compute_dtype='bfloat16' (float32 weights): the sampler computes in bfloat16 like the
    training forward; its log-probs stay float32 and agree to bfloat16 rounding (the decode
    steps and the training forward sum in different orders)."""
    config = _config(True).replace(compute_dtype="bfloat16")
    params = init_params(config, jax.random.key(0))
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    tokens, mask = _prompts()
    run = dict(max_new_tokens=MAX_NEW, stop_token_ids=(EOS,), pad_id=PAD, **SETTINGS)
    out = S.sample(params, config, tokens, mask, jax.random.key(7), **run)
    assert out.policy_logprobs.dtype == jnp.float32 and out.logprobs.dtype == jnp.float32
    ref, _ = training_logprobs(params, config, out, temperature=SETTINGS["temperature"])
    np.testing.assert_allclose(out.policy_logprobs, ref, atol=1e-2)
    # ... and not float32's numbers: the sampler did compute in bfloat16.
    f32, _ = training_logprobs(
        params, config.replace(compute_dtype=None), out, temperature=SETTINGS["temperature"]
    )
    assert np.max(np.abs(np.asarray(out.policy_logprobs) - f32)) > 1e-5


# ------------------------------------------------------------------------------------------
# Under an 8-device layout (dp 2, tp 2, ep 2), MoE.


@pytest.fixture(scope="module")
def moe_on_mesh(devices):
    config = _config(True)
    params = init_params(config, jax.random.key(0))
    mesh = ParallelLayout(dp=2, tp=2, ep=2).make_mesh()
    return config, params, shard_params(params, config, mesh), mesh


def test_sharded_sampling_equals_single_device_and_training(moe_on_mesh):
    config, params, sharded, mesh = moe_on_mesh
    tokens, mask = _prompts()
    kw = dict(max_new_tokens=MAX_NEW, stop_token_ids=(EOS,), pad_id=PAD, return_routing=True,
              **SETTINGS)  # fmt: skip
    out = S.sample(sharded, config, tokens, mask, jax.random.key(7), mesh=mesh, **kw)
    assert len(out.response_tokens.sharding.device_set) == 8
    single = S.sample(params, config, tokens, mask, jax.random.key(7), **kw)
    np.testing.assert_array_equal(out.response_tokens, single.response_tokens)
    np.testing.assert_array_equal(out.response_mask, single.response_mask)
    np.testing.assert_allclose(out.policy_logprobs, single.policy_logprobs, rtol=1e-5, atol=1e-6)
    ref, _ = training_logprobs(sharded, config, out, mesh=mesh, temperature=SETTINGS["temperature"])
    np.testing.assert_allclose(out.policy_logprobs, ref, rtol=1e-5, atol=1e-6)
    routing_matches_training_forward(sharded, config, out, mesh=mesh)


# ------------------------------------------------------------------------------------------
# Greedy decoding and stop tokens (dense only: the logic is model-independent).


@pytest.fixture(scope="module")
def dense():
    config = _config(False)
    return config, init_params(config, jax.random.key(1))


def test_greedy_is_argmax_and_key_independent(dense):
    config, params = dense
    tokens, mask = _prompts()
    kw = dict(max_new_tokens=MAX_NEW, temperature=0.0, stop_token_ids=(), pad_id=PAD)
    a = S.sample(params, config, tokens, mask, jax.random.key(0), **kw)
    b = S.sample(params, config, tokens, mask, jax.random.key(1), **kw)
    np.testing.assert_array_equal(a.response_tokens, b.response_tokens)
    ref_tokens, _, _ = naive_sample(params, config, tokens, mask, jax.random.key(0), **kw)
    np.testing.assert_array_equal(a.response_tokens, ref_tokens)
    assert np.all(np.asarray(a.logprobs) == 0)  # a point mass
    ref, _ = training_logprobs(params, config, a)
    np.testing.assert_allclose(a.policy_logprobs, ref, rtol=1e-5, atol=1e-6)


def test_stop_tokens_end_rows_and_mask_the_rest(dense):
    config, params = dense
    tokens, mask = _prompts()
    kw = dict(max_new_tokens=MAX_NEW, temperature=0.0, pad_id=PAD)
    free = np.asarray(S.sample(params, config, tokens, mask, jax.random.key(0),
                               stop_token_ids=(), **kw).response_tokens)  # fmt: skip
    stops = (int(free[0, 2]), int(free[1, 0]))
    out = S.sample(params, config, tokens, mask, jax.random.key(0), stop_token_ids=stops, **kw)
    resp, m = np.asarray(out.response_tokens), np.asarray(out.response_mask)
    for r in range(free.shape[0]):
        hits = [t for t in range(MAX_NEW) if free[r, t] in stops]
        n = hits[0] + 1 if hits else MAX_NEW
        assert int(out.lengths[r]) == n
        np.testing.assert_array_equal(resp[r, :n], free[r, :n])
        assert (resp[r, n:] == PAD).all() and m[r, :n].all() and not m[r, n:].any()
    assert int(out.lengths[1]) == 1 and int(out.lengths[0]) <= 3
    # Every row stops at once: the loop exits after the first token.
    every = S.sample(params, config, tokens, mask, jax.random.key(0),
                     stop_token_ids=tuple(range(VOCAB)), **kw)  # fmt: skip
    np.testing.assert_array_equal(every.lengths, [1, 1, 1, 1])


def test_left_and_right_padding_give_the_same_samples(dense):
    config, params = dense
    tokens, mask = _prompts()
    left_t, left_m = np_left_pad(tokens, mask, PAD)
    kw = dict(max_new_tokens=MAX_NEW, stop_token_ids=(EOS,), pad_id=PAD, **SETTINGS)
    a = S.sample(params, config, tokens, mask, jax.random.key(3), **kw)
    b = S.sample(params, config, left_t, left_m, jax.random.key(3), **kw)
    np.testing.assert_array_equal(a.response_tokens, b.response_tokens)
    np.testing.assert_allclose(a.policy_logprobs, b.policy_logprobs, rtol=1e-6)


def test_argument_errors(dense):
    config, params = dense
    tokens, mask = _prompts()
    kw = dict(max_new_tokens=4, pad_id=PAD)
    cases = [
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(temperature=-1.0), r"temperature must be 0 \(greedy\) or a finite float >= 0.0001"),
        (dict(temperature=1e-30), r"temperature must be 0 \(greedy\) or a finite float >= 0.0001"),
        (dict(temperature=1e-45), "temperature must be 0"),
        (dict(temperature=float("nan")), "temperature must be 0"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(num_samples=0), "num_samples must be an integer >= 1"),
        (dict(stop_token_ids=(-1,)), "stop_token_ids entry must be an integer >= 0"),
        (
            dict(stop_token_ids=None),
            r"stop_token_ids must be a sequence of token ids \(\(\) for "
            r"none\), got None",
        ),
        (dict(return_routing=True), "return_routing=True needs an MoE model"),
        (dict(max_new_tokens=60), r"= 65 exceeds max_position_embeddings=64"),
        (dict(stop_token_ids=(2, 40)), r"stop_token_ids \[40\] are outside the vocabulary"),
        (dict(pad_id=VOCAB), rf"pad_id={VOCAB} is outside the vocabulary \[0, {VOCAB}\)"),
    ]
    for extra, match in cases:
        with pytest.raises(ValueError, match=match):
            S.sample(params, config, tokens, mask, jax.random.key(0), **{**kw, **extra})
    with pytest.raises(ValueError, match=r"prompt_tokens must have shape \[B, P\]"):
        S.sample(params, config, tokens[0], mask[0], jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="prompt_mask shape"):
        S.sample(params, config, tokens, mask[:, :3], jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="prompt_tokens must be integers"):
        S.sample(params, config, tokens.astype(np.float32), mask, jax.random.key(0), **kw)
    # A bare int was a TypeError from deep inside jax.random.
    for key, got in ((1, "1"), (np.zeros(2, np.int32), "ndarray of dtype int32")):
        with pytest.raises(ValueError, match=rf"^key must be a jax.random key \(jax.random.key\("
                           rf"seed\), or raw uint32 key data\), got {got}$"):  # fmt: skip
            S.sample(params, config, tokens, mask, key, **kw)
    bad = mask.copy()
    bad[2] = 0
    with pytest.raises(ValueError, match=r"prompt rows \[2\] have no real token"):
        S.sample(params, config, tokens, bad, jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="temperature must be > 0 here"):
        S.apply_temperature(np.zeros(3), 0.0)
    # Real prompt ids outside the vocabulary are named; padding may hold anything.
    for bad_id in (VOCAB, -3):
        wrong = tokens.copy()
        wrong[1, 2:] = 999  # padding: never read
        wrong[2, 3] = bad_id
        with pytest.raises(
            ValueError,
            match=rf"1 real \(prompt_mask != 0\) ids outside the vocabulary \[0, {VOCAB}\); "
            rf"the first is {bad_id} at row 2, column 3",
        ):
            S.sample(params, config, wrong, mask, jax.random.key(0), **kw)


def test_temperature_floor_and_numpy_scalars(dense):
    config, params = dense
    tokens, mask = _prompts()
    kw = dict(max_new_tokens=3, pad_id=PAD)
    # The smallest accepted temperature gives finite log-probs (below it they were NaN/inf).
    out = S.sample(
        params, config, tokens, mask, jax.random.key(0), temperature=S.MIN_TEMPERATURE, **kw
    )
    assert np.isfinite(np.asarray(out.logprobs)).all()
    # NumPy / 0-d JAX scalars are numbers like any other.
    ref = S.sample(
        params, config, tokens, mask, jax.random.key(0), temperature=0.7, top_p=0.9, **kw
    )
    for temperature, top_p in ((np.float32(0.7), np.float64(0.9)), (jnp.float32(0.7), 0.9)):
        got = S.sample(
            params, config, tokens, mask, jax.random.key(0), temperature=temperature,
            top_p=top_p, **kw,
        )  # fmt: skip
        np.testing.assert_array_equal(got.response_tokens, ref.response_tokens)


def test_mask_and_padding_helpers_validate_their_arguments():
    logits = jnp.array([3.0, 1.0, 2.0])
    for k in (1.5, -1, True, "2"):
        with pytest.raises(ValueError, match="top_k_mask k must be an integer >= 0"):
            S.top_k_mask(logits, k)
    assert S.top_k_mask(logits, np.int64(1)).tolist() == [True, False, False]
    for p in (0.0, -1.0, 1.5, float("nan"), None):
        with pytest.raises(ValueError, match=r"top_p_mask p must be a float in \(0, 1\]"):
            S.top_p_mask(logits, p)
    assert S.top_p_mask(logits, 1).tolist() == [True, True, True]
    assert S.top_p_mask(logits, 1e-9).tolist() == [True, False, False]  # the top one is kept
    with pytest.raises(ValueError, match=r"left_pad mask shape \(1, 2\) != tokens shape \(1, 3\)"):
        S.left_pad(jnp.array([[1, 2, 0]]), jnp.array([[1, 1]]), 0)
    with pytest.raises(ValueError, match=r"left_pad tokens must have shape \[B, P\]"):
        S.left_pad(jnp.array([1, 2, 0]), jnp.array([1, 1, 0]), 0)
    with pytest.raises(ValueError, match="left_pad pad_id must be an integer, got 0.5"):
        S.left_pad(jnp.array([[1, 2, 0]]), jnp.array([[1, 1, 0]]), 0.5)


def test_top_p_stops_where_the_mass_reaches_p_exactly():
    # Powers of two: the cumulative masses are exact in float32.
    x = jnp.log(jnp.array([0.5, 0.25, 0.125, 0.125]))
    assert np.asarray(S.top_p_mask(x, 0.5)).tolist() == [True, False, False, False]
    assert np.asarray(S.top_p_mask(x, 0.75)).tolist() == [True, True, False, False]


def test_top_p_applies_to_what_top_k_kept():
    # Probabilities ~(0.35, 0.32, 0.29, 0.05): top-p 0.5 alone keeps tokens 0 and 1; after
    # top-k 2 they renormalise to (0.525, 0.475), so top-p 0.5 then keeps token 0 only.
    x = jnp.array([[2.0, 1.9, 1.8, 0.0]])
    alone = S.sampling_logits(x, temperature=1.0, top_p=0.5)
    assert np.isfinite(np.asarray(alone)).tolist() == [[True, True, False, False]]
    both = S.sampling_logits(x, temperature=1.0, top_k=2, top_p=0.5)
    assert np.isfinite(np.asarray(both)).tolist() == [[True, False, False, False]]


def test_top_k_1_keeps_only_the_argmax():
    logits = S.sampling_logits(jnp.array([[3.0, 1.0, 2.0]]), temperature=1.0, top_k=1)
    np.testing.assert_array_equal(np.asarray(jax.nn.log_softmax(logits)), [[0.0, -np.inf, -np.inf]])
