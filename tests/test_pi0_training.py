"""The π0 family through the shared training path: loss falls, exact resume (EMA included),
the LoRA stage, export, acting from a checkpoint, and the configs that cannot work.

One run of `configs/libero_pi0.py:tiny_lora` (wrist camera, state, z-score; LoRA on both
Gemma experts, frozen weights in bf16) with an EMA is trained once for the module, and the
other tests read it: compiling a train step dominates the cost, so one stage is trained
(the LoRA stage, whose frozen/trained split and EMA of only the trained leaves are the
parts the full fine-tune lacks); the full fine-tune's state is checked abstractly.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pixelvla_jax import evaluate, export, runs
from pixelvla_jax.models.pi0 import Pi0, Pi0Config
from pixelvla_jax.training import builder, experiment, weight_loaders
from pixelvla_jax.training import config as config_lib
from pixelvla_jax.training import train_state as train_state_lib
from pixelvla_jax.training.param_rules import FROZEN, TRAINED, path_str

STEPS = 24  # the run; its checkpoints are at HALF and STEPS
HALF = STEPS // 2


def _config(variant="tiny_lora", data_dir="", **overrides):
    cfg = config_lib.load_config(f"libero_pi0:{variant}")
    cfg.data.data_dir = str(data_dir)
    cfg.data.batch_size = 8  # one row per simulated device (conftest: 8)
    cfg.data.num_threads = 1
    cfg.data_generator.num_episodes = 4
    cfg.data_generator.episode_length = 12
    cfg.train.progress = False
    cfg.train.async_checkpoint = False
    cfg.train.peak_flops = 1e12
    cfg.optim.warmup_steps = 2
    for key, value in overrides.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def _flat(tree):
    return {
        path_str(p): np.array(x)  # a copy: a donated state's buffers are reused
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if x is not None
    }


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """`STEPS` steps of the tiny LoRA stage with an EMA (checkpoints at HALF and STEPS)."""
    cfg = _config(
        data_dir=tmp_path_factory.mktemp("pi0_rlds"),
        train__num_steps=STEPS,
        train__checkpoint_every=HALF,
        train__ema_decay=0.9,
        optim__lr=3e-3,
        model__frozen_dtype="bfloat16",
    )
    workdir = str(tmp_path_factory.mktemp("pi0_lora") / "run")
    exp = experiment.setup(cfg, workdir)
    initial = _flat(exp.state.params)  # before the first step donates the state
    history = experiment.run(exp)
    exp.checkpointer.close()
    return cfg, workdir, exp, history, initial


def test_tiny_pi0_trains_and_loss_falls(lora_run):
    cfg, workdir, exp, history, _ = lora_run
    assert isinstance(exp.model, Pi0) and isinstance(exp.model_cfg, Pi0Config)
    assert exp.model_cfg.num_cameras == 2 and exp.model_cfg.action_horizon == 8
    losses = np.array([h["loss"] for h in history])
    assert len(losses) == STEPS and np.isfinite(losses).all()
    assert losses[-6:].mean() < 0.8 * losses[:6].mean(), losses
    assert {"flow_mse_per_dim/0", "flow_mse_per_dim/6", "grad_norm"} <= set(history[-1])
    # The EMA has exactly the trained leaves, and trails them.
    ema, params = _flat(exp.state.ema_params), _flat(exp.state.params)
    labels = _flat(exp.labels)
    assert ema.keys() == {k for k, label in labels.items() if label == TRAINED}
    assert any(not np.array_equal(ema[k], params[k]) for k in ema)


def test_full_finetune_state_trains_and_averages_every_leaf():
    step = builder.build_step(_config("tiny", train__ema_decay=0.99))
    assert step.ema_decay == 0.99
    assert set(jax.tree.leaves(step.labels)) == {TRAINED}
    params = _flat(jax.tree.map(lambda x: np.zeros((), x.dtype), step.state.params))
    ema = _flat(jax.tree.map(lambda x: np.zeros((), x.dtype), step.state.ema_params))
    assert ema.keys() == params.keys() and any(k.startswith("PaliGemma/img/") for k in ema)


def test_resume_equals_uninterrupted_run_ema_included(lora_run, tmp_path):
    cfg, workdir, straight, history, _ = lora_run

    def last_checkpoint(directory, names):
        return [str(STEPS)] if directory.endswith("checkpoints") else []

    # The same run stopped after step HALF: its workdir without the last checkpoint.
    stopped = str(tmp_path / "run")
    shutil.copytree(workdir, stopped, ignore=last_checkpoint)
    resumed = experiment.setup(cfg, stopped)
    assert resumed.start_step == HALF
    # The step function of this config, compiled once for the module (a fresh jit of the
    # same computation would compile again; the state and data iterator are what resume).
    resumed.train_step = straight.train_step
    rest = experiment.run(resumed)
    resumed.checkpointer.close()
    np.testing.assert_array_equal([h["loss"] for h in rest], [h["loss"] for h in history[HALF:]])
    for name in ("params", "ema_params", "opt_state"):
        a = _flat(getattr(straight.state, name))
        b = _flat(getattr(resumed.state, name))
        assert a.keys() == b.keys(), name
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}/{key}")


def test_lora_stage_changes_only_what_it_trains(lora_run):
    _, _, exp, _, before = lora_run
    after = _flat(exp.state.params)
    labels = _flat(exp.labels)
    changed = {k for k in after if not np.array_equal(before[k], after[k])}
    trained = {k for k, label in labels.items() if label == TRAINED}
    assert changed <= trained
    groups = {
        "VLM LoRA": lambda k: "lora_" in k and "_1/" not in k,
        "expert LoRA": lambda k: "lora_" in k and "_1/" in k,
        "pixel encoder": lambda k: k.startswith("pixel_encoder/"),
        "prompt encoder": lambda k: k.startswith("prompt_encoder/"),
        "action projections": lambda k: k.startswith(("state_proj/", "action_")),
    }
    for group, member in groups.items():
        assert any(member(k) for k in changed), f"nothing in the {group} was trained"
    assert not any(k.startswith("PaliGemma/") and "lora_" not in k for k in trained)
    frozen = {k for k, label in labels.items() if label == FROZEN}
    assert any(k.startswith("PaliGemma/img/") for k in frozen)
    assert all(after[k].dtype == jnp.bfloat16 for k in frozen)  # held in bf16


def test_export_folds_both_experts_adapters(lora_run):
    _, workdir, _, _, _ = lora_run
    loaded = runs.load_run(workdir)
    merged = export.merge_for_inference(loaded, jnp.float32)
    # The exported config builds a model without adapters whose tree is the merged one.
    assert not merged.model_config.lora_rules
    want = jax.tree.structure(runs.abstract_params(merged.config, as_trained=False))
    assert jax.tree.structure(merged.params) == want
    # The merged kernels with the adapters zeroed compute what kernels + adapters compute
    # (one compiled velocity for both).
    params = jax.tree.map(lambda x: x.astype(jnp.float32), loaded.params)
    flat_merged = _flat(merged.params)

    def folded(path, x):
        name = path_str(path)
        if name.endswith("lora_b"):
            return jnp.zeros_like(x)
        return flat_merged.get(name, x)

    folded_params = jax.tree_util.tree_map_with_path(folded, params)
    model = Pi0(loaded.model_config)
    obs = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), loaded.model_config.spec(2))
    x_t = jnp.full((2, 8, 32), 0.3, jnp.float32)
    velocity = jax.jit(lambda p, t: model.apply({"params": p}, obs, x_t, t, method=Pi0.velocity))
    t = jnp.full((2,), 0.4, jnp.float32)
    np.testing.assert_allclose(
        np.asarray(velocity(folded_params, t)), np.asarray(velocity(params, t)), atol=1e-4
    )


def test_policy_acts_with_the_ema_params(lora_run):
    from pixelvla_jax.policy import Policy

    _, workdir, exp, _, _ = lora_run
    # A run with an EMA loads (and acts with) the EMA for its trained leaves.
    run = runs.load_run(workdir)
    loaded, ema, params = _flat(run.params), _flat(exp.state.ema_params), _flat(exp.state.params)
    for key, value in loaded.items():
        np.testing.assert_array_equal(value, ema.get(key, params[key]), err_msg=key)

    policy = Policy.from_checkpoint(workdir)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    wrist = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    states = rng.normal(size=(2, 8)).astype(np.float32)
    instructions = ["put the bowl on the plate"] * 2
    actions = policy.act(images, instructions, wrist_images=wrist, states=states, seed=1)
    assert actions.shape == (2, 8, 7) and actions.dtype == np.float32
    assert np.isfinite(actions).all()
    again = policy.act(images, instructions, wrist_images=wrist, states=states, seed=1)
    np.testing.assert_array_equal(actions, again)  # the flow's noise comes from the seed


def test_openpi_init_loader_is_registered_and_names_a_missing_checkpoint(lora_run, tmp_path):
    cfg, _, exp, _, _ = lora_run
    cfg = cfg.copy_and_resolve_references()
    cfg.init.pi0_checkpoint = str(tmp_path / "no_params")
    cfg.tokenizer.path = "/some/paligemma_tokenizer.model"
    (loader,) = weight_loaders.loaders_from_config(cfg)
    assert isinstance(loader, weight_loaders.Pi0WeightLoader)
    with pytest.raises(FileNotFoundError, match="config.init.pi0_checkpoint=.*no_params"):
        loader.load(exp.state.params)


def test_ema_follows_openpi_recurrence_once_per_optimizer_step():
    """ema <- d * ema + (1 - d) * params after each optimizer step, from the initial params;
    frozen leaves have no EMA; under accumulation only the last micro-step moves it."""
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    params = {"w": jnp.array([1.0, -2.0]), "frozen": jnp.array([3.0])}
    labels = {"w": TRAINED, "frozen": FROZEN}
    decay, accum = 0.9, 2
    tx = optax.MultiSteps(
        optax.multi_transform({TRAINED: optax.sgd(0.1), FROZEN: optax.set_to_zero()}, labels),
        every_k_schedule=accum,
    ).gradient_transformation()
    state, _ = train_state_lib.create_train_state(
        lambda _: params, tx, mesh, (), jax.random.PRNGKey(0), labels=labels, ema_decay=decay
    )
    assert state.ema_params["frozen"] is None
    step = train_state_lib.make_train_step(
        lambda p, batch, rng: (jnp.sum(p["w"] ** 2) + jnp.sum(p["frozen"]), {}),
        tx,
        labels=labels,
        grad_accum_steps=accum,
        ema_decay=decay,
        donate=False,
    )
    w, ema = np.array([1.0, -2.0]), np.array([1.0, -2.0])
    for i in range(6):
        state, _ = step(state, {})
        if (i + 1) % accum == 0:  # the optimizer step: mean of the micro-gradients (2 w)
            w = w - 0.1 * 2 * w
            ema = decay * ema + (1 - decay) * w
        np.testing.assert_allclose(np.asarray(state.params["w"]), w, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(state.ema_params["w"]), ema, rtol=1e-6)
    acting = train_state_lib.ema_or_params(state.params, state.ema_params)
    np.testing.assert_array_equal(np.asarray(acting["frozen"]), [3.0])


def test_pi0_configs_that_cannot_work_say_what_to_do():
    cfg = config_lib.load_config("libero_pi0:tiny")
    config_lib.validate_config(cfg)
    bad = [
        ("model", "head", "discrete", "head='discrete'.*leave it at 'l1'"),
        ("model", "preset", "tiny", "'tiny' is a preset of family 'pixelvla'"),
        ("stage", None, "pue", "not a stage of config.model.family='pi0'"),
        ("data", "use_state", False, "use_proprio=True but config.data.use_state=False"),
        ("init", "openvla_checkpoint", "/x", "use config.init.pi0_checkpoint"),
        ("init", "pi0_checkpoint", "/x", "config.tokenizer.path"),
        ("train", "ema_decay", 1.0, "ema_decay=1.0 must be in"),
    ]
    for section, key, value, message in bad:
        c = config_lib.load_config("libero_pi0:tiny")
        if key is None:
            c[section] = value
        else:
            c[section][key] = value
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.validate_config(c)
    point = config_lib.load_config("libero_pi0:tiny")
    point.model.target_point_tokens, point.model.padded_action_dim = True, 8
    with pytest.raises(config_lib.ConfigError, match="target_point_tokens adds 2 dims"):
        config_lib.validate_config(point)
    lora = config_lib.load_config("libero_pi0:tiny_lora")
    lora.model.lora.rank = lora.model.lora.expert_rank = 0
    with pytest.raises(config_lib.ConfigError, match="expert_rank"):
        config_lib.validate_config(lora)
    # openpi's LIBERO protocol: a π0 run replans every 5 actions, and after every action on
    # PixelRef's few-step episodes; other runs execute the whole chunk.
    assert evaluate.default_replan("pi0", "libero_spatial") == 5
    assert evaluate.default_replan("pi0", "pixelref") == 1
    assert evaluate.default_replan("pixelvla", "libero_spatial") == 0
