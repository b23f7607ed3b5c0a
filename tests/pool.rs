//! The background preprocessing pool: predictions draw material that a pool
//! thread makes ahead of time with the HE offline phase, refilling below its
//! low-water mark, and correlations that its second thread makes ahead (the
//! private modes); without a pool, a prediction without material is refused.

use ndarray::Axis;
use secinfer_protocol::PoolPolicy;
use secinfer_tract_ext::PreprocessingPool;
use tract_onnx::prelude::*;

mod common;

#[test]
fn pool_keeps_predictions_supplied_and_results_exact() {
    let model = common::model("breast_cancer_mlp.onnx");
    let bytes = std::fs::read(&model).unwrap();
    let converted = common::convert_bytes(&bytes);
    let tol = common::tolerance(&converted, 64.0, 0.1);
    let pair = common::SecurePair::new(&converted);
    let data = secinfer::data::load("breast-cancer").unwrap();
    let plain = tract_onnx::onnx()
        .model_for_path(&model)
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();

    let backend = pair.client.backend().clone();
    let pool = PreprocessingPool::start(
        backend.clone(),
        PoolPolicy {
            batch: 40,
            low_water: 15,
        },
    )
    .unwrap();
    let mut max_err = 0f32;
    for k in 0..10 {
        // the pool's second thread makes the run's correlations ahead
        assert!(
            backend
                .wait_for_correlations(10, std::time::Duration::from_secs(120))
                .unwrap(),
            "the pool made no correlations for the next 10 inferences"
        );
        let x = data
            .inputs
            .slice_axis(Axis(0), (k * 10..k * 10 + 10).into())
            .to_owned()
            .into_tensor();
        let secure = pair.client.predict(tvec!(x.clone().into_tvalue())).unwrap();
        let reference = plain.run(tvec!(x.into_tvalue())).unwrap();
        let (s, r) = (
            secure[0].to_plain_array_view::<f32>().unwrap(),
            reference[0].to_plain_array_view::<f32>().unwrap(),
        );
        for (a, b) in s.iter().zip(r.iter()) {
            max_err = max_err.max((a - b).abs());
        }
    }
    assert!(f64::from(max_err) <= tol, "max error {max_err} > {tol}");
    // The pool made whole batches of 40 and the predictions took exactly 100.
    pool.stop();
    let left = backend.ready();
    assert_eq!((left + 100) % 40, 0, "{left} ready after the pool stopped");
    // No prediction waited for correlations to be made, and the pool kept
    // at most one batch's worth.
    let stats = backend.run_stats();
    assert_eq!(stats.batches, 10);
    assert_eq!(stats.correlations_made_on_demand, 0);
    let covered = backend.correlations_ready_for().unwrap();
    assert!(
        covered <= 40,
        "the pool kept correlations for {covered} inferences"
    );

    // Without a pool, running out of material is an error, not a hang.
    let x = data
        .inputs
        .slice_axis(Axis(0), (0..left + 1).into())
        .to_owned()
        .into_tensor();
    let e = format!(
        "{:#}",
        pair.client.predict(tvec!(x.into_tvalue())).unwrap_err()
    );
    assert!(e.contains("need preprocessing"), "{e}");
}

#[test]
fn pool_refuses_bad_batch_sizes() {
    let bytes = std::fs::read(common::model("breast_cancer_mlp.onnx")).unwrap();
    let pair = common::SecurePair::new(&common::convert_bytes(&bytes));
    for batch in [0, secinfer_tract_ext::MAX_BATCH + 1] {
        let r = PreprocessingPool::start(
            pair.client.backend().clone(),
            PoolPolicy {
                batch,
                low_water: 1,
            },
        );
        assert!(r.is_err(), "batch {batch} accepted");
    }
}

/// What a client keeps ready and makes for one run (its correlation
/// budget), beside the largest correlation request it sends as the server
/// prices it before the work, fits the server's default per-session
/// correlation limit, which `serve` also takes as the least
/// `--max-correlation-mib` (a lower limit used to end sessions whose pool
/// had filled): with both backends, for every kind of correlation a
/// request may be full of.
#[test]
fn a_clients_correlations_fit_the_servers_least_correlation_limit() {
    use secinfer_ot::{Backend, Demand, OtEngine, Role};
    use secinfer_protocol::DEFAULT_MAX_OT_BYTES;
    use secinfer_tract_ext::client::{DEFAULT_CORRELATION_BUDGET, MAX_OTS_PER_REQUEST};
    let full = MAX_OTS_PER_REQUEST;
    let none = Demand::default();
    let parts = [
        Demand {
            triples: full,
            ..none
        },
        Demand {
            word_ots_client_sends: full,
            word_ots_server_sends: full,
            ..none
        },
        Demand {
            bit_ots_client_sends: full,
            bit_ots_server_sends: full,
            ..none
        },
        Demand {
            word_ots_client_sends: full,
            bit_ots_server_sends: full,
            ..none
        },
        Demand {
            bit_ots_client_sends: full,
            word_ots_server_sends: full,
            ..none
        },
    ];
    for backend in [Backend::Silent, Backend::Iknp] {
        let mut client = OtEngine::client(backend, u64::MAX).unwrap();
        let mut server = OtEngine::new(Role::Server, u64::MAX).unwrap();
        let mut next = Some(client.start_setup().unwrap());
        let mut to_server = true;
        while let Some(m) = next.take() {
            next = if to_server {
                server.handle(m).unwrap()
            } else {
                client.handle(m).unwrap()
            };
            to_server = !to_server;
        }
        for part in parts {
            let request = client.request(part).unwrap();
            let largest = server.growth_bound(&request);
            assert!(
                largest > 0 && DEFAULT_CORRELATION_BUDGET + largest <= DEFAULT_MAX_OT_BYTES,
                "{backend:?}: a request for {part:?} is priced at {} MiB",
                largest >> 20
            );
            let answer = server.handle(request).unwrap().unwrap();
            assert_eq!(client.handle(answer).unwrap(), None);
            // (not kept: the next request starts from empty stores)
            client.store_mut().split_off(&part).unwrap();
            server.store_mut().split_off(&part).unwrap();
        }
    }
}
