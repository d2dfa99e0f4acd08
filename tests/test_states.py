"""The training states JAX users have, end to end on file, S3 and GCS.

For every kind of state (Flax NNX, Flax linen ``TrainState``, an optax zoo in a
``flax.struct.dataclass``, mixed precision) a few training steps run on mesh A,
the state is saved through ``CheckpointManager``, and then:

* **restore**: it is restored into an abstract target on mesh C, another
  shape with other partition specs, and every leaf is bit-identical to what
  was saved, in the target's sharding;
* **resume**: it is restored into an abstract target on mesh B (other
  devices, axis layout as A), one training step runs, and the result (state
  and loss) is bit-identical to the step the uninterrupted run took. Mesh B
  keeps A's layout because XLA partitions a computation by layout: on another
  mesh shape the same step sums in another order, so bit-identity would hold
  for the restored values (checked on mesh C) but not for the step after.

Restoring with a target gives the user's own node types back (``nnx.State``,
``TrainState`` with its static ``apply_fn`` and ``tx``, optax's named tuples,
``MaskedNode``, ``EmptyState``), checked by tree-structure equality.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cloudckpt as cc
from cloudckpt.engine.loop import LoopThread
from cloudckpt.format import jsonio as _jsonio

from .backend_harness import StoreUnderTest, make_store

DEVICES = jax.devices()
MESH_A = Mesh(np.array(DEVICES[:4]).reshape(2, 2), ("data", "model"))
MESH_B = Mesh(np.array(DEVICES[4:8][::-1]).reshape(2, 2), ("data", "model"))
MESH_C = Mesh(np.array(DEVICES[::-1]).reshape(8), ("x",))

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((16, 8), np.float32))
Y = jnp.asarray(RNG.standard_normal((16, 4), np.float32))


# ------------------------------------------------------------------------------ helpers
def spec_for(shape: tuple[int, ...], mesh: Mesh) -> P:
    """Shards the last dimension, and the one before, over the mesh's axes where they divide."""
    spec: list[Any] = [None] * len(shape)
    axes = list(mesh.axis_names)[::-1]
    for d in range(len(shape) - 1, -1, -1):
        if axes and shape[d] % mesh.shape[axes[0]] == 0:
            spec[d] = axes.pop(0)
    return P(*spec)


def on_mesh(abstract: Any, mesh: Mesh) -> Any:
    """``abstract`` with every leaf a ShapeDtypeStruct sharded over ``mesh``."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=NamedSharding(mesh, spec_for(a.shape, mesh))
        ),
        abstract,
    )


def place(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(
        lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec_for(jnp.shape(a), mesh))),
        tree,
    )


def as_bits(leaf: Any) -> tuple[str, tuple[int, ...], bytes]:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return str(leaf.dtype), leaf.shape, np.asarray(jax.random.key_data(leaf)).tobytes()
    host = np.asarray(leaf)
    return str(host.dtype), host.shape, host.tobytes()


def assert_bitwise(got: Any, want: Any) -> None:
    """Same tree structure (node types included) and the same bits in every leaf."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    pairs = jax.tree_util.tree_flatten_with_path(want)[0]
    for (path, w), g in zip(pairs, jax.tree.leaves(got), strict=True):
        assert as_bits(g) == as_bits(w), jax.tree_util.keystr(path)


def assert_placed_like(got: Any, target: Any) -> None:
    for g, t in zip(jax.tree.leaves(got), jax.tree.leaves(target), strict=True):
        assert g.sharding == t.sharding


@pytest.fixture(params=["file", "s3", "gcs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreUnderTest:
    return make_store(request.param, request, tmp_path)


def save_restore_resume(
    store: StoreUnderTest,
    state: Any,
    abstract: Any,
    step: Callable[[Any], tuple[Any, Any]],
) -> Any:
    """The matrix for one state: save, restore onto mesh C, resume on mesh B bit-identically.

    Returns what the resumed run restored, for further checks of its types.
    """
    with cc.CheckpointManager(store.url("run")) as mngr:
        mngr.save(7, args=cc.args.Composite(state=cc.args.StandardSave(state)))
        mngr.wait_until_finished()
        reference_state, reference_loss = step(state)  # the uninterrupted run

        target_c = on_mesh(abstract, MESH_C)
        other = mngr.restore(7, args=cc.args.Composite(state=cc.args.StandardRestore(target_c)))
        assert_bitwise(other.state, state)
        assert_placed_like(other.state, target_c)

    with cc.CheckpointManager(store.url("run")) as mngr:  # a new job resuming
        assert mngr.latest_step() == 7
        target_b = on_mesh(abstract, MESH_B)
        restored = mngr.restore(args=cc.args.Composite(state=cc.args.StandardRestore(target_b)))
    assert_placed_like(restored.state, target_b)
    resumed_state, resumed_loss = step(restored.state)
    assert as_bits(resumed_loss) == as_bits(reference_loss)
    assert_bitwise(resumed_state, reference_state)
    return restored.state


# ---------------------------------------------------------------------------- Flax NNX
class NnxModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.lin = nnx.Linear(8, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.drop(nnx.relu(self.bn(self.lin(x)))))


def nnx_objects(seed: int) -> tuple[NnxModel, nnx.Optimizer]:
    model = NnxModel(nnx.Rngs(seed, dropout=seed + 1))
    return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)


def nnx_train_step(model: NnxModel, optimizer: nnx.Optimizer) -> jax.Array:
    def loss_fn(model: NnxModel) -> jax.Array:
        return jnp.mean((model(X) - Y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


MODEL_DEF, OPT_DEF = (nnx.graphdef(o) for o in nnx.eval_shape(lambda: nnx_objects(0)))


@jax.jit
def nnx_step(state: dict[str, nnx.State]) -> tuple[dict[str, nnx.State], jax.Array]:
    """One training step of the saved states (functional, so it compiles once per mesh)."""
    model, optimizer = nnx.merge(MODEL_DEF, state["model"]), nnx.merge(OPT_DEF, state["opt"])
    loss = nnx_train_step(model, optimizer)
    return {"model": nnx.state(model), "opt": nnx.state(optimizer)}, loss


def test_flax_nnx_model_and_optimizer(store: StoreUnderTest) -> None:
    model, optimizer = nnx_objects(seed=0)
    state = place({"model": nnx.state(model), "opt": nnx.state(optimizer)}, MESH_A)
    for _ in range(2):
        state, _ = nnx_step(state)
    # Rngs keys (typed), RngCount, BatchNorm statistics and the optimizer's step are all there.
    keys = [
        x for x in jax.tree.leaves(state) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    ]
    assert keys and bool(jnp.any(state["model"]["bn"]["mean"][...] != 0))

    abstract_model, abstract_opt = nnx.eval_shape(lambda: nnx_objects(seed=0))
    abstract = {"model": nnx.state(abstract_model), "opt": nnx.state(abstract_opt)}
    restored = save_restore_resume(store, state, abstract, nnx_step)
    assert isinstance(restored["model"], nnx.State) and isinstance(restored["opt"], nnx.State)
    assert type(restored["model"]["bn"]["mean"]) is nnx.BatchStat

    # Into live objects (other initial values) with nnx.update: they hold the saved state.
    model, optimizer = nnx_objects(seed=123)
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["opt"])
    assert_bitwise({"model": nnx.state(model), "opt": nnx.state(optimizer)}, state)
    assert_bitwise(model(X), nnx.merge(MODEL_DEF, state["model"])(X))  # dropout draws too


# --------------------------------------------------------------------------- Flax linen
class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.25, deterministic=not train)(nn.relu(x))
        return nn.Dense(4)(x)


class LinenState(train_state.TrainState):
    batch_stats: Any
    key: jax.Array  # a typed key for dropout, split every step


LINEN_MODEL = LinenModel()
# One transformation for every state, so jit sees equal static fields (apply_fn, tx).
LINEN_TX = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 20))


def linen_state(seed: int) -> LinenState:
    variables = LINEN_MODEL.init(jax.random.key(seed), X, train=False)
    return LinenState.create(
        apply_fn=LINEN_MODEL.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        key=jax.random.key(seed + 1, impl="rbg"),
        tx=LINEN_TX,
    )


@jax.jit
def linen_step(state: LinenState) -> tuple[LinenState, jax.Array]:
    key, dropout = jax.random.split(state.key)

    def loss_fn(params: Any) -> tuple[jax.Array, Any]:
        out, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            X,
            train=True,
            rngs={"dropout": dropout},
            mutable=["batch_stats"],
        )
        return jnp.mean((out - Y) ** 2), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    return state.replace(batch_stats=updates["batch_stats"], key=key), loss


def test_flax_linen_train_state(store: StoreUnderTest, loop: LoopThread) -> None:
    state = place(linen_state(0), MESH_A)
    for _ in range(2):
        state, _ = linen_step(state)
    abstract = jax.eval_shape(lambda: linen_state(0))
    restored = save_restore_resume(store, state, abstract, linen_step)
    assert type(restored) is LinenState
    assert restored.apply_fn == LINEN_MODEL.apply and restored.tx is LINEN_TX  # static, not saved

    # apply_fn and tx are static fields: nothing of them is in the checkpoint.
    async def paths() -> list[str]:
        document = await store.backend.get(store.path("run", "7", "state", "pytree.json"))
        assert document is not None
        return [leaf["path"] for leaf in _jsonio.loads(document, where="t")["leaves"]]

    saved = loop.run(paths())
    assert ".step" in saved and ".key" in saved and not any("apply_fn" in p for p in saved)
    assert not any(p.startswith(".tx") for p in saved)


# ------------------------------------------------------------------ optax, struct.dataclass
@flax.struct.dataclass
class OptaxState:
    params: dict[str, Any]
    opt_state: Any
    extras: dict[str, Any]
    name: str = flax.struct.field(pytree_node=False, default="zoo")  # static


def _kernels_only(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "kernel" in jax.tree_util.keystr(p), params
    )


OPTAX_TX = optax.MultiSteps(
    optax.chain(
        optax.clip_by_global_norm(1.0),  # EmptyState
        # MaskedNode in the trace wherever the mask is False (the biases).
        optax.masked(optax.chain(optax.add_decayed_weights(1e-3), optax.trace(0.5)), _kernels_only),
        optax.apply_if_finite(
            optax.inject_hyperparams(optax.adam)(
                learning_rate=optax.linear_schedule(1e-2, 1e-3, 10), b1=0.8
            ),
            max_consecutive_errors=3,
        ),
    ),
    every_k_schedule=2,
)


def optax_state(seed: int) -> OptaxState:
    keys = jax.random.split(jax.random.key(seed), 2)
    params = {
        "dense": {
            "kernel": jax.random.normal(keys[0], (8, 4)),
            "bias": jnp.zeros((4,)),
        },
        "scale": {"bias": jnp.ones((4,))},
    }
    extras = {"empty_tuple": (), "empty_dict": {}, "nothing": None, "count": jnp.int32(0)}
    return OptaxState(params=params, opt_state=OPTAX_TX.init(params), extras=extras)


@jax.jit
def optax_step(state: OptaxState) -> tuple[OptaxState, jax.Array]:
    def loss_fn(params: Any) -> jax.Array:
        out = X @ params["dense"]["kernel"] + params["dense"]["bias"]
        return jnp.mean((out * params["scale"]["bias"] - Y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = OPTAX_TX.update(grads, state.opt_state, state.params)
    extras = {**state.extras, "count": state.extras["count"] + 1}
    return (
        state.replace(
            params=optax.apply_updates(state.params, updates), opt_state=opt_state, extras=extras
        ),
        loss,
    )


def test_optax_chain_in_struct_dataclass(store: StoreUnderTest) -> None:
    state = place(optax_state(0), MESH_A)
    for _ in range(3):  # odd: MultiSteps holds an accumulated, unapplied gradient
        state, _ = optax_step(state)
    leaves = jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    assert any(isinstance(x, optax.MaskedNode) for x in leaves)
    abstract = jax.eval_shape(lambda: optax_state(0))
    restored = save_restore_resume(store, state, abstract, optax_step)
    assert type(restored) is OptaxState and restored.name == "zoo"
    assert type(restored.opt_state) is optax.MultiStepsState
    inner = restored.opt_state.inner_opt_state
    assert type(inner[0]) is optax.EmptyState and type(inner[1]) is optax.MaskedState
    assert type(inner[1].inner_state[0]) is optax.EmptyState  # add_decayed_weights
    assert type(inner[1].inner_state[1].trace["scale"]["bias"]) is optax.MaskedNode
    assert inner[2].inner_state.hyperparams["b1"].dtype == jnp.float32
    assert restored.extras["empty_tuple"] == () and restored.extras["nothing"] is None


# ----------------------------------------------------------------------- mixed precision
def mixed_state(seed: int) -> dict[str, Any]:
    master = {
        "w": jax.random.normal(jax.random.key(seed), (8, 4)),
        "b": jnp.zeros((4,)),
    }
    scale = jnp.float32(0.125)
    return {
        "params": jax.tree.map(lambda p: p.astype(jnp.bfloat16), master),  # compute copy
        "master": master,  # fp32
        "opt": optax.adam(1e-2).init(master),  # fp32 moments
        "fp8": {
            "w": (master["w"] / scale).astype(jnp.float8_e4m3fn),
            "scale": scale,
            "grad_e5m2": jnp.zeros((8, 4), jnp.float8_e5m2),
        },
    }


@jax.jit
def mixed_step(state: dict[str, Any]) -> tuple[dict[str, Any], jax.Array]:
    fp8 = state["fp8"]
    w8 = fp8["w"].astype(jnp.float32) * fp8["scale"]

    def loss_fn(master: Any) -> jax.Array:
        w = master["w"].astype(jnp.bfloat16)
        out = (X.astype(jnp.bfloat16) @ w).astype(jnp.float32) + X @ w8 * 0.1 + master["b"]
        return jnp.mean((out - Y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["master"])
    updates, opt = optax.adam(1e-2).update(grads, state["opt"], state["master"])
    master = optax.apply_updates(state["master"], updates)
    scale = jnp.max(jnp.abs(master["w"])) / 448.0
    return {
        "params": jax.tree.map(lambda p: p.astype(jnp.bfloat16), master),
        "master": master,
        "opt": opt,
        "fp8": {
            "w": (master["w"] / scale).astype(jnp.float8_e4m3fn),
            "scale": scale,
            "grad_e5m2": grads["w"].astype(jnp.float8_e5m2),
        },
    }, loss


def test_mixed_precision_bf16_fp32_fp8(store: StoreUnderTest) -> None:
    state = place(mixed_state(0), MESH_A)
    for _ in range(2):
        state, _ = mixed_step(state)
    abstract = jax.eval_shape(lambda: mixed_state(0))
    restored = save_restore_resume(store, state, abstract, mixed_step)
    assert restored["params"]["w"].dtype == jnp.bfloat16
    assert restored["opt"][0].mu["w"].dtype == jnp.float32
    assert restored["fp8"]["w"].dtype == jnp.float8_e4m3fn
    assert restored["fp8"]["grad_e5m2"].dtype == jnp.float8_e5m2


# ------------------------------------------------------------------------- what cannot be saved
def test_unsavable_leaves_are_named_before_any_io(store: StoreUnderTest, loop: LoopThread) -> None:
    state = linen_state(0)
    # A common mistake: the TrainState's parts in a plain dict, functions included.
    bad = {"params": state.params, "apply_fn": state.apply_fn, "tx": state.tx, "obj": object()}
    with cc.CheckpointManager(store.url("bad")) as mngr:
        with pytest.raises(ValueError) as info:
            mngr.save(1, args=cc.args.Composite(state=cc.args.StandardSave(bad)))
        message = str(info.value)
        for path in ("['apply_fn']", "['tx'].init", "['tx'].update", "['obj']"):
            assert f"leaf {path}: cannot save a" in message
        assert "pytree_node=False" in message and "nnx.state(model, nnx.Param" in message
        assert mngr.all_steps() == []

    async def objects() -> list[str]:
        return [o.path async for o in store.backend.list_prefix(store.path("bad"))]

    assert loop.run(objects()) == []


@flax.struct.dataclass
class ScalarState:
    step: int
    lr: float
    tag: str
    flag: bool
    params: jax.Array


def test_python_scalars_and_strings_in_struct_dataclasses_round_trip(tmp_path: Path) -> None:
    state = ScalarState(step=3, lr=0.5, tag="warmup", flag=True, params=jnp.arange(4.0))
    with cc.CheckpointManager(tmp_path / "s") as mngr:
        mngr.save(1, args=cc.args.Composite(state=cc.args.StandardSave(state)))
        mngr.wait_until_finished()
        target = ScalarState(step=0, lr=0.0, tag="", flag=False, params=jnp.zeros(4))
        out = mngr.restore(1, args=cc.args.Composite(state=cc.args.StandardRestore(target))).state
        plain = mngr.restore(1).state
    assert type(out) is ScalarState and out.step == 3 and type(out.step) is int
    assert out.lr == 0.5 and out.tag == "warmup" and out.flag is True
    np.testing.assert_array_equal(np.asarray(out.params), np.arange(4.0))
    # Without a target, custom nodes come back as dicts (nothing constructs user classes).
    assert plain["step"] == 3 and plain["tag"] == "warmup" and isinstance(plain, dict)


# ------------------------------------------------------------------------------- README
def test_readme_flax_and_optax_example_runs(tmp_path: Path) -> None:
    """The README's "Flax and optax" example, exactly as printed, with its directory moved."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Flax and optax", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert code.count('"/tmp/cloudckpt-flax"') == 2
    namespace: dict[str, Any] = {}
    exec(
        compile(code.replace('"/tmp/cloudckpt-flax"', repr(str(tmp_path))), "README", "exec"),
        namespace,
    )
    model, optimizer, state = namespace["model"], namespace["optimizer"], namespace["state"]
    assert type(model).__name__ == "Model" and isinstance(optimizer, nnx.Optimizer)
    assert_bitwise(nnx.state((model, optimizer)), state)
    assert int(optimizer.step[...]) == 1
