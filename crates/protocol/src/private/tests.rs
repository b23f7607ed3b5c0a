//! Private batches end to end inside the protocol crate: a two-layer dense
//! model, HE material from the test dealer, correlations from real OT
//! engines (base OTs and IKNP), the client's and the server's runs shuttled
//! against each other in one thread. No sockets.

use std::sync::Arc;

use ndarray::{Array2, ArrayD, IxDyn};
use secinfer_model::{LayerSpec, LinearKind, Program, Reveal, Sign, Step, StepOp};
use secinfer_ot::{OtEngine, Role};
use secinfer_ring::{Ring, RingTensor};

use super::*;
use crate::{ClientSession, InsecureLocalDealer, MaskedLinear, OpId, ProtocolError, ServerSession};

const BITS: u32 = 37;
const F: u32 = 8;

fn ring() -> Ring {
    Ring::new(BITS).unwrap()
}

/// y1 = relu(trunc(x·W0 + b0)), logits = y1·W1 + b1; x [n, 3], hidden 4, out 2.
struct TwoLayers {
    layers: Vec<LayerSpec>,
    w: Vec<Array2<i64>>,
    b: Vec<Vec<i64>>,
    program: Arc<Program>,
}

fn dense(op: u32, k: usize, m: usize) -> LayerSpec {
    LayerSpec {
        op_id: op,
        source_node: format!("fc{op}"),
        source_op: "Gemm".into(),
        kind: LinearKind::MatMul,
        weight_shape: vec![k, m],
        input_shape: vec![1, k],
        output_shape: vec![1, m],
        batched: true,
        ring_bits: BITS,
        input_frac_bits: F,
        weight_frac_bits: F,
        input_bound: 4.0,
    }
}

fn step(op: StepOp, inputs: &[&str], output: &str, shape: &[usize], frac_bits: u32) -> Step {
    Step {
        op,
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        output: output.into(),
        shape: shape.to_vec(),
        frac_bits,
        source: output.into(),
    }
}

impl TwoLayers {
    fn new(reveal: Reveal, w0: Vec<i64>, w1: Vec<i64>) -> TwoLayers {
        let layers = vec![dense(0, 3, 4), dense(1, 4, 2)];
        let mut steps = vec![
            step(
                StepOp::Input {
                    tensor: "x".into(),
                    lo: secinfer_model::program::ordered::F32(-4.0),
                    hi: secinfer_model::program::ordered::F32(4.0),
                },
                &[],
                "s:x",
                &[1, 3],
                F,
            ),
            step(StepOp::Linear { op: 0 }, &["s:x"], "s:h", &[1, 4], 2 * F),
            step(
                StepOp::Truncate {
                    shift: F,
                    sign: Sign::Signed,
                },
                &["s:h"],
                "s:t",
                &[1, 4],
                F,
            ),
            step(StepOp::Relu { bits: 24 }, &["s:t"], "s:r", &[1, 4], F),
            step(StepOp::Linear { op: 1 }, &["s:r"], "s:y", &[1, 2], 2 * F),
        ];
        match reveal {
            Reveal::Argmax => {
                steps.push(step(
                    StepOp::ArgMax { bits: 30 },
                    &["s:y"],
                    "s:i",
                    &[1, 1],
                    0,
                ));
                steps.push(step(StepOp::Reveal, &["s:i"], "class", &[1, 1], 0));
            }
            _ => steps.push(step(StepOp::Reveal, &["s:y"], "logits", &[1, 2], 2 * F)),
        }
        let program = Program {
            reveal,
            batched: true,
            ring_bits: BITS,
            steps,
        };
        program.validate(&layers).unwrap();
        TwoLayers {
            layers,
            w: vec![
                Array2::from_shape_vec((3, 4), w0).unwrap(),
                Array2::from_shape_vec((4, 2), w1).unwrap(),
            ],
            b: vec![vec![300, -200, 0, 77], vec![-1000, 2000]],
            program: Arc::new(program),
        }
    }

    fn standard(reveal: Reveal) -> TwoLayers {
        TwoLayers::new(
            reveal,
            vec![256, -128, 64, 32, -300, 17, 90, -256, 5, 44, -80, 200],
            vec![100, -50, -70, 256, 33, 12, -256, 90],
        )
    }

    /// The plain result on integers (fixed point), truncation exact.
    fn clear(&self, x: &[i64]) -> Vec<i64> {
        let n = x.len() / 3;
        let mut out = Vec::new();
        for s in 0..n {
            let h: Vec<i64> = (0..4)
                .map(|j| {
                    let v = (0..3)
                        .map(|i| x[s * 3 + i] * self.w[0][[i, j]])
                        .sum::<i64>()
                        + self.b[0][j];
                    (v as f64 / 2f64.powi(F as i32)).round().max(0.0) as i64
                })
                .collect();
            for j in 0..2 {
                out.push((0..4).map(|i| h[i] * self.w[1][[i, j]]).sum::<i64>() + self.b[1][j]);
            }
        }
        out
    }
}

impl MaskedLinear for TwoLayers {
    fn layers(&self) -> &[LayerSpec] {
        &self.layers
    }

    fn evaluate(&self, op: OpId, x: RingTensor) -> Result<RingTensor, String> {
        let r = ring();
        let (w, b) = (&self.w[op as usize], &self.b[op as usize]);
        let x2 = x
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|e| e.to_string())?;
        let wr = w.mapv(|v| r.from_signed(v));
        let mut y = secinfer_ring::matmul(x2.view(), wr.view()).map_err(|e| e.to_string())?;
        for mut row in y.rows_mut() {
            for (v, b) in row.iter_mut().zip(b) {
                *v = r.reduce(v.wrapping_add(r.from_signed(*b)));
            }
        }
        Ok(y.into_dyn())
    }

    fn he_form(&self, _: OpId) -> Result<&dyn secinfer_he::LinearForm, String> {
        Err("these tests use the dealer".into())
    }

    fn program(&self) -> Option<&Arc<Program>> {
        Some(&self.program)
    }
}

struct Pair {
    model: Arc<TwoLayers>,
    client: ClientSession,
    server: ServerSession<TwoLayers>,
    ot: OtEngine,
}

/// Sessions with `count` inferences of HE material (dealer) and enough
/// correlations (real OT) for `count` inferences.
fn pair(model: TwoLayers, count: usize) -> Pair {
    let model = Arc::new(model);
    let mut client = ClientSession::new(model.layers.clone());
    let mut server = ServerSession::new(model.clone());
    let mut dealer = InsecureLocalDealer::new().unwrap();
    for (c, s) in dealer.deal(model.as_ref(), count).unwrap() {
        client.accept_preprocessing(c).unwrap();
        server.accept_preprocessing(s).unwrap();
    }
    let mut ot = OtEngine::new(Role::Client, u64::MAX).unwrap();
    let mut msg = Some(ot.start_setup().unwrap());
    while let Some(m) = msg.take() {
        if let Some(reply) = server.handle_ot(m).unwrap() {
            msg = ot.handle(reply).unwrap();
        }
    }
    let demand = program_cost(&model.program, &model.layers, count)
        .unwrap()
        .demand;
    let req = ot.request(demand).unwrap();
    let reply = server
        .handle_ot(req)
        .unwrap()
        .expect("the server answers an extension");
    assert!(ot.handle(reply).unwrap().is_none());
    Pair {
        model,
        client,
        server,
        ot,
    }
}

fn encode(x: &[i64], n: usize) -> RingTensor {
    ArrayD::from_shape_vec(
        IxDyn(&[n, 3]),
        x.iter().map(|&v| ring().from_signed(v)).collect(),
    )
    .unwrap()
}

/// Shuttles messages between two runs until both end.
fn drive(
    client: &mut PrivateRun,
    server: &mut PrivateRun,
) -> (
    Result<RunReport, ProtocolError>,
    Result<RunReport, ProtocolError>,
) {
    let (mut a, mut b) = (None, None);
    loop {
        let mut moved = false;
        while let Some(m) = client.poll_transmit() {
            server.handle(m);
            moved = true;
        }
        while let Some(m) = server.poll_transmit() {
            client.handle(m);
            moved = true;
        }
        a = a.or_else(|| client.poll_output());
        b = b.or_else(|| server.poll_output());
        if let (Some(a), Some(b)) = (&a, &b) {
            return (a.clone(), b.clone());
        }
        assert!(moved, "both runs wait for each other");
    }
}

impl Pair {
    /// Begins the client's run of one batch on `x` (three features per
    /// inference): its ids and exactly the batch's correlations taken.
    fn begin(&mut self, x: &[i64]) -> Result<(PrivateMessage, PrivateRun), ProtocolError> {
        let n = x.len() / 3;
        let ids = self.client.reserve(n)?;
        let demand = program_cost(&self.model.program, &self.model.layers, n)?.demand;
        let position = self.ot.position();
        let corr = self.ot.store_mut().split_off(&demand)?;
        self.client.begin_private(
            &self.model.program,
            &ids,
            vec![encode(x, n)],
            corr,
            position,
        )
    }

    /// Runs one batch; returns the client's report.
    fn batch(&mut self, x: &[i64]) -> Result<RunReport, ProtocolError> {
        let (begin, mut crun) = self.begin(x)?;
        let mut srun = self.server.begin_private(begin)?;
        let (a, b) = drive(&mut crun, &mut srun);
        b?;
        a
    }
}

#[test]
fn a_private_batch_reveals_the_logits_up_to_the_truncation() {
    let model = TwoLayers::standard(Reveal::Logits);
    let mut p = pair(model, 70);
    for n in [1usize, 5, 64] {
        let x: Vec<i64> = (0..3 * n as i64).map(|i| (i * 37 % 1000) - 500).collect();
        let report = p.batch(&x).unwrap();
        let expected = p.model.clear(&x);
        let got = &report.revealed[0];
        assert_eq!(got.name, "logits");
        assert_eq!(got.values.shape(), &[n, 2]);
        assert!(!got.index);
        // one unit of error per hidden value, times |W1|
        let tolerance = 256 * 4 + 1;
        for (g, e) in got.values.iter().zip(&expected) {
            let g = ring().to_signed(*g);
            assert!(
                (g - e).abs() <= tolerance,
                "got {g}, expected {e} ± {tolerance}"
            );
        }
    }
}

#[test]
fn argmax_mode_reveals_only_the_first_maximal_index() {
    // Output 1 = 2·output 0 + const: ties and clear winners both occur.
    let model = TwoLayers::standard(Reveal::Argmax);
    let mut p = pair(model, 40);
    let x: Vec<i64> = (0..120i64).map(|i| ((i * 7919) % 1600) - 800).collect();
    let report = p.batch(&x).unwrap();
    assert_eq!(report.revealed.len(), 1);
    let got = &report.revealed[0];
    assert!(got.index && got.frac_bits == 0);
    let expected = p.model.clear(&x);
    for (s, g) in got.values.iter().enumerate() {
        let (a, b) = (expected[2 * s], expected[2 * s + 1]);
        // within the truncation's error a near-tie may go either way
        if (a - b).abs() > 256 * 4 + 1 {
            assert_eq!(*g, if b > a { 1 } else { 0 }, "sample {s}: logits {a}, {b}");
        }
    }
}

/// While the OT engine is checked out for a correlation message, the
/// session counts what the engine held, refuses a second correlation
/// message and a private batch's start by name (taking nothing), and
/// answers everything as before once the engine is back.
#[test]
fn a_checked_out_ot_engine_is_counted_and_guarded_until_it_is_back() {
    let model = TwoLayers::standard(Reveal::Logits);
    let mut p = pair(model, 8);
    let before = p.server.stored_bytes();
    assert!(p.server.ot_bytes() > 0);
    let mut engine = p.server.check_out_ot().unwrap();
    assert_eq!(p.server.stored_bytes(), before, "counted while out");
    let e = p.server.check_out_ot().unwrap_err();
    assert!(
        e.to_string().contains("while another is being handled"),
        "{e}"
    );
    // a private batch's start is refused and takes nothing
    let (begin, mut crun) = p.begin(&[1, 2, 3, 4, 5, 6]).unwrap();
    let demand = program_cost(&p.model.program, &p.model.layers, 2)
        .unwrap()
        .demand;
    let e = p.server.begin_private(begin.clone()).unwrap_err();
    assert!(
        e.to_string()
            .contains("began while a correlation batch was being made"),
        "{e}"
    );
    // the checked-out engine answers a batch without the session
    let req = p.ot.request(demand).unwrap();
    let reply = engine.handle(req).unwrap().expect("an answer");
    assert!(p.ot.handle(reply).unwrap().is_none());
    p.server.check_in_ot(engine);
    assert!(p.server.stored_bytes() > before, "the new batch counts");
    // back in: the refused start goes through, and runs
    let mut srun = p.server.begin_private(begin).unwrap();
    let (a, b) = drive(&mut crun, &mut srun);
    b.unwrap();
    assert_eq!(a.unwrap().revealed[0].values.shape(), &[2, 2]);
}

#[test]
fn ids_and_correlations_are_single_use_on_the_server() {
    let model = TwoLayers::standard(Reveal::Logits);
    let mut p = pair(model, 4);
    let position = p.ot.position();
    let (begin, _run) = p.begin(&[1, 2, 3, 4, 5, 6]).unwrap();
    p.server.begin_private(begin.clone()).unwrap();
    // the same ids again: refused as reuse
    let e = p.server.begin_private(begin).unwrap_err();
    assert!(matches!(e, ProtocolError::Reused { .. }), "{e}");
    // fresh ids but the old correlation position: refused as reuse
    let fresh = p.client.reserve(1).unwrap();
    let e = p
        .server
        .begin_private(PrivateMessage::Begin {
            ids: fresh.clone(),
            position,
        })
        .unwrap_err();
    assert!(e.to_string().contains("reuse"), "{e}");
    // that refusal took nothing: the right position still works
    let e = p.server.begin_private(PrivateMessage::Begin {
        ids: fresh,
        position: p.ot.position(),
    });
    assert!(e.is_ok(), "{e:?}");
}

#[test]
fn a_malformed_step_message_is_an_error_naming_the_step() {
    let model = TwoLayers::standard(Reveal::Logits);
    let mut p = pair(model, 1);
    let (begin, mut crun) = p.begin(&[1, 2, 3]).unwrap();
    let mut srun = p.server.begin_private(begin).unwrap();
    let mut m = crun.poll_transmit().expect("the client's masked input");
    assert_eq!(m.step, 1, "the first message is the linear step's");
    m.payload.pop();
    srun.handle(m);
    assert!(srun.poll_transmit().is_none());
    let e = srun
        .poll_output()
        .expect("the server stops")
        .unwrap_err()
        .to_string();
    assert!(e.contains("step 1") && e.contains("bytes"), "{e}");
}

#[test]
fn in_a_private_mode_the_server_never_answers_a_linear_op_alone() {
    // The activations-mode request on private-mode material: the answer
    // would be W·x + b for an x the client chose (unit vectors give W away).
    for reveal in [Reveal::Logits, Reveal::Argmax] {
        let mut p = pair(TwoLayers::standard(reveal), 2);
        let ids = p.client.reserve(1).unwrap();
        let unit = ArrayD::from_shape_vec(IxDyn(&[1, 4]), vec![1, 0, 0, 0]).unwrap();
        let request = p.client.mask(1, &ids, &unit).unwrap();
        let e = p.server.handle(request).unwrap_err().to_string();
        assert!(
            e.contains("private batches") && e.contains(reveal.as_str()),
            "{e}"
        );
        // and the refusal consumed nothing: a private batch on those ids
        // is still refused only because the client spent its own half
        assert_eq!(p.server.pending_material(), 2);
    }
}
