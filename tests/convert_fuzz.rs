//! Corrupted models never crash the converter: bytes of real models are
//! flipped, truncated and spliced, and `convert` must return Ok or an error,
//! never panic. (A fixed seed keeps the run reproducible.)

use rand::{Rng, SeedableRng};
use secinfer_converter::{Options, convert};

mod common;

#[test]
fn mutated_models_give_errors_not_panics() {
    let sources = ["breast_cancer_mlp.onnx", "mnist_mlp.onnx"];
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(7);
    let mut outcomes = (0, 0);
    for source in sources {
        let original = std::fs::read(common::model(source)).unwrap();
        for round in 0..150 {
            let mut bytes = original.clone();
            match round % 3 {
                0 => {
                    for _ in 0..1 + rng.next_u32() % 8 {
                        let at = rng.next_u32() as usize % bytes.len();
                        bytes[at] ^= 1 << (rng.next_u32() % 8);
                    }
                }
                1 => bytes.truncate(rng.next_u32() as usize % bytes.len()),
                _ => {
                    // Mutate only the first kilobyte: graph structure and attributes, not weights.
                    let at = rng.next_u32() as usize % bytes.len().min(1024);
                    bytes[at] = rng.next_u32() as u8;
                }
            }
            let result =
                std::panic::catch_unwind(|| convert(&bytes, &Options::default()).map(|_| ()));
            match result {
                Ok(Ok(())) => outcomes.0 += 1,
                Ok(Err(e)) => {
                    assert!(!e.to_string().is_empty());
                    outcomes.1 += 1
                }
                Err(_) => panic!("{source}, round {round}: the converter panicked"),
            }
        }
    }
    println!(
        "converted {} mutated models, refused {}",
        outcomes.0, outcomes.1
    );
    assert!(
        outcomes.1 > 0,
        "no mutation was refused: the mutations are not reaching the parser"
    );
}

#[test]
fn mutated_converted_files_fail_to_load_cleanly() {
    use prost::Message;
    use secinfer_tract_ext::{ClientModel, InMemoryChannel, ServerModel};
    use std::sync::Arc;
    let original = std::fs::read(common::model("breast_cancer_mlp.onnx")).unwrap();
    let converted = convert(&original, &Options::default()).unwrap();
    let server_bytes = converted.server.encode_to_vec();
    let client_bytes = converted.client.encode_to_vec();
    let server = Arc::new(ServerModel::from_bytes(&server_bytes).unwrap());
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(11);
    let mut refused = 0;
    for round in 0..200 {
        let (mut bytes, is_server) = if round % 2 == 0 {
            (server_bytes.clone(), true)
        } else {
            (client_bytes.clone(), false)
        };
        for _ in 0..1 + rng.next_u32() % 4 {
            let at = rng.next_u32() as usize % bytes.len();
            bytes[at] ^= 1 << (rng.next_u32() % 8);
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if is_server {
                ServerModel::from_bytes(&bytes).is_ok()
            } else {
                ClientModel::from_bytes(&bytes, InMemoryChannel::new(server.clone())).is_ok()
            }
        }));
        match result {
            Ok(true) => {}
            Ok(false) => refused += 1,
            Err(_) => panic!(
                "round {round}: loading a damaged {} file panicked",
                if is_server { "server" } else { "client" }
            ),
        }
    }
    // Any flip in a weight changes the digest, so most damaged server files are refused.
    assert!(
        refused > 50,
        "only {refused} of 200 damaged files were refused"
    );
}
