//! What `convert` prints: the linear layers with their scales and headroom,
//! and in the private modes the secure program with each comparison's width;
//! in `activations` mode, the warning that the client can reconstruct the
//! weights.

use std::fmt::Write;

use secinfer_converter::Converted;
use secinfer_model::{Reveal, StepOp};

/// The conversion summary.
pub fn conversion(c: &Converted, ring_bits: u32) -> String {
    let mut out = String::new();
    let private = c.reveal.is_private();
    let _ = writeln!(out, "--reveal {}: {}", c.reveal, what_is_revealed(c.reveal));
    let _ = writeln!(
        out,
        "{} SecureLinear ops in Z_2^{ring_bits}{}:",
        c.layers.len(),
        if private {
            " (|x| <=: bound proven from the input bound; headroom below 2^(k-2))"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "  {:>3}  {:<34} {:<15} {:>10} {:>9} {:>5} {:>5}  {:>9}  folded",
        "op", "source", "kind", "|x| <=", "seen", "f_in", "f_w", "headroom"
    );
    for l in &c.layers {
        let s = &l.spec;
        let seen = l.observed_max.map_or("".into(), |m| format!("{m:.3}"));
        let _ = writeln!(
            out,
            "  {:>3}  {:<34} {:<15} {:>10} {:>9} {:>5} {:>5}  {:>6.1} b  {}",
            s.op_id,
            format!("{} '{}'", s.source_op, s.source_node),
            s.kind.tag(),
            format!("{:.4}", s.input_bound),
            seen,
            s.input_frac_bits,
            s.weight_frac_bits,
            l.headroom_bits,
            l.folded.join(", ")
        );
    }
    offline_packings(&mut out, c);
    if let Some(p) = &c.program {
        let compares: usize = p
            .steps
            .iter()
            .filter(|s| s.op.compare_bits().is_some())
            .count();
        let _ = writeln!(
            out,
            "secure program: {} steps on shares, {compares} of them compare jointly:",
            p.steps.len()
        );
        for (i, s) in p.steps.iter().enumerate() {
            let detail = match &s.op {
                StepOp::Linear { op } => format!("op {op}"),
                StepOp::Truncate { shift, sign } => format!("by {shift} bits, {sign:?}"),
                StepOp::Input { lo, hi, .. } => format!("x in [{}, {}]", lo.0, hi.0),
                op => op
                    .compare_bits()
                    .map(|b| format!("on {b} bits"))
                    .unwrap_or_default(),
            };
            let _ = writeln!(
                out,
                "  {i:>3}  {:<20} {:<18} f={:<3} {:<24} {}",
                s.op.op_type(),
                format!("{:?}", s.shape),
                s.frac_bits,
                detail,
                s.source
            );
        }
    }
    if !c.folded_constants.is_empty() {
        let _ = writeln!(
            out,
            "constant subgraphs evaluated: {}",
            c.folded_constants.join(", ")
        );
    }
    for k in &c.client_constants {
        let _ = writeln!(
            out,
            "note: constant {k} stays in the client graph (not a linear layer's weight)"
        );
    }
    if !private {
        let _ = writeln!(out, "WARNING: {}", Reveal::ACTIVATIONS_WARNING);
    }
    let _ = write!(out, "model digest {}", c.digest);
    out
}

/// One sentence per mode.
pub fn what_is_revealed(r: Reveal) -> &'static str {
    match r {
        Reveal::Logits => {
            "the client learns the model's outputs and nothing else; activations stay secret-shared"
        }
        Reveal::Argmax => {
            "the client learns only the class index; activations and logits stay secret-shared"
        }
        Reveal::Activations => {
            "the client learns every linear layer's output (fast mode; it can reconstruct the weights)"
        }
    }
}

/// How the offline phase lays out each op for one inference and for the
/// largest batch the memory bounds allow (the cost model's choice;
/// docs/offline.md), so that an op that takes no packing by polynomial
/// products shows; and the batch sizes a client will use.
fn offline_packings(out: &mut String, c: &Converted) {
    let specs: Vec<_> = c.layers.iter().map(|l| l.spec.clone()).collect();
    let params = match secinfer_protocol::params_for(&specs) {
        Ok(p) => p,
        Err(e) => {
            let _ = writeln!(out, "offline packing: unavailable ({e})");
            return;
        }
    };
    let (full, efficient) = match (
        secinfer_protocol::offline::max_batch(&params, &specs),
        secinfer_protocol::offline::efficient_batch(&params, &specs),
    ) {
        (Ok(m), Ok(e)) => (m, e),
        (Err(e), _) | (_, Err(e)) => {
            let _ = writeln!(out, "offline phase: impossible: {e}");
            return;
        }
    };
    let _ = writeln!(
        out,
        "offline batches: at most {full} inferences (memory bounds), {efficient} by default (the cost model's most efficient size)"
    );
    let _ = writeln!(
        out,
        "offline packing (HE ciphertexts up + replies down) for 1 inference / a batch of {full}:"
    );
    for spec in &specs {
        let show =
            |count: usize| match secinfer_protocol::offline::packing_for(&params, spec, count) {
                Ok(p) => format!(
                    "{} ({} + {})",
                    p.describe(),
                    p.input_ciphertexts(),
                    p.output_ciphertexts()
                ),
                Err(e) => format!("none: {e}"),
            };
        let _ = writeln!(out, "  {:>3}  {}  /  {}", spec.op_id, show(1), show(full));
    }
}
