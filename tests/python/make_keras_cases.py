"""Generate Keras reference cases in the layout of tests/conformance/keras/README.md.

Each case is a small Keras 3 model exercising one group of options (masks, go_backwards,
merge modes, cell variants, ...); the script stores the model JSON, perturbed weights,
inputs, the outputs Keras computes, a loss over every output (the sum of each output's MSE
against its own random targets) and its gradients.

    KERAS_BACKEND=jax python tests/python/make_keras_cases.py OUT_DIR

Needs keras 3 and jax (not needed by CI: the generated cases are committed under
tests/conformance/keras-options/ with the Keras and JAX versions in each meta.json).
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402


def shape_list(s):
    return [None if d is None else int(d) for d in s]


def out_shape(layer):
    out = layer.output
    if isinstance(out, (list, tuple)):
        return [shape_list(o.shape) for o in out]
    return shape_list(out.shape)


def perturb(model, rng):
    for v in model.weights:
        val = np.array(v.numpy())
        path = v.path
        if path.endswith("moving_variance"):
            val = rng.uniform(0.5, 1.5, size=val.shape)
        elif path.endswith(("bias", "gamma", "beta", "moving_mean", "embeddings")):
            val = val + rng.normal(0, 0.1, size=val.shape)
        v.assign(val.astype(np.float32))


def save(out_dir, name, description, model, inputs, seed, training=False, disconnected=None):
    disconnected = dict(disconnected or {})
    d = os.path.join(out_dir, name)
    for sub in ("weights", "inputs", "outputs", "targets", "grads"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    with open(os.path.join(d, "model.json"), "w") as f:
        f.write(json.dumps(json.loads(model.to_json()), indent=2))
    weights_meta = []
    for i, v in enumerate(model.weights):
        fn = f"weights/{i:03d}.npy"
        np.save(os.path.join(d, fn), np.asarray(v.numpy(), dtype=np.float32))
        weights_meta.append(
            {"file": fn, "name": v.path.split("/", 1)[1] if v.path.count("/") else v.path,
             "shape": list(v.shape), "dtype": "float32", "trainable": bool(v.trainable)}
        )
    inputs_meta = []
    for i, (x, t) in enumerate(zip(inputs, model.inputs)):
        fn = f"inputs/{i:03d}.npy"
        np.save(os.path.join(d, fn), x)
        inputs_meta.append({"file": fn, "name": t._keras_history[0].name, "shape": list(x.shape),
                            "dtype": str(x.dtype)})
    weights_before = [np.array(v.numpy()) for v in model.weights]
    outs = model(inputs if len(inputs) > 1 else inputs[0], training=training)
    for v, w in zip(model.weights, weights_before):
        v.assign(w)  # a training call moves BatchNormalization statistics: undo
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    outs = [np.asarray(o, dtype=np.float32) for o in outs]
    outputs_meta = []
    for i, o in enumerate(outs):
        fn = f"outputs/{i:03d}.npy"
        np.save(os.path.join(d, fn), o)
        outputs_meta.append({"file": fn, "name": f"output_{i}", "shape": list(o.shape),
                             "dtype": "float32"})
    # One target per output and a loss over every output (the sum of each output's MSE), so
    # that every weight's gradient is reached: a weight that feeds no output is the only
    # one whose gradient may be identically zero, and the case must say so.
    rng = np.random.default_rng(seed + 1)
    targets = [rng.uniform(-1, 1, size=o.shape).astype(np.float32) for o in outs]
    target_files = []
    for i, t in enumerate(targets):
        fn = f"targets/{i:03d}.npy"
        np.save(os.path.join(d, fn), t)
        target_files.append(fn)
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    xs = [jnp.asarray(x) for x in inputs]

    def loss_fn(tv):
        y, _ = model.stateless_call(tv, ntv, xs if len(xs) > 1 else xs[0], training=training)
        ys = list(y) if isinstance(y, (list, tuple)) else [y]
        return sum(jnp.mean((yk - tk) ** 2) for yk, tk in zip(ys, targets, strict=True))

    value, grads = jax.value_and_grad(loss_fn)(tv)
    grad_files = []
    zero = {}
    trainable_names = [v.path for v in model.trainable_variables]
    for i, g in enumerate(grads):
        fn = f"grads/{i:03d}.npy"
        g = np.asarray(g, dtype=np.float32)
        np.save(os.path.join(d, fn), g)
        grad_files.append(fn)
        if not np.any(g):
            zero[fn] = trainable_names[i]
    unexplained = {f: n for f, n in zero.items() if f not in disconnected}
    if unexplained:
        raise SystemExit(f"{name}: gradients identically zero with no reason given: {unexplained}")
    stale = [f for f in disconnected if f not in zero]
    if stale:
        raise SystemExit(f"{name}: declared disconnected but non-zero: {stale}")
    gmax = max(float(np.max(np.abs(np.asarray(g)))) for g in grads) if grads else 0.0
    summary_layers = [
        {"name": l.name, "class_name": l.__class__.__name__, "output_shape": out_shape(l),
         "params": int(l.count_params())}
        for l in model.layers
    ]
    trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
    frozen = int(sum(np.prod(v.shape) for v in model.non_trainable_weights))
    meta = {
        "name": name,
        "description": description,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "jax_version": jax.__version__,
        "seed": seed,
        "tolerance": 1e-5,
        # Per gradient tensor: max|ours - Keras| <= grad_atol + grad_rtol * max|Keras|.
        "grad_rtol": 1e-4,
        "grad_atol": 1e-7,
        "grad_max": gmax,
        "summary": {"total_params": trainable + frozen, "trainable_params": trainable,
                    "non_trainable_params": frozen, "layers": summary_layers},
        "weights": weights_meta,
        "inputs": inputs_meta,
        "outputs": outputs_meta,
        "loss": {"name": "mse", "outputs": list(range(len(outs))), "targets": target_files,
                 "value": float(value), "reduction": "sum over the outputs of each one's mean"},
        "grads": grad_files,
        # Gradient files that are identically zero because the weight feeds no output,
        # with the reason (checked by the generator and by the runner).
        "disconnected_grads": disconnected,
        "stateful_steps": None,
    }
    if training:
        # Not in the seed layout: outputs, loss and grads are of model(x, training=True).
        meta["call_training"] = True
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print("wrote", d)


def padded(rng, b, t, f, lengths, left=False, holes=()):
    """Float input with padding steps set to exactly 0 (masked by Masking(0))."""
    x = rng.uniform(-1, 1, size=(b, t, f)).astype(np.float32)
    for i, n in enumerate(lengths):
        if left:
            x[i, : t - n] = 0.0
        else:
            x[i, n:] = 0.0
    for (i, s) in holes:
        x[i, s] = 0.0
    return x


def main(out_dir):
    cases = []

    def case(name, desc, seed):
        def wrap(fn):
            cases.append((name, desc, seed, fn))
            return fn
        return wrap

    @case("opt_masking_lstm_states", "Masking(0) + LSTM(return_sequences, return_state): right and left padding and a hole; masked steps carry h and c", 11)
    def _(rng):
        inp = keras.Input((6, 3))
        m = layers.Masking(0.0)(inp)
        seq, h, c = layers.LSTM(5, return_sequences=True, return_state=True)(m)
        model = keras.Model(inp, [seq, h, c])
        x = padded(rng, 4, 6, 3, [6, 4, 2, 5], holes=[(0, 2)])
        x[3, :2] = 0.0  # left padding in row 3
        return model, [x]

    @case("opt_embedding_mask_gru", "Embedding(mask_zero) + GRU(8) last output; padded ids", 12)
    def _(rng):
        inp = keras.Input((7,), dtype="int32")
        e = layers.Embedding(20, 4, mask_zero=True)(inp)
        y = layers.GRU(8)(e)
        model = keras.Model(inp, y)
        x = rng.integers(1, 20, size=(3, 7)).astype(np.int32)
        x[0, 5:] = 0
        x[1, :3] = 0
        x[2, 3] = 0
        return model, [x]

    @case("opt_go_backwards", "LSTM(go_backwards, return_sequences, return_state) and SimpleRNN(go_backwards) with a mask", 13)
    def _(rng):
        inp = keras.Input((5, 4))
        m = layers.Masking(0.0)(inp)
        seq, h, c = layers.LSTM(6, go_backwards=True, return_sequences=True, return_state=True)(m)
        s = layers.SimpleRNN(3, go_backwards=True)(seq)
        model = keras.Model(inp, [seq, h, c, s])
        return model, [padded(rng, 3, 5, 4, [5, 3, 1])]

    @case("opt_gru_reset_before_hard_sigmoid", "GRU(reset_after=False, activation=relu, recurrent_activation=hard_sigmoid) then GRU(use_bias=False)", 14)
    def _(rng):
        inp = keras.Input((6, 5))
        y = layers.GRU(7, reset_after=False, activation="relu", recurrent_activation="hard_sigmoid",
                       return_sequences=True)(inp)
        y = layers.GRU(4, use_bias=False)(y)
        model = keras.Model(inp, y)
        return model, [rng.uniform(-1, 1, size=(3, 6, 5)).astype(np.float32)]

    @case("opt_lstm_variants", "LSTM(unit_forget_bias=False, activation=softsign, recurrent_activation=hard_sigmoid) then LSTM(use_bias=False, unroll=True)", 15)
    def _(rng):
        inp = keras.Input((4, 3))
        y = layers.LSTM(5, unit_forget_bias=False, activation="softsign",
                        recurrent_activation="hard_sigmoid", return_sequences=True)(inp)
        y = layers.LSTM(6, use_bias=False, unroll=True)(y)
        model = keras.Model(inp, y)
        return model, [rng.uniform(-1, 1, size=(2, 4, 3)).astype(np.float32)]

    @case("opt_simplernn_relu_stacked_cells", "RNN(StackedRNNCells([SimpleRNNCell(relu), GRUCell, LSTMCell]), return_sequences) + Dense(softmax)", 16)
    def _(rng):
        inp = keras.Input((5, 4))
        cells = [layers.SimpleRNNCell(6, activation="relu"), layers.GRUCell(5), layers.LSTMCell(3)]
        y = layers.RNN(layers.StackedRNNCells(cells), return_sequences=True)(inp)
        y = layers.Dense(4, activation="softmax")(y)
        model = keras.Model(inp, y)
        return model, [rng.uniform(-1, 1, size=(2, 5, 4)).astype(np.float32)]

    @case("opt_bidirectional_merge_modes", "Bidirectional sum / mul / ave / None with masks and return_sequences, and a Bidirectional GRU with return_state", 17)
    def _(rng):
        inp = keras.Input((6, 3))
        m = layers.Masking(0.0)(inp)
        a = layers.Bidirectional(layers.LSTM(4, return_sequences=True), merge_mode="sum")(m)
        b = layers.Bidirectional(layers.GRU(4, return_sequences=True), merge_mode="mul")(a)
        c = layers.Bidirectional(layers.SimpleRNN(4, return_sequences=True), merge_mode="ave")(b)
        f, bw = layers.Bidirectional(layers.LSTM(3), merge_mode=None)(c)
        o, hf, hb = layers.Bidirectional(layers.GRU(2, return_state=True))(m)
        model = keras.Model(inp, [c, f, bw, o, hf, hb])
        return model, [padded(rng, 3, 6, 3, [6, 4, 2])]

    @case("opt_bidirectional_backward_layer_initial_state", "Bidirectional with an explicit backward_layer (GRU with other activations) and initial_state split between directions", 18)
    def _(rng):
        inp = keras.Input((5, 3))
        hf = keras.Input((4,))
        hb = keras.Input((4,))
        bi = layers.Bidirectional(layers.GRU(4, return_sequences=True),
                                  backward_layer=layers.GRU(4, return_sequences=True, go_backwards=True,
                                                            activation="relu",
                                                            recurrent_activation="hard_sigmoid"))
        y = bi(inp, initial_state=[hf, hb])
        model = keras.Model([inp, hf, hb], y)
        return model, [rng.uniform(-1, 1, size=(2, 5, 3)).astype(np.float32),
                       rng.uniform(-1, 1, size=(2, 4)).astype(np.float32),
                       rng.uniform(-1, 1, size=(2, 4)).astype(np.float32)]

    @case("opt_zero_output_for_mask", "LSTM(zero_output_for_mask=True) with and without return_sequences, right-padded rows", 19)
    def _(rng):
        inp = keras.Input((5, 3))
        m = layers.Masking(0.0)(inp)
        s = layers.LSTM(4, return_sequences=True, zero_output_for_mask=True)(m)
        l = layers.LSTM(4, zero_output_for_mask=True)(m)
        model = keras.Model(inp, [s, l])
        return model, [padded(rng, 3, 5, 3, [5, 3, 2])]

    @case("opt_time_distributed_dropout_bn", "LSTM(return_sequences) + Dropout + TimeDistributed(Dense(relu)) + BatchNormalization(center=False) + Dense", 20)
    def _(rng):
        model = keras.Sequential([
            keras.Input((4, 5)),
            layers.LSTM(6, return_sequences=True, dropout=0.3, recurrent_dropout=0.2),
            layers.Dropout(0.5),
            layers.TimeDistributed(layers.Dense(3, activation="relu")),
            layers.BatchNormalization(center=False),
            layers.Dense(2),
        ])
        return model, [rng.uniform(-1, 1, size=(3, 4, 5)).astype(np.float32)]

    @case("opt_shared_layer", "One LSTM layer called on two inputs (shared weights) and a Dense on each result", 21)
    def _(rng):
        a = keras.Input((4, 3))
        b = keras.Input((6, 3))
        lstm = layers.LSTM(5)
        dense = layers.Dense(2, activation="tanh")
        model = keras.Model([a, b], [dense(lstm(a)), dense(lstm(b))])
        return model, [rng.uniform(-1, 1, size=(2, 4, 3)).astype(np.float32),
                       rng.uniform(-1, 1, size=(2, 6, 3)).astype(np.float32)]

    @case("opt_sequential_masks_unroll", "Sequential: Masking + LSTM(unroll, return_sequences) + GRU(go_backwards, zero_output_for_mask, return_sequences) + SimpleRNN; masks flow implicitly", 22)
    def _(rng):
        model = keras.Sequential([
            keras.Input((5, 3)),
            layers.Masking(0.0),
            layers.LSTM(4, unroll=True, return_sequences=True),
            layers.GRU(3, go_backwards=True, zero_output_for_mask=True, return_sequences=True),
            layers.SimpleRNN(2),
        ])
        return model, [padded(rng, 4, 5, 3, [5, 4, 2, 1], holes=[(0, 1)])]

    @case("opt_embedding_mask_bidirectional", "Sequential: Embedding(mask_zero) + Bidirectional(LSTM, return_sequences) + Bidirectional(GRU(reset_after=False)) + Dense", 23)
    def _(rng):
        model = keras.Sequential([
            keras.Input((6,), dtype="int32"),
            layers.Embedding(15, 4, mask_zero=True),
            layers.Bidirectional(layers.LSTM(3, return_sequences=True)),
            layers.Bidirectional(layers.GRU(2, reset_after=False)),
            layers.Dense(3),
        ])
        x = rng.integers(1, 15, size=(3, 6)).astype(np.int32)
        x[0, 4:] = 0
        x[1, 1:] = 0
        return model, [x]

    @case("opt_dense_activations", "Dense layers with elu, selu, softplus, softsign, swish, relu6, leaky_relu, exponential, log_softmax, sigmoid, hard_sigmoid", 24)
    def _(rng):
        inp = keras.Input((6,))
        outs = [layers.Dense(4, activation=a)(inp) for a in
                ["elu", "selu", "softplus", "softsign", "swish", "relu6", "leaky_relu",
                 "exponential", "log_softmax", "sigmoid", "hard_sigmoid"]]
        model = keras.Model(inp, outs)
        return model, [rng.uniform(-3, 3, size=(5, 6)).astype(np.float32)]

    @case("opt_batchnorm_training", "model(x, training=True): BatchNormalization on batch statistics, over masked steps of an LSTM sequence and on a 2-D input (meta.call_training)", 25)
    def _(rng):
        inp = keras.Input((5, 3))
        m = layers.Masking(0.0)(inp)
        seq = layers.LSTM(4, return_sequences=True)(m)
        a = layers.BatchNormalization()(seq)
        last = layers.LSTM(3)(m)
        b = layers.BatchNormalization(scale=False)(last)
        model = keras.Model(inp, [a, b])
        return model, [padded(rng, 4, 5, 3, [5, 3, 2, 4])]

    only = set(sys.argv[2:])
    for name, desc, seed, fn in cases:
        if only and name not in only:
            continue
        keras.utils.set_random_seed(seed)
        rng = np.random.default_rng(seed)
        made = fn(rng)
        model, inputs = made[:2]
        disconnected = made[2] if len(made) > 2 else None
        perturb(model, rng)
        save(out_dir, name, desc, model, inputs, seed, training=name.endswith("_training"),
             disconnected=disconnected)


if __name__ == "__main__":
    main(sys.argv[1])
