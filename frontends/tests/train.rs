//! Training: optimizers against Keras's own updates, `fit` on real digits, `evaluate`,
//! and the main job's outputs.

use cellgraph::ir::Tensor;
use cellgraph::keras::{FitOptions, Loss, Metric, Optimizer, OptimizerState};
use cellgraph::mnist::{guide_model, Mnist};
use ndarray::{ArrayD, Axis, IxDyn};

#[test]
fn optimizers_match_keras_updates() {
    // Three steps of each optimizer from w0 with the gradients below, computed by Keras
    // 3.15.1 (JAX backend) with `optimizer.apply_gradients` on a `keras.Variable`.
    let w0 = [0.5f32, -1.0, 2.0];
    let gs = [[0.1f32, -0.2, 0.3], [-0.4, 0.5, 0.05], [0.2, 0.2, -0.6]];
    let sgd = |momentum, nesterov| Optimizer::SGD {
        learning_rate: 0.01,
        momentum,
        nesterov,
    };
    let rms = |momentum| Optimizer::RMSprop {
        learning_rate: 0.001,
        rho: 0.9,
        momentum,
        epsilon: 1e-7,
    };
    let keras: [(&str, Optimizer, [f64; 3]); 6] = [
        (
            "sgd",
            Optimizer::sgd(),
            [0.5010000467300415, -1.0049999952316284, 2.002500057220459],
        ),
        (
            "sgd momentum",
            sgd(0.9, false),
            [0.5028899908065796, -1.0060800313949585, 1.996919870376587],
        ),
        (
            "sgd nesterov",
            sgd(0.9, true),
            [0.5036010146141052, -1.010472059249878, 1.9997280836105347],
        ),
        (
            "adam",
            Optimizer::adam(),
            [0.4996697008609772, -0.9999851584434509, 1.998513102531433],
        ),
        (
            "rmsprop",
            Optimizer::rmsprop(),
            [0.49847179651260376, -1.000954031944275, 1.9991668462753296],
        ),
        (
            "rmsprop momentum",
            rms(0.5),
            [0.49763867259025574, -1.0000606775283813, 1.9965215921401978],
        ),
    ];
    for (name, opt, want) in keras {
        let mut w = ArrayD::from_shape_vec(IxDyn(&[3]), w0.to_vec()).unwrap();
        let mut st = OptimizerState::default();
        for g in gs {
            let g = ArrayD::from_shape_vec(IxDyn(&[3]), g.to_vec()).unwrap();
            opt.apply_gradients(&mut st, &mut [&mut w], &[g]).unwrap();
        }
        for (a, b) in w.iter().zip(want) {
            assert!(
                (*a as f64 - b).abs() < 2e-6,
                "{name}: {w:?} vs Keras {want:?}"
            );
        }
    }
}

fn subset(x: &ArrayD<f32>, y: &[u8], n: usize) -> (Tensor, Tensor) {
    let idx: Vec<usize> = (0..n).collect();
    let xs = x.select(Axis(0), &idx);
    let ys = ArrayD::from_shape_vec(IxDyn(&[n]), y[..n].to_vec()).unwrap();
    (Tensor::F32(xs), Tensor::U8(ys))
}

#[test]
fn fit_learns_real_digits_and_evaluate_agrees() {
    let data = Mnist::bundled().unwrap();
    let (x, y) = subset(&data.train_images, &data.train_labels, 384);
    let (vx, vy) = subset(&data.test_images, &data.test_labels, 256);
    let mut model = guide_model(false, 3).unwrap();
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    model.compile(Optimizer::adam(), loss, &[Metric::Accuracy]);
    let before = model.evaluate(std::slice::from_ref(&vx), &vy, 128).unwrap();
    let opts = FitOptions {
        batch_size: 64,
        epochs: 4,
        validation_data: Some((vec![vx.clone()], vec![vy.clone()])),
        seed: 1,
        verbose: false,
        ..Default::default()
    };
    let h = model.fit(&[x], &y, &opts).unwrap();
    let keys: Vec<&str> = h.history.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["loss", "accuracy", "val_loss", "val_accuracy"]);
    let l = h.get("loss").unwrap();
    assert!(l[3] < l[0] * 0.8, "training loss did not fall: {l:?}");
    let va = h.get("val_accuracy").unwrap();
    assert!(va[3] > 0.2, "validation accuracy {va:?} (chance is 0.1)");
    let after = model.evaluate(&[vx], &vy, 100).unwrap();
    assert!(after.loss < before.loss);
    assert!((after.loss - h.get("val_loss").unwrap()[3]).abs() < 1e-4);
    assert_eq!(after.metrics[0].0, "accuracy");
    assert!((after.metrics[0].1 - va[3]).abs() < 1e-9);
}

#[test]
fn fit_refuses_mismatched_data_and_uncompiled_models() {
    let mut model = guide_model(false, 0).unwrap();
    let x = Tensor::F32(ArrayD::zeros(IxDyn(&[4, 28, 28])));
    let y = Tensor::U8(ArrayD::zeros(IxDyn(&[4])));
    let e = model
        .fit(std::slice::from_ref(&x), &y, &FitOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("compile()"), "{e}");
    model.compile(
        Optimizer::sgd(),
        Loss::SparseCategoricalCrossentropy { from_logits: true },
        &[],
    );
    let y3 = Tensor::U8(ArrayD::zeros(IxDyn(&[3])));
    let e = model
        .fit(std::slice::from_ref(&x), &y3, &FitOptions::default())
        .unwrap_err();
    assert!(
        e.to_string().contains("4 samples, the targets have 3"),
        "{e}"
    );
    let bad = Tensor::U8(ArrayD::from_elem(IxDyn(&[4]), 12));
    let e = model
        .fit(
            &[x],
            &bad,
            &FitOptions {
                verbose: false,
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("class id 12 is not in 0..10"), "{e}");
}

#[test]
fn losses_match_keras_on_the_host_and_in_the_graph() {
    use cellgraph::keras::train::loss_value;
    use cellgraph::keras::{Dropout, Input, Sequential};
    // Values from Keras 3.15.1 (JAX) `keras.losses.*()(targets, outputs)`.
    let arr = |v: &[f32]| Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[2, 3]), v.to_vec()).unwrap());
    let logits = arr(&[0.2, -1.0, 0.7, 1.5, 0.3, -0.4]);
    let probs = arr(&[0.2, 0.5, 0.3, 0.6, 0.1, 0.3]);
    let onehot = arr(&[0., 0., 1., 1., 0., 0.]);
    let binary = arr(&[1., 0., 1., 0., 1., 1.]);
    let targets = arr(&[0.1, 0.2, 0.3, -0.5, 0.5, 1.0]);
    let ids = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![2, 0]).unwrap());
    let cases: [(Loss, &Tensor, &Tensor, f64); 8] = [
        (
            Loss::MeanSquaredError,
            &logits,
            &targets,
            1.2683333158493042,
        ),
        (
            Loss::MeanAbsoluteError,
            &logits,
            &targets,
            0.8833333849906921,
        ),
        (
            Loss::SparseCategoricalCrossentropy { from_logits: true },
            &logits,
            &ids,
            0.47693297266960144,
        ),
        (
            Loss::SparseCategoricalCrossentropy { from_logits: false },
            &probs,
            &ids,
            0.8573992252349854,
        ),
        (
            Loss::CategoricalCrossentropy { from_logits: true },
            &logits,
            &onehot,
            0.47693297266960144,
        ),
        (
            Loss::CategoricalCrossentropy { from_logits: false },
            &probs,
            &onehot,
            0.8573992252349854,
        ),
        (
            Loss::BinaryCrossentropy { from_logits: true },
            &logits,
            &binary,
            0.7472284436225891,
        ),
        (
            Loss::BinaryCrossentropy { from_logits: false },
            &probs,
            &binary,
            1.3215677738189697,
        ),
    ];
    for (loss, out, t, keras) in cases {
        let host = loss_value(loss, out, t).unwrap();
        assert!(
            (host - keras).abs() < 1e-6,
            "{loss:?} host {host} vs Keras {keras}"
        );
        // The same loss in the gradient graph, on a model whose output is its input.
        let mut m = Sequential::new();
        m.add(Input::new(&[Some(3)])).unwrap();
        m.add(Dropout::new(0.0)).unwrap();
        let g = m
            .gradients(std::slice::from_ref(out), t, loss, 0, false)
            .unwrap();
        assert!(
            (g.loss as f64 - keras).abs() < 1e-5,
            "{loss:?} graph {} vs Keras {keras}",
            g.loss
        );
    }
}

#[test]
fn gradient_clipping_bounds_the_update() {
    use cellgraph::keras::{Clipping, Input, Sequential};
    let run = |clip: Option<Clipping>| {
        let mut m = Sequential::with_seed(2);
        m.add(Input::new(&[Some(2)])).unwrap();
        m.add(cellgraph::keras::Dense::new(1)).unwrap();
        m.compile(
            Optimizer::SGD {
                learning_rate: 1.0,
                momentum: 0.0,
                nesterov: false,
            },
            Loss::MeanSquaredError,
            &[],
        );
        if let Some(c) = clip {
            m.set_clipping(c).unwrap();
        }
        let before = m.get_weights();
        let x = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[1, 2]), vec![10.0, -20.0]).unwrap());
        let y = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[1, 1]), vec![100.0]).unwrap());
        let opts = FitOptions {
            batch_size: 1,
            verbose: false,
            shuffle: false,
            ..Default::default()
        };
        m.fit(&[x], &y, &opts).unwrap();
        let after = m.get_weights();
        before
            .iter()
            .zip(&after)
            .map(|(b, a)| (a - b).mapv(|v| v.abs()))
            .collect::<Vec<_>>()
    };
    // With lr 1, the update equals the (clipped) gradient.
    let free = run(None);
    assert!(
        free[0].iter().any(|&d| d > 100.0),
        "unclipped step {free:?}"
    );
    let by_value = run(Some(Clipping {
        clipvalue: Some(0.5),
        ..Default::default()
    }));
    assert!(
        by_value.iter().flatten().all(|&d| d <= 0.5 + 1e-6),
        "{by_value:?}"
    );
    let by_norm = run(Some(Clipping {
        clipnorm: Some(1.0),
        ..Default::default()
    }));
    for d in &by_norm {
        let n = d.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(n <= 1.0 + 1e-5, "per-weight norm {n}");
    }
    let global = run(Some(Clipping {
        global_clipnorm: Some(1.0),
        ..Default::default()
    }));
    let n = global.iter().flatten().map(|v| v * v).sum::<f32>().sqrt();
    assert!((n - 1.0).abs() < 1e-4, "global norm {n}");
    let mut m = Sequential::new();
    m.add(Input::new(&[Some(2)])).unwrap();
    m.compile(Optimizer::sgd(), Loss::MeanSquaredError, &[]);
    let e = m
        .set_clipping(Clipping {
            clipnorm: Some(1.0),
            clipvalue: Some(1.0),
            ..Default::default()
        })
        .unwrap_err();
    assert!(e.to_string().contains("only one of"), "{e}");
}

#[test]
fn a_non_finite_loss_stops_fit_naming_epoch_and_batch() {
    let data = Mnist::bundled().unwrap();
    let (x, y) = subset(&data.train_images, &data.train_labels, 64);
    let mut model = guide_model(false, 1).unwrap();
    model.compile(
        Optimizer::SGD {
            learning_rate: 1e30,
            momentum: 0.0,
            nesterov: false,
        },
        Loss::SparseCategoricalCrossentropy { from_logits: true },
        &[],
    );
    let opts = FitOptions {
        batch_size: 16,
        epochs: 3,
        verbose: false,
        ..Default::default()
    };
    let e = model.fit(&[x], &y, &opts).unwrap_err().to_string();
    assert!(
        e.contains("the loss became") && e.contains("at epoch 1, batch"),
        "{e}"
    );
}

/// `fit` runs the recurrent layer fused both ways: the training plan holds the fused
/// `LSTM` and its fused backward `LSTMGrad` and no `Scan` loop; with the loop path asked
/// for it holds the `Scan` loops instead, and both train to the same weights.
#[test]
fn fit_trains_through_fused_kernels_both_ways() {
    use cellgraph::backends::cpu::Recurrent;
    let data = Mnist::bundled().unwrap();
    let (x, y) = subset(&data.train_images, &data.train_labels, 128);
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let opts = FitOptions {
        batch_size: 64,
        epochs: 1,
        seed: 1,
        verbose: false,
        ..Default::default()
    };
    let mut weights = Vec::new();
    for (mode, rnn_lstmcell) in [(Recurrent::Fused, true), (Recurrent::Loop, true)] {
        let mut model = guide_model(rnn_lstmcell, 3).unwrap();
        model.set_recurrent(mode);
        model.compile(Optimizer::sgd(), loss, &[]);
        model.fit(std::slice::from_ref(&x), &y, &opts).unwrap();
        let texts: Vec<String> = model
            .compiled_graphs()
            .into_iter()
            .map(cellgraph::ir::print_graph)
            .collect();
        assert!(!texts.is_empty());
        let all = texts.join("\n");
        let fused = mode == Recurrent::Fused;
        let forward = all.contains("= LSTM{") || all.contains("= LSTM(");
        assert_eq!(forward, fused, "forward op");
        assert_eq!(all.contains("LSTMGrad"), fused, "backward op");
        assert_eq!(all.contains("Scan{"), !fused, "loops");
        weights.push(model.get_weights());
    }
    for (a, b) in weights[0].iter().zip(&weights[1]) {
        for (p, q) in a.iter().zip(b) {
            assert!((p - q).abs() <= 1e-4 + 1e-3 * q.abs(), "{p} vs {q}");
        }
    }
}

/// Training on a plan placed over two backends — the test-only `subset` backend
/// (elementwise ops and 2-D MatMul: Dense, BatchNormalization's arithmetic, the optimizer
/// updates' elementwise parts) before the CPU (the fused LSTM and its backward, shapes,
/// reductions) — gives the CPU's losses and weights, and the training plan does put
/// nodes of the forward, the backward and both on the subset backend.
#[test]
fn fit_on_a_plan_placed_over_two_backends_matches_the_cpu() {
    use cellgraph::backends::subset::SubsetBackend;
    let data = Mnist::bundled().unwrap();
    let (x, y) = subset(&data.train_images, &data.train_labels, 128);
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let opts = FitOptions {
        batch_size: 32,
        epochs: 2,
        seed: 4,
        verbose: false,
        ..Default::default()
    };
    let mut runs = Vec::new();
    for placed in [false, true] {
        let mut model = guide_model(false, 5).unwrap();
        if placed {
            model.set_backends(vec![std::sync::Arc::new(SubsetBackend)]);
        }
        model.compile(Optimizer::adam(), loss, &[]);
        let h = model.fit(std::slice::from_ref(&x), &y, &opts).unwrap();
        let pred = model.predict(std::slice::from_ref(&x)).unwrap();
        let places = model.placements();
        if placed {
            let all: Vec<_> = places.iter().flatten().collect();
            let on = |b: &str, op: &str| all.iter().any(|p| p.backend == b && p.op == op);
            assert!(on("subset", "MatMul") && on("subset", "Add") && on("subset", "Mul"));
            assert!(
                on("cpu", "LSTM") && on("cpu", "LSTMGrad"),
                "the fused LSTM stays on the cpu"
            );
            let n_subset = all.iter().filter(|p| p.backend == "subset").count();
            assert!(
                n_subset >= 20,
                "only {n_subset} nodes on the subset backend"
            );
        } else {
            assert!(places.is_empty());
        }
        runs.push((h.get("loss").unwrap().to_vec(), model.get_weights(), pred));
    }
    let (a, b) = (&runs[0], &runs[1]);
    for (p, q) in a.0.iter().zip(&b.0) {
        assert!((p - q).abs() <= 1e-4 * q.abs().max(1.0), "loss {p} vs {q}");
    }
    for (wa, wb) in a.1.iter().zip(&b.1) {
        for (p, q) in wa.iter().zip(wb) {
            assert!((p - q).abs() <= 1e-4 + 1e-3 * q.abs(), "weight {p} vs {q}");
        }
    }
    for (pa, pb) in a.2.iter().zip(&b.2) {
        for (p, q) in pa.to_f64_vec().iter().zip(pb.to_f64_vec()) {
            assert!(
                (p - q).abs() <= 1e-3 + 1e-3 * q.abs(),
                "prediction {p} vs {q}"
            );
        }
    }
}

/// `train_on_batch` is one step of `fit` on one batch: the same loss and the same
/// weights after it as `fit` with one batch, unshuffled; before `compile` it is an error.
#[test]
fn train_on_batch_is_one_fit_step() {
    let data = Mnist::bundled().unwrap();
    let (x, y) = subset(&data.train_images, &data.train_labels, 32);
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let mut a = guide_model(false, 5).unwrap();
    let e = a
        .train_on_batch(std::slice::from_ref(&x), std::slice::from_ref(&y))
        .unwrap_err();
    assert!(e.to_string().contains("compile()"), "{e}");
    a.compile(Optimizer::adam(), loss, &[]);
    let mut b = guide_model(false, 5).unwrap();
    b.compile(Optimizer::adam(), loss, &[]);
    let first = a
        .train_on_batch(std::slice::from_ref(&x), std::slice::from_ref(&y))
        .unwrap();
    let opts = FitOptions {
        batch_size: 32,
        epochs: 1,
        shuffle: false,
        verbose: false,
        ..Default::default()
    };
    let h = b.fit(std::slice::from_ref(&x), &y, &opts).unwrap();
    let fit_loss = h.get("loss").unwrap()[0];
    assert!(
        (f64::from(first) - fit_loss).abs() < 1e-5,
        "{first} vs {fit_loss}"
    );
    for (p, q) in a.get_weights().iter().zip(&b.get_weights()) {
        assert_eq!(p, q);
    }
    // A second step on the same batch lowers the loss (Adam, lr 1e-3).
    let second = a
        .train_on_batch(std::slice::from_ref(&x), std::slice::from_ref(&y))
        .unwrap();
    assert!(second < first, "{second} !< {first}");
    let e = a.train_on_batch(std::slice::from_ref(&x), &[]).unwrap_err();
    assert!(e.to_string().contains("target"), "{e}");
}

/// A training step runs as one graph: forward, loss, gradients, clipping, the optimizer
/// update and BatchNormalization's moving statistics. Its update nodes compute what the
/// host optimizer computes, operation for operation in float32: three `train_on_batch`
/// steps give bit for bit the weights (and optimizer moments) of `gradients_of_heads`
/// followed by `Optimizer::apply_gradients` and BatchNorm's moving update on the host,
/// for every optimizer and option. Clipping's norms are float32 sums in the graph, so
/// the clipped cases agree to rounding instead.
#[test]
fn the_graph_step_matches_the_host_optimizer_bit_for_bit() {
    use cellgraph::keras::{BatchNormalization, Clipping, Dense, Input, Sequential, LSTM};
    let build = || {
        let mut m = Sequential::with_seed(11);
        m.add(Input::new(&[Some(5), Some(3)])).unwrap();
        m.add(LSTM::new(4)).unwrap();
        m.add(BatchNormalization::new()).unwrap();
        m.add(Dense::new(2)).unwrap();
        m
    };
    let sgd = |momentum, nesterov| Optimizer::SGD {
        learning_rate: 0.05,
        momentum,
        nesterov,
    };
    let rms = |momentum| Optimizer::RMSprop {
        learning_rate: 0.01,
        rho: 0.9,
        momentum,
        epsilon: 1e-7,
    };
    let clip = |n: Option<f32>, g: Option<f32>, v: Option<f32>| Clipping {
        clipnorm: n,
        global_clipnorm: g,
        clipvalue: v,
    };
    let cases = [
        (Optimizer::sgd(), Clipping::default()),
        (sgd(0.9, false), Clipping::default()),
        (sgd(0.9, true), Clipping::default()),
        (Optimizer::adam(), Clipping::default()),
        (Optimizer::rmsprop(), Clipping::default()),
        (rms(0.5), Clipping::default()),
        (Optimizer::adam(), clip(Some(0.05), None, None)),
        (Optimizer::adam(), clip(None, Some(0.05), None)),
        (sgd(0.9, false), clip(None, None, Some(0.01))),
    ];
    let x = Tensor::F32(ArrayD::from_shape_fn(IxDyn(&[6, 5, 3]), |d| {
        ((d[0] * 15 + d[1] * 3 + d[2]) as f32 * 0.37).sin()
    }));
    let y = Tensor::F32(ArrayD::from_shape_fn(IxDyn(&[6, 2]), |d| {
        ((d[0] * 2 + d[1]) as f32 * 0.71).cos()
    }));
    let loss = Loss::MeanSquaredError;
    for (opt, clipping) in cases {
        let clipped = clipping != Clipping::default();
        let mut graph = build();
        graph.compile(opt, loss, &[]);
        graph.set_clipping(clipping).unwrap();
        let mut host = build();
        let mut state = OptimizerState::default();
        let trainable: Vec<bool> = host.weights().iter().map(|w| w.trainable).collect();
        for _ in 0..3 {
            graph
                .train_on_batch(std::slice::from_ref(&x), std::slice::from_ref(&y))
                .unwrap();
            // The host reference: gradients (which also moves BatchNorm's statistics),
            // Keras's clipping, then the host optimizer.
            let gr = host
                .gradients_of_heads(
                    std::slice::from_ref(&x),
                    std::slice::from_ref(&y),
                    &[(0, loss)],
                    true,
                )
                .unwrap();
            let mut grads = gr.grads;
            let norm = |g: &ArrayD<f32>| g.iter().map(|v| v * v).sum::<f32>().sqrt();
            if let Some(c) = clipping.clipnorm {
                for g in &mut grads {
                    let k = c / norm(g).max(c);
                    g.mapv_inplace(|v| v * k);
                }
            } else if let Some(c) = clipping.global_clipnorm {
                let n = grads.iter().map(|g| norm(g).powi(2)).sum::<f32>().sqrt();
                let k = c / n.max(c);
                for g in &mut grads {
                    g.mapv_inplace(|v| v * k);
                }
            } else if let Some(c) = clipping.clipvalue {
                for g in &mut grads {
                    g.mapv_inplace(|v| v.clamp(-c, c));
                }
            }
            let mut all = host.get_weights();
            let mut refs: Vec<&mut ArrayD<f32>> = all
                .iter_mut()
                .zip(&trainable)
                .filter(|(_, t)| **t)
                .map(|(w, _)| w)
                .collect();
            opt.apply_gradients(&mut state, &mut refs, &grads).unwrap();
            host.set_weights(all).unwrap();
        }
        let names: Vec<String> = host.weights().iter().map(|w| w.name.clone()).collect();
        for ((a, b), name) in graph
            .get_weights()
            .iter()
            .zip(host.get_weights())
            .zip(&names)
        {
            if clipped {
                for (p, q) in a.iter().zip(&b) {
                    assert!(
                        (p - q).abs() <= 1e-6 + 1e-5 * q.abs(),
                        "{opt:?} {clipping:?}: {name}: {p} vs {q}"
                    );
                }
            } else {
                assert_eq!(a, &b, "{opt:?}: {name}");
            }
        }
        assert!(
            graph.get_weights() != build().get_weights(),
            "{opt:?}: the steps changed nothing"
        );
    }
}
