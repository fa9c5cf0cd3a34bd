"""The discrete head's KV-cache decode (`PixelVLA.generate_tokens`) against jax's own sampler.

The decode draws every step's Gumbel noise before the loop and takes its argmax as a max and
a min (both for speed, bench/serve.py); what it must still be: at step i, with the rng split
once per step (`step_i, rng = split(rng)`), the token `jax.random.categorical(step_i,
action_logits_i / T)` returns, where action_logits_i are the teacher-forced logits of the
tokens decoded so far (`discrete_logits`: the full sequence, no cache).
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np

from pixelvla_jax.models.observation import Observation
from pixelvla_jax.models.pixelvla import PixelVLA, PixelVLAConfig, abstract_variables
from pixelvla_jax.testing.tiny_openvla import fast_random_params

B = 3


def test_sampled_decode_is_jax_categorical_on_the_teacher_forced_logits():
    # The PixelRef default's decode: target point (2 tokens) + 7 action tokens, T = 0.5
    # (1-layer LLM, 2-block towers, 16 text tokens: the same code, a third of the compile).
    tiny = PixelVLAConfig.tiny(width=32, depth=1, max_text_tokens=16)
    vision = dataclasses.replace(
        tiny.vision,
        dino=dataclasses.replace(tiny.vision.dino, depth=2),
        siglip=dataclasses.replace(tiny.vision.siglip, depth=2),
    )
    config = tiny.replace(
        vision=vision,
        head="discrete",
        use_prompt_encoder=False,
        text_first=True,
        target_point_tokens=True,
        decode_temperature=0.5,
    )
    model = PixelVLA(config)
    obs = Observation.fake(
        B,
        image_size=config.image_size,
        max_prompt_points=config.max_prompt_points,
        max_tokens=config.max_text_tokens,
        vocab_size=config.tokenizer_vocab_size,
        seed=5,
    )
    variables = {"params": fast_random_params(abstract_variables(config)["params"], 2)}

    @jax.jit
    def decode(v, o, rng):
        tokens = model.apply(v, o, rng, method=PixelVLA.generate_tokens)
        return tokens, model.apply(v, o, tokens, method=PixelVLA.discrete_logits)

    first, vocab = config.action_tokenizer.first_token, config.tokenizer_vocab_size
    n = config.num_decoded_tokens
    tokens, logits = decode(variables, obs, jax.random.key(7))
    chex.assert_shape([tokens, logits], [(B, n), (B, n + 1, config.llama.vocab_size)])
    rng, expected = jax.random.key(7), []
    for i in range(n):
        step_rng, rng = jax.random.split(rng)
        action_logits = logits[:, i, first:vocab].astype(jnp.float32)
        expected.append(first + jax.random.categorical(step_rng, action_logits / 0.5))
    chex.assert_trees_all_equal(np.stack(expected, 1).astype(np.int32), np.asarray(tokens))


def test_argmax_is_jnp_argmax_with_ties_and_nan():
    x = np.random.default_rng(0).integers(0, 4, (6, 9)).astype(np.float32)  # many ties
    x[4, 5] = x[4, 2] = np.nan  # the first NaN wins, as jnp.argmax
    x[5] = -np.inf
    got = jax.jit(PixelVLA._argmax)(x)
    assert got.dtype == jnp.int32
    chex.assert_trees_all_equal(np.asarray(got), np.asarray(jnp.argmax(x, -1), np.int32))
    assert int(got[4]) == 2 and int(got[5]) == 0
