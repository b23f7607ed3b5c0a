//! tract plugin for secinfer's `SecureLinear` op.
//!
//! One ONNX op, two roles, told apart by arity:
//! - in `server.onnx` a SecureLinear node reads `(masked input, weight, bias)`;
//!   it becomes [`server::ServerSecureLinear`], which evaluates `W·x + b` in
//!   Z_2^k with the ring kernels on u64 tensors (tract's own MatMul and Conv
//!   do not support integer rings). [`server::ServerModel`] loads the file,
//!   checks its digest and builds one tract plan per op; it is the server
//!   session's [`secinfer_protocol::MaskedLinear`].
//! - in `client.onnx` a SecureLinear node reads one f32 tensor and has no
//!   weights. It is a placeholder until [`client::ClientModel`] binds it to a
//!   live session after loading ([`bind_client_ops`]); the bound op encodes
//!   its input, masks it, does the round trip and decodes the result, so the
//!   rest of the client graph runs in ordinary tract f32.
//!
//! Design choice: placeholders bound after loading (not one file per segment
//! plus a manifest), because the client graph may branch and join around
//! secure ops (residual connections) and tract then schedules it as usual.
//! The batch dimension stays symbolic on both sides.
#![forbid(unsafe_code)]

pub mod client;
pub mod he_form;
pub mod private;
pub mod server;

use std::sync::Arc;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use secinfer_model::{LayerSpec, OP_TYPE};

pub use client::{
    Channel, ClientModel, InMemoryChannel, MAX_BATCH, PreprocessingPool, RunStats,
    SecureLinearBackend, SessionBackend, Traffic,
};
pub use he_form::HeLayer;
pub use server::{ServerModel, ServerSecureLinear};

/// tract's ONNX front end with SecureLinear registered.
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    register(&mut onnx.op_register);
    onnx
}

/// Registers SecureLinear in an op table.
pub fn register(reg: &mut OnnxOpRegister) {
    reg.insert(OP_TYPE, build);
}

fn build(
    _ctx: &ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    // tract keys ops by op_type only: the domain is checked here, by from_node.
    let spec = LayerSpec::from_node(node)?;
    Ok((
        expand(SecureLinearExpansion {
            spec: Arc::new(spec),
            backend: None,
        }),
        vec![],
    ))
}

/// The op as parsed, before typing. Carries the client backend once bound.
#[derive(Debug, Clone)]
pub struct SecureLinearExpansion {
    /// what the op computes
    pub spec: Arc<LayerSpec>,
    /// the client session it talks to (client role only)
    pub backend: Option<Arc<dyn SecureLinearBackend>>,
}

/// Output shape for an input shape, batch axis kept symbolic.
pub(crate) fn output_shape(spec: &LayerSpec, input: &[TDim]) -> TractResult<TVec<TDim>> {
    let concrete: Vec<usize> = input
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if i == 0 && spec.batched {
                Ok(1)
            } else {
                d.to_usize().map_err(|e| format_err!("{e:?}"))
            }
        })
        .collect::<TractResult<_>>()
        .with_context(|| {
            format!(
                "SecureLinear op {}: only the batch axis may be symbolic, got {input:?}",
                spec.op_id
            )
        })?;
    spec.samples_in_input(&concrete)
        .map_err(|e| format_err!(e))?;
    let out = spec
        .compute_output_shape(&concrete)
        .map_err(|e| format_err!(e))?;
    Ok(out
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            if i == 0 && spec.batched {
                input[0].clone()
            } else {
                d.into()
            }
        })
        .collect())
}

impl Expansion for SecureLinearExpansion {
    fn name(&self) -> StaticName {
        "SecureLinear".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "op {} from {} '{}'",
            self.spec.op_id, self.spec.source_op, self.spec.source_node
        )])
    }

    fn runs_out_of_plan(&self) -> bool {
        // The client op talks to a server: never evaluate it while optimising.
        false
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        if inputs.len() == 3 {
            s.equals(&inputs[0].datum_type, u64::datum_type())?;
            s.equals(&outputs[0].datum_type, u64::datum_type())?;
        } else {
            check_input_arity(inputs, 1)?;
            s.equals(&outputs[0].datum_type, f32::datum_type())?;
        }
        s.equals(&inputs[0].rank, self.spec.input_shape.len() as i64)?;
        s.given(&inputs[0].shape, move |s, shape| {
            let out = output_shape(&self.spec, &shape)?;
            s.equals(&outputs[0].shape, ShapeFactoid::from(out))
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        match inputs.len() {
            3 => {
                let konst = |ix: usize, what: &str| -> TractResult<Arc<Tensor>> {
                    model
                        .outlet_fact(inputs[ix])?
                        .konst
                        .clone()
                        .with_context(|| {
                            format!(
                                "SecureLinear op {}: {what} must be an initializer",
                                self.spec.op_id
                            )
                        })
                };
                let (weight, bias) = (konst(1, "weight")?, konst(2, "bias")?);
                let op = ServerSecureLinear::new(self.spec.clone(), &weight, &bias)?;
                model.wire_node(prefix, op, &inputs[..1])
            }
            1 => {
                let backend = self.backend.clone().with_context(|| {
                    format!(
                        "SecureLinear op {} is not bound to a client session",
                        self.spec.op_id
                    )
                })?;
                let op = client::ClientSecureLinear {
                    spec: self.spec.clone(),
                    backend,
                };
                model.wire_node(prefix, op, inputs)
            }
            n => bail!(
                "SecureLinear op {} has {n} inputs; expected 1 (client) or 3 (server)",
                self.spec.op_id
            ),
        }
    }
}

/// Binds every SecureLinear placeholder of a loaded client model to `backend`.
/// Returns the number of ops bound.
pub fn bind_client_ops(
    model: &mut InferenceModel,
    backend: Arc<dyn SecureLinearBackend>,
) -> TractResult<usize> {
    let mut bound = 0;
    for node in model.nodes_mut() {
        if let Some(op) = node.op_as_mut::<Box<dyn Expansion>>()
            && let Some(op) = op.as_any_mut().downcast_mut::<SecureLinearExpansion>()
        {
            op.backend = Some(backend.clone());
            bound += 1;
        }
    }
    Ok(bound)
}
