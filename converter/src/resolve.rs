//! Pass 4: shapes. tract analyses the folded model to find the input shape of
//! every linear layer; with it, Conv padding (auto_pad, explicit pads) and
//! ConvTranspose output shapes become explicit geometry, and the batch axis is
//! decided: axis 0 is a batch axis when it is the model input's symbolic
//! first dimension; otherwise all dimensions must be fixed.

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{DimLike, format_err};

use secinfer_model::LinearKind;
use secinfer_ring::ConvGeometry;

use crate::ConvertError;
use crate::extract::{ConvAttrs, LinearLayer, RawKind};
use crate::graph::{Graph, catch_tract};

/// A layer's shapes as the converted model records them.
#[derive(Debug, Clone)]
pub struct LayerShapes {
    /// the resolved kind
    pub kind: LinearKind,
    /// one sample's input shape
    pub input_shape: Vec<usize>,
    /// one sample's output shape
    pub output_shape: Vec<usize>,
    /// whether axis 0 is the batch axis
    pub batched: bool,
}

/// The model loaded in tract with the tensors `names` as its outputs.
fn with_outputs(proto: &tract_onnx::pb::ModelProto, names: &[&str]) -> TractResult<InferenceModel> {
    let parsed = tract_onnx::onnx().parse(proto, None)?;
    let mut model = parsed.model;
    let outlets = names
        .iter()
        .map(|n| {
            parsed
                .outlets_by_name
                .get(*n)
                .copied()
                .ok_or_else(|| format_err!("tensor '{n}' not found"))
        })
        .collect::<TractResult<Vec<_>>>()?;
    model.select_output_outlets(&outlets)?;
    Ok(model)
}

/// Input shapes (as tract infers them) of the given tensors, and the model's
/// batch symbol if its first input has a symbolic first dimension.
pub fn infer_shapes(
    graph: &Graph,
    names: &[&str],
) -> Result<(Vec<Vec<TDim>>, Option<TDim>), ConvertError> {
    let proto = graph.to_model()?;
    catch_tract(|| {
        let model = with_outputs(&proto, names)?;
        let typed = model.into_typed()?;
        let shapes = (0..names.len())
            .map(|i| Ok(typed.output_fact(i)?.shape.to_tvec().into_vec()))
            .collect::<TractResult<Vec<_>>>()?;
        let batch = typed
            .input_fact(0)
            .ok()
            .and_then(|f| f.shape.to_tvec().first().cloned())
            .filter(|d| d.to_i64().is_err());
        Ok((shapes, batch))
    })
    .map_err(|problem| ConvertError::Shapes { problem })
}

/// What calibration saw at one layer's input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observed {
    /// largest |value|
    pub max: f64,
    /// root mean square of all values
    pub rms: f64,
    /// smallest value
    pub lo: f64,
    /// largest value
    pub hi: f64,
}

/// Largest and typical |value| reaching each tensor in `names` when the
/// original model runs (plaintext, tract) on `samples`.
pub fn observe(
    graph: &Graph,
    names: &[&str],
    samples: &Tensor,
) -> Result<Vec<Observed>, ConvertError> {
    let proto = graph.to_model()?;
    catch_tract(|| {
        let model = with_outputs(&proto, names)?;
        let plan = model.into_optimized()?.into_runnable()?;
        let outputs = plan.run(tvec!(samples.clone().into_tvalue()))?;
        outputs
            .iter()
            .map(|t| {
                let t = t.cast_to::<f32>()?;
                let v = t.to_plain_array_view::<f32>()?;
                let max = v.iter().fold(0f64, |m, x| m.max(f64::from(x.abs())));
                let lo = v.iter().fold(f64::INFINITY, |m, x| m.min(f64::from(*x)));
                let hi = v
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, x| m.max(f64::from(*x)));
                let sq = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>();
                let rms = (sq / v.len().max(1) as f64).sqrt();
                Ok(Observed { max, rms, lo, hi })
            })
            .collect::<TractResult<Vec<_>>>()
    })
    .map_err(|problem| ConvertError::Shapes {
        problem: format!("running the calibration inputs: {problem}"),
    })
}

/// Turns a layer's raw kind and inferred input shape into recorded shapes.
pub fn resolve(
    layer: &mut LinearLayer,
    input: &[TDim],
    batch: Option<&TDim>,
) -> Result<LayerShapes, ConvertError> {
    let bad = |problem: String| ConvertError::Shape {
        node: layer.source_node.clone(),
        op: layer.source_op.clone(),
        problem,
    };
    let batched = matches!((input.first(), batch), (Some(d), Some(b)) if d == b);
    let mut sample = Vec::with_capacity(input.len());
    for (i, d) in input.iter().enumerate() {
        if i == 0 && batched {
            sample.push(1);
            continue;
        }
        let v = d.to_usize().map_err(|_| {
            bad(format!(
                "input shape {input:?} has the unknown dimension {d} at axis {i}; only the batch axis (axis 0) may vary"
            ))
        })?;
        sample.push(v);
    }
    let kind = match &mut layer.kind {
        RawKind::MatMul => LinearKind::MatMul,
        RawKind::LeftMatMul => {
            if batched && sample.len() < 3 {
                return Err(bad(
                    "a constant left operand multiplies the batch axis itself".into(),
                ));
            }
            LinearKind::LeftMatMul
        }
        RawKind::Conv(attrs) => {
            if sample.len() < 2 {
                return Err(bad(format!(
                    "input of rank {} (Conv needs [N, C, ...])",
                    sample.len()
                )));
            }
            let spatial = sample.len() - 2;
            if attrs.strides.is_empty() && spatial > 0 {
                // A standalone BatchNormalization: widen the [C, 1] weight to 1x..x1 kernels.
                let mut shape = layer.weight.shape().to_vec();
                shape.extend(std::iter::repeat_n(1, spatial));
                layer.weight = layer
                    .weight
                    .clone()
                    .into_shape_with_order(shape)
                    .map_err(|e| bad(e.to_string()))?;
            }
            if layer.weight.ndim() != sample.len() {
                return Err(bad(format!(
                    "weight of rank {} does not fit an input of rank {}",
                    layer.weight.ndim(),
                    sample.len()
                )));
            }
            let attrs = attrs.clone();
            geometry(&attrs, &sample[2..], &layer.weight.shape()[2..]).map_err(bad)?
        }
    };
    let spec_like = secinfer_model::LayerSpec {
        op_id: 0,
        source_node: layer.source_node.clone(),
        source_op: layer.source_op.clone(),
        kind: kind.clone(),
        weight_shape: layer.weight.shape().to_vec(),
        input_shape: sample.clone(),
        output_shape: vec![],
        batched,
        ring_bits: 0,
        input_frac_bits: 0,
        weight_frac_bits: 0,
        input_bound: 1.0,
    };
    let output_shape = spec_like.compute_output_shape(&sample).map_err(bad)?;
    Ok(LayerShapes {
        kind,
        input_shape: sample,
        output_shape,
        batched,
    })
}

/// Explicit geometry from ONNX attributes and the input's spatial shape.
fn geometry(a: &ConvAttrs, input: &[usize], kernel: &[usize]) -> Result<LinearKind, String> {
    let r = input.len();
    let ones = vec![1; r];
    let strides = if a.strides.is_empty() {
        ones.clone()
    } else {
        a.strides.clone()
    };
    let dilations = if a.dilations.is_empty() {
        ones
    } else {
        a.dilations.clone()
    };
    let effective: Vec<usize> = (0..r).map(|i| (kernel[i] - 1) * dilations[i] + 1).collect();
    let split = |total: Vec<usize>, upper: bool| -> (Vec<usize>, Vec<usize>) {
        let small: Vec<usize> = total.iter().map(|t| t / 2).collect();
        let large: Vec<usize> = total.iter().zip(&small).map(|(t, s)| t - s).collect();
        if upper {
            (small, large)
        } else {
            (large, small)
        }
    };
    let explicit = || -> Result<(Vec<usize>, Vec<usize>), String> {
        if a.pads.is_empty() {
            Ok((vec![0; r], vec![0; r]))
        } else {
            Ok((a.pads[..r].to_vec(), a.pads[r..].to_vec()))
        }
    };
    if !a.transpose {
        let (pads_begin, pads_end) = match a.auto_pad.as_str() {
            "NOTSET" => explicit()?,
            "VALID" => (vec![0; r], vec![0; r]),
            "SAME_UPPER" | "SAME_LOWER" => {
                let total = (0..r)
                    .map(|i| {
                        let out = input[i].div_ceil(strides[i]);
                        ((out - 1) * strides[i] + effective[i]).saturating_sub(input[i])
                    })
                    .collect();
                split(total, a.auto_pad == "SAME_UPPER")
            }
            other => return Err(format!("unknown auto_pad '{other}'")),
        };
        return Ok(LinearKind::Conv(ConvGeometry {
            strides,
            dilations,
            pads_begin,
            pads_end,
            group: a.group,
        }));
    }
    let mut output_padding = if a.output_padding.is_empty() {
        vec![0; r]
    } else {
        a.output_padding.clone()
    };
    if output_padding.len() != r {
        return Err("output_padding does not match the kernel's rank".into());
    }
    // Size before padding is removed: s*(d-1) + output_padding + effective kernel.
    let full: Vec<usize> = (0..r)
        .map(|i| strides[i] * (input[i] - 1) + output_padding[i] + effective[i])
        .collect();
    let (pads_begin, pads_end) = if !a.output_shape.is_empty() {
        let wanted = &a.output_shape[a.output_shape.len().saturating_sub(r)..];
        if wanted.len() != r {
            return Err("output_shape does not match the kernel's rank".into());
        }
        let mut total = Vec::with_capacity(r);
        for i in 0..r {
            if wanted[i] > full[i] {
                // A larger output than the kernel covers: the extra cells are output padding.
                output_padding[i] += wanted[i] - full[i];
                total.push(0);
            } else {
                total.push(full[i] - wanted[i]);
            }
        }
        split(total, a.auto_pad == "SAME_UPPER")
    } else {
        match a.auto_pad.as_str() {
            "NOTSET" => explicit()?,
            "VALID" => (vec![0; r], vec![0; r]),
            "SAME_UPPER" | "SAME_LOWER" => {
                let total = (0..r)
                    .map(|i| full[i].saturating_sub(input[i] * strides[i]))
                    .collect();
                split(total, a.auto_pad == "SAME_UPPER")
            }
            other => return Err(format!("unknown auto_pad '{other}'")),
        }
    };
    Ok(LinearKind::ConvTranspose {
        geometry: ConvGeometry {
            strides,
            dilations,
            pads_begin,
            pads_end,
            group: a.group,
        },
        output_padding,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(auto_pad: &str, strides: Vec<usize>, transpose: bool) -> ConvAttrs {
        ConvAttrs {
            auto_pad: auto_pad.into(),
            strides,
            dilations: vec![],
            pads: vec![],
            group: 1,
            output_padding: vec![],
            output_shape: vec![],
            transpose,
        }
    }

    #[test]
    fn same_upper_puts_the_extra_pad_at_the_end() {
        let k = geometry(&attrs("SAME_UPPER", vec![2, 2], false), &[5, 6], &[3, 4]).unwrap();
        let LinearKind::Conv(g) = k else { panic!() };
        // out = ceil(5/2)=3: total = 2*2+3-5 = 2 ; out = 3: total = 2*2+4-6 = 2
        assert_eq!((g.pads_begin, g.pads_end), (vec![1, 1], vec![1, 1]));
        let k = geometry(&attrs("SAME_LOWER", vec![1], false), &[5], &[4]).unwrap();
        let LinearKind::Conv(g) = k else { panic!() };
        assert_eq!((g.pads_begin, g.pads_end), (vec![2], vec![1]));
    }

    #[test]
    fn conv_transpose_output_shape_becomes_pads() {
        let mut a = attrs("NOTSET", vec![3, 2], true);
        a.output_shape = vec![10, 8];
        let k = geometry(&a, &[3, 3], &[3, 3]).unwrap();
        let LinearKind::ConvTranspose {
            geometry: g,
            output_padding,
        } = k
        else {
            panic!()
        };
        // full = 3*2+3 = 9 -> wanted 10: one output padding; 2*2+3 = 7 -> wanted 8 likewise.
        assert_eq!(output_padding, vec![1, 1]);
        assert_eq!((g.pads_begin, g.pads_end), (vec![0, 0], vec![0, 0]));
        let mut a = attrs("NOTSET", vec![2], true);
        a.output_shape = vec![5];
        let LinearKind::ConvTranspose { geometry: g, .. } = geometry(&a, &[3], &[3]).unwrap()
        else {
            panic!()
        };
        assert_eq!((g.pads_begin, g.pads_end), (vec![1], vec![1]));
    }

    #[test]
    fn unknown_auto_pad_is_refused() {
        assert!(geometry(&attrs("SAME", vec![1], false), &[5], &[3]).is_err());
    }
}
