//! ONNX `TensorProto` <-> tract `Tensor`, for the data types the converter
//! folds and emits. Our own reader so that a malformed or exotic tensor is an
//! error naming it, never a panic.

use tract_onnx::pb::{self, tensor_proto::DataType};
use tract_onnx::prelude::*;

use crate::ConvertError;

/// Reads an embedded tensor. External data and unusual types are refused.
pub fn from_proto(t: &pb::TensorProto) -> Result<Tensor, ConvertError> {
    let bad = |problem: String| ConvertError::Tensor {
        name: t.name.clone(),
        problem,
    };
    if t.data_location == Some(pb::tensor_proto::DataLocation::External as i32)
        || !t.external_data.is_empty()
    {
        return Err(bad("stored as external data, which secinfer does not read; save the model with its weights embedded".into()));
    }
    let shape = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| bad(format!("negative dimension {d}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let len = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    let dt = DataType::try_from(t.data_type)
        .map_err(|_| bad(format!("unknown data type {}", t.data_type)))?;
    let raw = !t.raw_data.is_empty();
    macro_rules! build {
        ($ty:ty, $typed:expr) => {{
            let v: Vec<$ty> = if raw {
                let size = std::mem::size_of::<$ty>();
                if t.raw_data.len() != len * size {
                    return Err(bad(format!(
                        "raw_data has {} bytes, shape {:?} of {:?} needs {}",
                        t.raw_data.len(),
                        shape,
                        dt,
                        len * size
                    )));
                }
                t.raw_data
                    .chunks_exact(size)
                    .map(|c| <$ty>::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect()
            } else {
                $typed
            };
            if v.len() != len {
                return Err(bad(format!(
                    "holds {} values, shape {:?} needs {len}",
                    v.len(),
                    shape
                )));
            }
            Tensor::from_shape(&shape, &v).map_err(|e| bad(e.to_string()))?
        }};
    }
    let tensor = match dt {
        DataType::Float => build!(f32, t.float_data.clone()),
        DataType::Double => build!(f64, t.double_data.clone()),
        DataType::Int64 => build!(i64, t.int64_data.clone()),
        DataType::Int32 => build!(i32, t.int32_data.clone()),
        DataType::Int16 => build!(i16, t.int32_data.iter().map(|&x| x as i16).collect()),
        DataType::Int8 => build!(i8, t.int32_data.iter().map(|&x| x as i8).collect()),
        DataType::Uint8 => build!(u8, t.int32_data.iter().map(|&x| x as u8).collect()),
        DataType::Uint64 => build!(u64, t.uint64_data.clone()),
        DataType::Bool => {
            let v: Vec<bool> = if raw {
                t.raw_data.iter().map(|&b| b != 0).collect()
            } else {
                t.int32_data.iter().map(|&b| b != 0).collect()
            };
            if v.len() != len {
                return Err(bad(format!(
                    "holds {} values, shape {:?} needs {len}",
                    v.len(),
                    shape
                )));
            }
            Tensor::from_shape(&shape, &v).map_err(|e| bad(e.to_string()))?
        }
        other => return Err(bad(format!("data type {other:?} is not supported"))),
    };
    Ok(tensor)
}

/// Writes a tensor as raw little-endian data (what ONNX readers handle best,
/// and the only form tract reads correctly for UINT64).
pub fn to_proto(name: &str, t: &Tensor) -> Result<pb::TensorProto, ConvertError> {
    let bad = |problem: String| ConvertError::Tensor {
        name: name.to_string(),
        problem,
    };
    let converted;
    let t = if t.datum_type() == TDim::datum_type() {
        converted = t
            .cast_to::<i64>()
            .map_err(|e| bad(e.to_string()))?
            .into_owned();
        &converted
    } else {
        t
    };
    let data_type = match t.datum_type() {
        DatumType::F32 => DataType::Float,
        DatumType::F64 => DataType::Double,
        DatumType::I64 => DataType::Int64,
        DatumType::I32 => DataType::Int32,
        DatumType::I16 => DataType::Int16,
        DatumType::I8 => DataType::Int8,
        DatumType::U8 => DataType::Uint8,
        DatumType::U64 => DataType::Uint64,
        DatumType::Bool => DataType::Bool,
        other => return Err(bad(format!("cannot write a {other:?} tensor"))),
    };
    let raw_data = if t.datum_type() == DatumType::Bool {
        t.to_plain_array_view::<bool>()
            .map_err(|e| bad(e.to_string()))?
            .iter()
            .map(|&b| b as u8)
            .collect()
    } else {
        // as_bytes is the tensor's memory: little-endian on every platform tract supports.
        t.as_bytes().to_vec()
    };
    Ok(pb::TensorProto {
        name: name.to_string(),
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: data_type as i32,
        raw_data,
        ..Default::default()
    })
}

/// f32 view of a float tensor of any precision (weights may come as f64 or f16).
pub fn to_f32(name: &str, t: &Tensor) -> Result<tract_ndarray::ArrayD<f32>, ConvertError> {
    if !t.datum_type().is_float() {
        return Err(ConvertError::Tensor {
            name: name.to_string(),
            problem: format!("weights must be floating point, found {:?}", t.datum_type()),
        });
    }
    let a = t
        .cast_to::<f32>()
        .and_then(|c| c.into_owned().into_plain_array::<f32>())
        .map_err(|e| ConvertError::Tensor {
            name: name.to_string(),
            problem: e.to_string(),
        })?;
    if let Some(bad) = a.iter().find(|v| !v.is_finite()) {
        return Err(ConvertError::Tensor {
            name: name.to_string(),
            problem: format!("contains the non-finite value {bad}"),
        });
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_of_supported_types() {
        let f = Tensor::from_shape(&[2, 2], &[1.5f32, -2.0, 0.0, 3.25]).unwrap();
        let i = Tensor::from_shape(&[3], &[-1i64, 0, 7]).unwrap();
        let b = Tensor::from_shape(&[2], &[true, false]).unwrap();
        for t in [f, i, b] {
            let back = from_proto(&to_proto("t", &t).unwrap()).unwrap();
            assert_eq!(back, t);
        }
    }

    #[test]
    fn typed_fields_are_read() {
        let p = pb::TensorProto {
            name: "w".into(),
            dims: vec![2],
            data_type: DataType::Float as i32,
            float_data: vec![1.0, 2.0],
            ..Default::default()
        };
        assert_eq!(
            from_proto(&p).unwrap(),
            Tensor::from_shape(&[2], &[1.0f32, 2.0]).unwrap()
        );
    }

    #[test]
    fn malformed_tensors_are_named() {
        let p = pb::TensorProto {
            name: "w".into(),
            dims: vec![3],
            data_type: DataType::Float as i32,
            raw_data: vec![0; 8],
            ..Default::default()
        };
        let e = from_proto(&p).unwrap_err().to_string();
        assert!(e.contains("'w'") && e.contains("8 bytes"), "{e}");
        let p = pb::TensorProto {
            dims: vec![-1],
            ..p
        };
        assert!(from_proto(&p).unwrap_err().to_string().contains("negative"));
        let p = pb::TensorProto {
            name: "x".into(),
            data_type: DataType::Float as i32,
            data_location: Some(pb::tensor_proto::DataLocation::External as i32),
            ..Default::default()
        };
        assert!(from_proto(&p).unwrap_err().to_string().contains("external"));
    }

    #[test]
    fn non_finite_weights_are_refused() {
        let t = Tensor::from_shape(&[2], &[1.0f32, f32::NAN]).unwrap();
        assert!(to_f32("w", &t).unwrap_err().to_string().contains("NaN"));
    }
}
