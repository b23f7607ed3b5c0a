//! What the client refuses: inputs that would not survive fixed-point
//! encoding (NaN, values beyond the converted bound) and wrong shapes, each
//! with a message naming the problem, and the session stays usable after.

use tract_onnx::prelude::*;

mod common;

fn pair_in(reveal: secinfer_model::Reveal) -> common::SecurePair {
    let bytes = std::fs::read(common::model("mnist_mlp.onnx")).unwrap();
    let options = secinfer_converter::Options {
        reveal,
        ..Default::default()
    };
    common::SecurePair::new(&secinfer_converter::convert(&bytes, &options).unwrap())
}

fn pair() -> common::SecurePair {
    pair_in(secinfer_model::Reveal::Logits)
}

fn image(fill: f32) -> Tensor {
    tract_ndarray::ArrayD::from_elem(vec![1, 1, 28, 28], fill).into_tensor()
}

#[test]
fn nan_and_out_of_range_inputs_are_refused_by_name() {
    // In logits mode the program's input is named; in activations mode the
    // linear op whose input it is.
    for (reveal, names) in [
        (
            secinfer_model::Reveal::Logits,
            "input '/net/net.0/Flatten_output_0'",
        ),
        (secinfer_model::Reveal::Activations, "op 0"),
    ] {
        let mut p = pair_in(reveal);
        let mut nan = image(0.5);
        nan.to_plain_array_view_mut::<f32>().unwrap()[[0, 0, 3, 4]] = f32::NAN;
        let e = format!("{:#}", p.try_predict(nan).unwrap_err());
        assert!(e.contains("not a number") && e.contains(names), "{e}");

        let e = format!("{:#}", p.try_predict(image(1e6)).unwrap_err());
        assert!(
            e.contains("out of range") && e.contains("--input-bound"),
            "{e}"
        );

        // The session survives refused inputs.
        let ok = p
            .try_predict(image(0.25))
            .expect("a valid input still works");
        assert_eq!(ok[0].shape(), &[1, 10]);
    }
}

#[test]
fn wrong_input_shape_is_an_error_not_a_crash() {
    let mut p = pair();
    let wrong = tract_ndarray::ArrayD::from_elem(vec![1, 1, 27, 28], 0.5f32).into_tensor();
    assert!(p.try_predict(wrong).is_err());
    assert!(p.try_predict(image(0.5)).is_ok());
}

/// A round trip that fails (a dropped connection, a refused request) must
/// not leave its op "in flight" for the rest of the session: the next
/// prediction uses the op again and is answered.
#[test]
fn a_failed_round_trip_leaves_the_op_usable() {
    use prost::Message;
    let bytes = std::fs::read(common::model("mnist_mlp.onnx")).unwrap();
    let options = secinfer_converter::Options {
        reveal: secinfer_model::Reveal::Activations,
        ..Default::default()
    };
    let converted = secinfer_converter::convert(&bytes, &options).unwrap();
    let server = std::sync::Arc::new(
        secinfer_tract_ext::ServerModel::from_bytes(&converted.server.encode_to_vec()).unwrap(),
    );
    use secinfer_protocol::Channel as _;
    // the first online round trip fails, as a dropped connection's would
    let failed = std::sync::atomic::AtomicBool::new(false);
    let client = secinfer_tract_ext::ClientModel::from_bytes(
        &converted.client.encode_to_vec(),
        common::InterceptedChannel {
            inner: secinfer_tract_ext::InMemoryChannel::new(server),
            on_round_trip: Box::new(move |inner, request| {
                if !failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    anyhow::bail!("connection lost (simulated)");
                }
                inner.round_trip(request)
            }),
            max_message_bytes: usize::MAX,
        },
    )
    .unwrap();
    client.backend().preprocess(2).unwrap();
    let e = format!(
        "{:#}",
        client.predict(tvec!(image(0.5).into_tvalue())).unwrap_err()
    );
    assert!(e.contains("connection lost"), "{e}");
    let out = client
        .predict(tvec!(image(0.5).into_tvalue()))
        .expect("the op is usable again");
    assert_eq!(out[0].shape(), &[1, 10]);
}
