//! The secure program of a model-private conversion (`--reveal logits` or
//! `argmax`): the steps both parties execute on secret shares, in order.
//!
//! A [`Program`] is a list of [`Step`]s. Each step reads named slots and
//! writes one; every slot has a per-sample shape (axis 0 is the batch axis,
//! of size 1, when the program is batched) and a number of fractional bits.
//! In the ONNX files each step is one node of the `ai.secinfer` domain
//! (`SecureInput`, `SecureLinear`, `SecureRelu`, …) whose attributes carry
//! the step; the nodes appear in execution order, identically in
//! `server.onnx` and `client.onnx` (only the server's `SecureLinear` nodes
//! have weight inputs). The program, the reveal mode and the layer specs go
//! into the model digest, so both parties provably run the same program.
//! What each step computes, and how, is in `docs/private-mode.md`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tract_onnx::pb;

use crate::{
    AttrReader, DOMAIN, LayerSpec, ModelError, OP_TYPE, Role, attr_int, attr_ints, attr_string,
    node_name,
};

/// What the client may learn from a converted model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reveal {
    /// The model's final output tensors (the default).
    Logits,
    /// Only the class index.
    Argmax,
    /// Every linear op's output: the fast mode, in which a client can
    /// reconstruct the weights.
    Activations,
}

impl Reveal {
    /// The name used on the command line and in the files.
    pub fn as_str(self) -> &'static str {
        match self {
            Reveal::Logits => "logits",
            Reveal::Argmax => "argmax",
            Reveal::Activations => "activations",
        }
    }

    /// Whether activations stay secret-shared (a program runs jointly).
    pub fn is_private(self) -> bool {
        self != Reveal::Activations
    }

    /// The warning every output about an `activations` model must carry.
    pub const ACTIVATIONS_WARNING: &'static str = "--reveal activations: the client learns the exact output of every linear layer and can reconstruct the model's weights from a few hundred queries; use it only with clients you would give the weights to";
}

impl std::str::FromStr for Reveal {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Reveal, ModelError> {
        match s {
            "logits" => Ok(Reveal::Logits),
            "argmax" => Ok(Reveal::Argmax),
            "activations" => Ok(Reveal::Activations),
            other => Err(ModelError::Model(format!(
                "unknown reveal mode '{other}' (logits, argmax or activations)"
            ))),
        }
    }
}

impl std::fmt::Display for Reveal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Window of a pooling step over the spatial axes (axes 2.. of `[N, C, ...]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PoolGeometry {
    /// window size per spatial axis
    pub kernel: Vec<usize>,
    /// per spatial axis
    pub strides: Vec<usize>,
    /// per spatial axis
    pub dilations: Vec<usize>,
    /// padding before, per spatial axis
    pub pads_begin: Vec<usize>,
    /// padding after, per spatial axis
    pub pads_end: Vec<usize>,
}

impl PoolGeometry {
    /// Output spatial shape for an input spatial shape, or why not.
    pub fn output_spatial(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        let r = input.len();
        if [
            self.kernel.len(),
            self.strides.len(),
            self.dilations.len(),
            self.pads_begin.len(),
            self.pads_end.len(),
        ]
        .iter()
        .any(|&l| l != r)
        {
            return Err(format!(
                "pool geometry {self:?} does not have {r} spatial axes"
            ));
        }
        (0..r)
            .map(|i| {
                let (k, s, d) = (self.kernel[i], self.strides[i], self.dilations[i]);
                if k == 0 || s == 0 || d == 0 {
                    return Err("kernel, strides and dilations must be positive".to_string());
                }
                if self.pads_begin[i] > d * (k - 1) || self.pads_end[i] > d * (k - 1) {
                    return Err("padding as large as the window leaves windows with no cell".into());
                }
                let padded = input[i] + self.pads_begin[i] + self.pads_end[i];
                let span = d * (k - 1) + 1;
                if padded < span {
                    return Err(format!(
                        "window {span} is larger than the padded axis {padded}"
                    ));
                }
                Ok((padded - span) / s + 1)
            })
            .collect()
    }

    /// Cells per window.
    pub fn window(&self) -> usize {
        self.kernel.iter().product()
    }

    /// The windows over one sample of shape `[1, C, spatial...]`: for each
    /// output element (row-major over `[1, C, out_spatial...]`) its
    /// `window()` cells as flat input indices, `None` for a padding cell.
    pub fn windows(&self, input: &[usize]) -> Result<(Vec<usize>, Vec<Option<usize>>), String> {
        if input.len() < 3 {
            return Err(format!("pools [N, C, spatial...], got {input:?}"));
        }
        let spatial = &input[2..];
        let out_spatial = self.output_spatial(spatial)?;
        let mut out_shape = input[..2].to_vec();
        out_shape.extend(&out_spatial);
        let r = spatial.len();
        let channels = input[0] * input[1];
        let in_plane: usize = spatial.iter().product();
        let out_plane: usize = out_spatial.iter().product();
        let window = self.window();
        let mut cells = Vec::with_capacity(channels * out_plane * window);
        let mut o = vec![0usize; r];
        let mut k = vec![0usize; r];
        for c in 0..channels {
            for op in 0..out_plane {
                // o = the output position, row-major
                let mut rest = op;
                for a in (0..r).rev() {
                    o[a] = rest % out_spatial[a];
                    rest /= out_spatial[a];
                }
                for kp in 0..window {
                    let mut rest = kp;
                    for a in (0..r).rev() {
                        k[a] = rest % self.kernel[a];
                        rest /= self.kernel[a];
                    }
                    let mut flat = 0usize;
                    let mut inside = true;
                    for a in 0..r {
                        let pos = (o[a] * self.strides[a] + k[a] * self.dilations[a]) as isize
                            - self.pads_begin[a] as isize;
                        if pos < 0 || pos as usize >= spatial[a] {
                            inside = false;
                            break;
                        }
                        flat = flat * spatial[a] + pos as usize;
                    }
                    cells.push(inside.then_some(c * in_plane + flat));
                }
            }
        }
        Ok((out_shape, cells))
    }
}

/// Whether a truncated value is known to be non-negative.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Sign {
    /// `0 <= v`: the cheaper truncation applies
    NonNegative,
    /// any sign (the value is shifted to be non-negative first)
    Signed,
}

/// What one step computes. Arithmetic is on shares in `Z_2^k`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StepOp {
    /// The client encodes a tensor of its own (checked against `bound`);
    /// the server's share is zero.
    Input {
        /// the client's f32 tensor (in `client.onnx`, the node also reads it)
        tensor: String,
        /// smallest value accepted, in real units
        lo: ordered::F32,
        /// largest value accepted, in real units
        hi: ordered::F32,
    },
    /// SecureLinear op `op`: HE material, one message from the client.
    Linear {
        /// the op id (index into the layer specs)
        op: u32,
    },
    /// Divide by `2^shift` (error at most one unit in the last place).
    Truncate {
        /// bits removed
        shift: u32,
        /// what is known about the sign
        sign: Sign,
    },
    /// Multiply by `2^shift` (local).
    ShiftLeft {
        /// bits added
        shift: u32,
    },
    /// `max(x, 0)`, comparing on `bits` bits.
    Relu {
        /// every input value fits `bits` signed bits
        bits: u32,
    },
    /// Max over windows of `[N, C, spatial...]`.
    MaxPool {
        /// the windows
        geometry: PoolGeometry,
        /// every input value fits `bits` signed bits
        bits: u32,
    },
    /// Max over all spatial positions per channel.
    GlobalMaxPool {
        /// every input value fits `bits` signed bits
        bits: u32,
    },
    /// Sum over windows (zero padding); an AveragePool is a sum and a scale.
    SumPool {
        /// the windows
        geometry: PoolGeometry,
    },
    /// Sum over all spatial positions per channel.
    GlobalSumPool,
    /// Multiply by a public integer (local).
    MulConst {
        /// the factor
        factor: i64,
    },
    /// Elementwise sum of two slots of the same shape and scale.
    Add,
    /// Elementwise difference of two slots of the same shape and scale.
    Sub,
    /// Same elements, the step's shape (row-major).
    Reshape,
    /// Axes permuted.
    Transpose {
        /// output axis i is input axis perm[i]
        perm: Vec<usize>,
    },
    /// Inputs joined along `axis`.
    Concat {
        /// the axis
        axis: usize,
    },
    /// A strided window per axis (positive steps, resolved bounds).
    Slice {
        /// first index per axis
        starts: Vec<usize>,
        /// step per axis
        steps: Vec<usize>,
    },
    /// Zero padding.
    Pad {
        /// before, per axis
        begin: Vec<usize>,
        /// after, per axis
        end: Vec<usize>,
    },
    /// A public piecewise-linear function (Sigmoid, Tanh, LeakyRelu, Clip),
    /// elementwise: on `x` with `t_j <= x < t_(j+1)` the value
    /// `(slopes[j]·x + intercepts[j]) / 2^slope_frac_bits`, in the input's
    /// scale (breaks in input units, intercepts with `slope_frac_bits` more
    /// fractional bits).
    Piecewise {
        /// the ONNX activation it implements, for messages
        function: String,
        /// breakpoints, ascending
        breaks: Vec<i64>,
        /// one slope per segment (`breaks.len() + 1`)
        slopes: Vec<i64>,
        /// one intercept per segment
        intercepts: Vec<i64>,
        /// fractional bits of the slopes
        slope_frac_bits: u32,
        /// every input value fits `bits` signed bits
        bits: u32,
    },
    /// Index of the first maximum along the last axis (shares of an integer).
    ArgMax {
        /// every input value fits `bits` signed bits
        bits: u32,
    },
    /// The server sends its share; the client decodes the value (a float
    /// with the slot's fractional bits, or an integer index).
    Reveal,
}

/// Float that hashes and compares by bits (bounds are plain finite floats).
pub mod ordered {
    use serde::{Deserialize, Serialize};

    /// An `f32` compared and hashed by its bits.
    #[derive(Clone, Copy, Debug, Serialize, Deserialize)]
    pub struct F32(pub f32);

    impl PartialEq for F32 {
        fn eq(&self, o: &F32) -> bool {
            self.0.to_bits() == o.0.to_bits()
        }
    }
    impl Eq for F32 {}
    impl std::hash::Hash for F32 {
        fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
            self.0.to_bits().hash(h)
        }
    }
}

impl StepOp {
    /// The ONNX op_type of the step's node.
    pub fn op_type(&self) -> &'static str {
        match self {
            StepOp::Input { .. } => "SecureInput",
            StepOp::Linear { .. } => OP_TYPE,
            StepOp::Truncate { .. } => "SecureTruncate",
            StepOp::ShiftLeft { .. } => "SecureShiftLeft",
            StepOp::Relu { .. } => "SecureRelu",
            StepOp::MaxPool { .. } => "SecureMaxPool",
            StepOp::GlobalMaxPool { .. } => "SecureGlobalMaxPool",
            StepOp::SumPool { .. } => "SecureSumPool",
            StepOp::GlobalSumPool => "SecureGlobalSumPool",
            StepOp::MulConst { .. } => "SecureMulConst",
            StepOp::Add => "SecureAdd",
            StepOp::Sub => "SecureSub",
            StepOp::Reshape => "SecureReshape",
            StepOp::Transpose { .. } => "SecureTranspose",
            StepOp::Concat { .. } => "SecureConcat",
            StepOp::Slice { .. } => "SecureSlice",
            StepOp::Pad { .. } => "SecurePad",
            StepOp::Piecewise { .. } => "SecurePiecewise",
            StepOp::ArgMax { .. } => "SecureArgMax",
            StepOp::Reveal => "SecureReveal",
        }
    }

    /// Bits its comparisons use, if it compares.
    pub fn compare_bits(&self) -> Option<u32> {
        match self {
            StepOp::Relu { bits }
            | StepOp::MaxPool { bits, .. }
            | StepOp::GlobalMaxPool { bits }
            | StepOp::Piecewise { bits, .. }
            | StepOp::ArgMax { bits } => Some(*bits),
            _ => None,
        }
    }
}

/// One step: `output = op(inputs)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Step {
    /// what it computes
    pub op: StepOp,
    /// slots read (none for `Input`)
    pub inputs: Vec<String>,
    /// slot written (for `Reveal`: the client's f32 or int64 tensor)
    pub output: String,
    /// one sample's output shape
    pub shape: Vec<usize>,
    /// fractional bits of the output (0 for indices)
    pub frac_bits: u32,
    /// the original ONNX node(s), for messages
    pub source: String,
}

/// The steps of a model-private conversion. See the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Program {
    /// what is revealed (never `Activations`: that mode has no program)
    pub reveal: Reveal,
    /// whether axis 0 of every slot is the batch axis
    pub batched: bool,
    /// the ring `Z_2^k`
    pub ring_bits: u32,
    /// the steps, in execution order
    pub steps: Vec<Step>,
}

fn step_err(i: usize, s: &Step, problem: String) -> ModelError {
    ModelError::Node {
        node: format!("step {i} ({} from '{}')", s.op.op_type(), s.source),
        problem,
    }
}

/// Row-major strides of a shape.
fn count(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Program {
    /// The shape of a slot for a batch of `n` (axis 0 becomes `n` when batched).
    pub fn batch_shape(&self, shape: &[usize], n: usize) -> Vec<usize> {
        let mut s = shape.to_vec();
        if self.batched && !s.is_empty() {
            s[0] = n;
        }
        s
    }

    /// Steps that reveal a value to the client.
    pub fn reveals(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(|s| s.op == StepOp::Reveal)
    }

    /// Steps that read a client tensor.
    pub fn inputs(&self) -> impl Iterator<Item = &Step> {
        self.steps
            .iter()
            .filter(|s| matches!(s.op, StepOp::Input { .. }))
    }

    /// Checks that the program is well formed against the layer specs:
    /// every slot is written once before it is read, shapes and scales
    /// agree with each op, comparisons fit the ring, batch axis kept.
    pub fn validate(&self, layers: &[LayerSpec]) -> Result<(), ModelError> {
        let k = self.ring_bits;
        if !(8..=62).contains(&k) {
            return Err(ModelError::Model(format!(
                "program ring Z_2^{k} is outside 8..=62 bits"
            )));
        }
        if !self.reveal.is_private() {
            return Err(ModelError::Model(
                "a program reveals logits or argmax; activations mode has none".into(),
            ));
        }
        // slot -> (shape, frac bits, is an index)
        let mut slots: HashMap<&str, (&[usize], u32)> = HashMap::new();
        let mut linear_seen = vec![false; layers.len()];
        let mut reveals = 0;
        for (i, s) in self.steps.iter().enumerate() {
            let bad = |p: String| step_err(i, s, p);
            if s.shape.is_empty() || (self.batched && s.shape[0] != 1) {
                return Err(bad(format!(
                    "shape {:?} must have rank >= 1 and describe one sample",
                    s.shape
                )));
            }
            let ins: Vec<(&[usize], u32)> = match s.op {
                StepOp::Input { .. } => Vec::new(),
                _ => {
                    s.inputs
                        .iter()
                        .map(|n| {
                            slots.get(n.as_str()).copied().ok_or_else(|| {
                                bad(format!("reads slot '{n}' before it is written"))
                            })
                        })
                        .collect::<Result<_, _>>()?
                }
            };
            let arity = match &s.op {
                StepOp::Input { .. } => None,
                StepOp::Add | StepOp::Sub => Some(2),
                StepOp::Concat { .. } => None,
                _ => Some(1),
            };
            if let Some(a) = arity
                && ins.len() != a
            {
                return Err(bad(format!("takes {a} inputs, has {}", ins.len())));
            }
            let one = ins.first().copied();
            let same_scale = |f: u32| -> Result<(), ModelError> {
                match one {
                    Some((_, fi)) if fi != f => Err(bad(format!(
                        "input has {fi} fractional bits, output {f}; this step keeps the scale"
                    ))),
                    _ => Ok(()),
                }
            };
            let same_shape = || -> Result<(), ModelError> {
                match one {
                    Some((sh, _)) if sh != s.shape.as_slice() => Err(bad(format!(
                        "input shape {sh:?} differs from output shape {:?}",
                        s.shape
                    ))),
                    _ => Ok(()),
                }
            };
            // A sum pool or a constant factor may relabel the scale upwards
            // (an average is a sum with log2(K) more fractional bits).
            let scale_rule = |op: &StepOp| -> Result<(), ModelError> {
                let f = one.map_or(0, |x| x.1);
                let keeps = matches!(op, StepOp::MaxPool { .. } | StepOp::GlobalMaxPool { .. });
                if (keeps && f != s.frac_bits) || f > s.frac_bits || s.frac_bits + 2 > k {
                    return Err(bad(format!(
                        "input has {f} fractional bits, output {}",
                        s.frac_bits
                    )));
                }
                Ok(())
            };
            let compare = |bits: u32, extra: u32| -> Result<(), ModelError> {
                if bits < 2 || bits + extra > k {
                    return Err(bad(format!(
                        "compares on {bits} bits; needs 2..={} in Z_2^{k}",
                        k - extra
                    )));
                }
                Ok(())
            };
            match &s.op {
                StepOp::Input { lo, hi, .. } => {
                    if !(lo.0.is_finite() && hi.0.is_finite() && lo.0 < hi.0) {
                        return Err(bad(format!(
                            "input range [{}, {}] is empty or not finite",
                            lo.0, hi.0
                        )));
                    }
                    if s.frac_bits + 2 > k {
                        return Err(bad("no integer bits left".into()));
                    }
                }
                StepOp::Linear { op } => {
                    let spec = layers.get(*op as usize).ok_or_else(|| {
                        bad(format!(
                            "names SecureLinear op {op}, which is not in the model"
                        ))
                    })?;
                    if std::mem::replace(&mut linear_seen[*op as usize], true) {
                        return Err(bad(format!("op {op} appears twice")));
                    }
                    let (sh, f) = one.ok_or_else(|| bad("no input".into()))?;
                    if sh != spec.input_shape.as_slice() || f != spec.input_frac_bits {
                        return Err(bad(format!(
                            "input {sh:?} with {f} fractional bits; op {op} takes {:?} with {}",
                            spec.input_shape, spec.input_frac_bits
                        )));
                    }
                    if s.shape != spec.output_shape || s.frac_bits != spec.output_frac_bits() {
                        return Err(bad(format!(
                            "output must be op {op}'s {:?} with {} fractional bits",
                            spec.output_shape,
                            spec.output_frac_bits()
                        )));
                    }
                    if spec.ring_bits != k || spec.batched != self.batched {
                        return Err(bad(
                            "op disagrees with the program's ring or batching".into()
                        ));
                    }
                }
                StepOp::Truncate { shift, sign } => {
                    same_shape()?;
                    let f = one.map_or(0, |x| x.1);
                    let limit = if *sign == Sign::Signed { k - 2 } else { k - 1 };
                    if *shift == 0 || *shift >= limit || f != s.frac_bits + shift {
                        return Err(bad(format!(
                            "truncation by {shift} from {f} to {} fractional bits",
                            s.frac_bits
                        )));
                    }
                }
                StepOp::ShiftLeft { shift } => {
                    same_shape()?;
                    let f = one.map_or(0, |x| x.1);
                    if *shift == 0 || f + shift != s.frac_bits || s.frac_bits + 2 > k {
                        return Err(bad(format!("shift by {shift} from {f} to {}", s.frac_bits)));
                    }
                }
                StepOp::Relu { bits } => {
                    same_shape()?;
                    same_scale(s.frac_bits)?;
                    compare(*bits, 0)?;
                }
                StepOp::Piecewise {
                    breaks,
                    slopes,
                    intercepts,
                    slope_frac_bits,
                    bits,
                    ..
                } => {
                    same_shape()?;
                    same_scale(s.frac_bits)?;
                    compare(*bits, 1)?;
                    if slopes.len() != breaks.len() + 1
                        || intercepts.len() != slopes.len()
                        || breaks.windows(2).any(|w| w[0] >= w[1])
                        || *slope_frac_bits + 2 > k
                    {
                        return Err(bad("the piecewise-linear function is malformed".into()));
                    }
                }
                StepOp::MaxPool { geometry, .. } | StepOp::SumPool { geometry } => {
                    scale_rule(&s.op)?;
                    if let Some(bits) = s.op.compare_bits() {
                        compare(bits, 1)?;
                    }
                    let (sh, _) = one.ok_or_else(|| bad("no input".into()))?;
                    if sh.len() < 3 {
                        return Err(bad(format!("pools [N, C, spatial...], got {sh:?}")));
                    }
                    let mut out = sh[..2].to_vec();
                    out.extend(geometry.output_spatial(&sh[2..]).map_err(bad)?);
                    if out != s.shape {
                        return Err(bad(format!(
                            "pooling {sh:?} gives {out:?}, step says {:?}",
                            s.shape
                        )));
                    }
                }
                StepOp::GlobalMaxPool { .. } | StepOp::GlobalSumPool => {
                    scale_rule(&s.op)?;
                    if let StepOp::GlobalMaxPool { bits } = s.op {
                        compare(bits, 1)?;
                    }
                    let (sh, _) = one.ok_or_else(|| bad("no input".into()))?;
                    let mut out = sh.to_vec();
                    let spatial = 2.min(out.len());
                    out[spatial..].iter_mut().for_each(|d| *d = 1);
                    if sh.len() < 3 || out != s.shape {
                        return Err(bad(format!(
                            "global pooling of {sh:?} cannot give {:?}",
                            s.shape
                        )));
                    }
                }
                StepOp::MulConst { factor } => {
                    same_shape()?;
                    scale_rule(&s.op)?;
                    if *factor == 0 {
                        return Err(bad("multiplication by zero".into()));
                    }
                }
                StepOp::Add | StepOp::Sub => {
                    same_shape()?;
                    same_scale(s.frac_bits)?;
                    if ins[1] != (s.shape.as_slice(), s.frac_bits) {
                        return Err(bad(
                            "both inputs must have the output's shape and scale".into()
                        ));
                    }
                }
                StepOp::Reshape => {
                    same_scale(s.frac_bits)?;
                    let (sh, _) = one.ok_or_else(|| bad("no input".into()))?;
                    if count(sh) != count(&s.shape) {
                        return Err(bad(format!("cannot reshape {sh:?} into {:?}", s.shape)));
                    }
                }
                StepOp::Transpose { perm } => {
                    same_scale(s.frac_bits)?;
                    let (sh, _) = one.ok_or_else(|| bad("no input".into()))?;
                    let mut sorted = perm.clone();
                    sorted.sort_unstable();
                    if sorted != (0..sh.len()).collect::<Vec<_>>()
                        || (self.batched && perm[0] != 0)
                        || perm.iter().map(|&p| sh[p]).collect::<Vec<_>>() != s.shape
                    {
                        return Err(bad(format!(
                            "{perm:?} is not a permutation of {sh:?} to {:?} that keeps the batch axis",
                            s.shape
                        )));
                    }
                }
                StepOp::Concat { axis } => {
                    if ins.is_empty() || *axis >= s.shape.len() || (self.batched && *axis == 0) {
                        return Err(bad(format!("concatenation along axis {axis}")));
                    }
                    let mut total = 0;
                    for (sh, f) in &ins {
                        if *f != s.frac_bits
                            || sh.len() != s.shape.len()
                            || sh
                                .iter()
                                .zip(&s.shape)
                                .enumerate()
                                .any(|(a, (x, y))| a != *axis && x != y)
                        {
                            return Err(bad(format!(
                                "input {sh:?} does not join into {:?}",
                                s.shape
                            )));
                        }
                        total += sh[*axis];
                    }
                    if total != s.shape[*axis] {
                        return Err(bad("lengths along the axis do not add up".into()));
                    }
                }
                StepOp::Slice { starts, steps } => {
                    same_scale(s.frac_bits)?;
                    let (sh, _) = one.ok_or_else(|| bad("no input".into()))?;
                    let ok = starts.len() == sh.len()
                        && steps.len() == sh.len()
                        && (0..sh.len()).all(|a| {
                            steps[a] > 0
                                && (s.shape[a] == 0
                                    || starts[a] + (s.shape[a] - 1) * steps[a] < sh[a])
                        })
                        && (!self.batched || (starts[0] == 0 && steps[0] == 1 && sh[0] == 1));
                    if !ok || s.shape.len() != sh.len() {
                        return Err(bad(format!(
                            "slice {starts:?} step {steps:?} of {sh:?} cannot give {:?}",
                            s.shape
                        )));
                    }
                }
                StepOp::Pad { begin, end } => {
                    same_scale(s.frac_bits)?;
                    let (sh, _) = one.ok_or_else(|| bad("no input".into()))?;
                    let out: Vec<usize> = (0..sh.len())
                        .map(|a| sh[a] + begin.get(a).unwrap_or(&0) + end.get(a).unwrap_or(&0))
                        .collect();
                    if begin.len() != sh.len()
                        || end.len() != sh.len()
                        || out != s.shape
                        || (self.batched && (begin[0] != 0 || end[0] != 0))
                    {
                        return Err(bad(format!(
                            "padding {begin:?}/{end:?} of {sh:?} cannot give {:?}",
                            s.shape
                        )));
                    }
                }
                StepOp::ArgMax { bits } => {
                    compare(*bits, 1)?;
                    let (sh, _) = one.ok_or_else(|| bad("no input".into()))?;
                    let mut out = sh.to_vec();
                    if let Some(last) = out.last_mut() {
                        *last = 1;
                    }
                    if sh.len() < 2 || out != s.shape || s.frac_bits != 0 {
                        return Err(bad(format!(
                            "argmax over the last axis of {sh:?} gives {out:?} with 0 fractional bits"
                        )));
                    }
                }
                StepOp::Reveal => {
                    same_shape()?;
                    same_scale(s.frac_bits)?;
                    reveals += 1;
                }
            }
            if !matches!(s.op, StepOp::Reveal) {
                if slots.contains_key(s.output.as_str()) {
                    return Err(bad(format!("slot '{}' is written twice", s.output)));
                }
                slots.insert(&s.output, (&s.shape, s.frac_bits));
            }
        }
        if let Some(op) = linear_seen.iter().position(|seen| !seen) {
            return Err(ModelError::Model(format!(
                "SecureLinear op {op} is not used by the program"
            )));
        }
        if reveals == 0 {
            return Err(ModelError::Model("the program reveals nothing".into()));
        }
        Ok(())
    }

    /// The step's ONNX node for `role`'s file (`None` for a `SecureLinear`
    /// step: its node comes from the layer spec, [`LayerSpec::to_attributes`]).
    pub fn node(&self, index: usize, role: Role) -> Option<pb::NodeProto> {
        let s = self.steps.get(index)?;
        let mut input = s.inputs.clone();
        let mut attribute = vec![
            attr_int("step", index as i64),
            attr_ints("shape", &s.shape),
            attr_int("frac_bits", s.frac_bits as i64),
            attr_string("source", &s.source),
        ];
        let u = |v: u32| v as usize;
        match &s.op {
            StepOp::Input { tensor, lo, hi } => {
                if role == Role::Client {
                    input = vec![tensor.clone()];
                }
                attribute.push(attr_string("tensor", tensor));
                attribute.push(crate::attr_float("lo", lo.0));
                attribute.push(crate::attr_float("hi", hi.0));
            }
            StepOp::Linear { .. } => return None,
            StepOp::Truncate { shift, sign } => {
                attribute.push(attr_int("shift", *shift as i64));
                attribute.push(attr_int("signed", (*sign == Sign::Signed) as i64));
            }
            StepOp::ShiftLeft { shift } => attribute.push(attr_int("shift", *shift as i64)),
            StepOp::Relu { bits } | StepOp::GlobalMaxPool { bits } | StepOp::ArgMax { bits } => {
                attribute.push(attr_ints("bits", &[u(*bits)]))
            }
            StepOp::MaxPool { geometry, bits } => {
                attribute.push(attr_ints("bits", &[u(*bits)]));
                attribute.extend(pool_attributes(geometry));
            }
            StepOp::Piecewise {
                function,
                breaks,
                slopes,
                intercepts,
                slope_frac_bits,
                bits,
            } => {
                attribute.push(attr_ints("bits", &[u(*bits)]));
                attribute.push(attr_string("function", function));
                attribute.push(attr_i64s("breaks", breaks));
                attribute.push(attr_i64s("slopes", slopes));
                attribute.push(attr_i64s("intercepts", intercepts));
                attribute.push(attr_int("slope_frac_bits", *slope_frac_bits as i64));
            }
            StepOp::SumPool { geometry } => attribute.extend(pool_attributes(geometry)),
            StepOp::GlobalSumPool
            | StepOp::Add
            | StepOp::Sub
            | StepOp::Reshape
            | StepOp::Reveal => {}
            StepOp::MulConst { factor } => attribute.push(attr_int("factor", *factor)),
            StepOp::Transpose { perm } => attribute.push(attr_ints("perm", perm)),
            StepOp::Concat { axis } => attribute.push(attr_int("axis", *axis as i64)),
            StepOp::Slice { starts, steps } => {
                attribute.push(attr_ints("starts", starts));
                attribute.push(attr_ints("steps", steps));
            }
            StepOp::Pad { begin, end } => {
                attribute.push(attr_ints("pads_begin", begin));
                attribute.push(attr_ints("pads_end", end));
            }
        }
        Some(pb::NodeProto {
            name: format!("secure_step_{index}"),
            op_type: s.op.op_type().into(),
            domain: DOMAIN.into(),
            input,
            output: vec![s.output.clone()],
            attribute,
            doc_string: format!("secinfer step {index}: {} on shares", s.source),
        })
    }

    /// Reads the program from the `ai.secinfer` nodes of a graph, in order.
    /// `layers` are the file's SecureLinear specs (by op id).
    pub fn from_nodes(
        nodes: &[pb::NodeProto],
        layers: &[LayerSpec],
        reveal: Reveal,
        batched: bool,
        ring_bits: u32,
    ) -> Result<Program, ModelError> {
        let mut steps = Vec::new();
        for node in nodes.iter().filter(|n| n.domain == DOMAIN) {
            let name = node_name(node);
            let output = node
                .output
                .first()
                .cloned()
                .ok_or_else(|| ModelError::Node {
                    node: name.clone(),
                    problem: "has no output".into(),
                })?;
            if node.op_type == OP_TYPE {
                let spec = LayerSpec::from_node(node)?;
                let input = node
                    .input
                    .first()
                    .cloned()
                    .ok_or_else(|| ModelError::Node {
                        node: name.clone(),
                        problem: "has no input".into(),
                    })?;
                let source = spec.source_node.clone();
                let op = spec.op_id;
                let spec = layers.get(op as usize).ok_or_else(|| ModelError::Node {
                    node: name.clone(),
                    problem: format!("op {op} is not among the file's specs"),
                })?;
                steps.push(Step {
                    op: StepOp::Linear { op },
                    inputs: vec![input],
                    output,
                    shape: spec.output_shape.clone(),
                    frac_bits: spec.output_frac_bits(),
                    source,
                });
                continue;
            }
            let r = AttrReader { node, name: &name };
            let index = r.usize("step")?;
            if index != steps.len() {
                return Err(ModelError::Node {
                    node: name,
                    problem: format!("is step {index}, expected step {}", steps.len()),
                });
            }
            let bits = || -> Result<u32, ModelError> {
                match r.usizes("bits")?.as_slice() {
                    [b] => u32::try_from(*b).map_err(|_| r.bad("bits", "is out of range")),
                    _ => Err(r.bad("bits", "must hold one value")),
                }
            };
            let op = match node.op_type.as_str() {
                "SecureInput" => StepOp::Input {
                    tensor: r.string("tensor")?,
                    lo: ordered::F32(r.float("lo")?),
                    hi: ordered::F32(r.float("hi")?),
                },
                "SecureTruncate" => StepOp::Truncate {
                    shift: r.u32("shift")?,
                    sign: if r.int("signed")? != 0 {
                        Sign::Signed
                    } else {
                        Sign::NonNegative
                    },
                },
                "SecureShiftLeft" => StepOp::ShiftLeft {
                    shift: r.u32("shift")?,
                },
                "SecureRelu" => StepOp::Relu { bits: bits()? },
                "SecureMaxPool" => StepOp::MaxPool {
                    geometry: read_pool(&r)?,
                    bits: bits()?,
                },
                "SecureGlobalMaxPool" => StepOp::GlobalMaxPool { bits: bits()? },
                "SecureSumPool" => StepOp::SumPool {
                    geometry: read_pool(&r)?,
                },
                "SecureGlobalSumPool" => StepOp::GlobalSumPool,
                "SecureMulConst" => StepOp::MulConst {
                    factor: r.int("factor")?,
                },
                "SecureAdd" => StepOp::Add,
                "SecureSub" => StepOp::Sub,
                "SecureReshape" => StepOp::Reshape,
                "SecureTranspose" => StepOp::Transpose {
                    perm: r.usizes("perm")?,
                },
                "SecureConcat" => StepOp::Concat {
                    axis: r.usize("axis")?,
                },
                "SecureSlice" => StepOp::Slice {
                    starts: r.usizes("starts")?,
                    steps: r.usizes("steps")?,
                },
                "SecurePad" => StepOp::Pad {
                    begin: r.usizes("pads_begin")?,
                    end: r.usizes("pads_end")?,
                },
                "SecurePiecewise" => StepOp::Piecewise {
                    function: r.string("function")?,
                    breaks: r.i64s("breaks")?,
                    slopes: r.i64s("slopes")?,
                    intercepts: r.i64s("intercepts")?,
                    slope_frac_bits: r.u32("slope_frac_bits")?,
                    bits: bits()?,
                },
                "SecureArgMax" => StepOp::ArgMax { bits: bits()? },
                "SecureReveal" => StepOp::Reveal,
                other => {
                    return Err(ModelError::Node {
                        node: name,
                        problem: format!("unknown op {other} in domain {DOMAIN}"),
                    });
                }
            };
            // An input step reads the client's tensor in client.onnx and
            // nothing in server.onnx; the program records neither.
            let inputs = match op {
                StepOp::Input { .. } => Vec::new(),
                _ => node.input.clone(),
            };
            steps.push(Step {
                op,
                inputs,
                output,
                shape: r.usizes("shape")?,
                frac_bits: r.u32("frac_bits")?,
                source: r.string("source")?,
            });
        }
        let program = Program {
            reveal,
            batched,
            ring_bits,
            steps,
        };
        program.validate(layers)?;
        Ok(program)
    }
}

/// An INTS attribute from signed values.
fn attr_i64s(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        ints: v.to_vec(),
        ..attr_ints(name, &[])
    }
}

fn pool_attributes(g: &PoolGeometry) -> Vec<pb::AttributeProto> {
    vec![
        attr_ints("kernel", &g.kernel),
        attr_ints("strides", &g.strides),
        attr_ints("dilations", &g.dilations),
        attr_ints("pads_begin", &g.pads_begin),
        attr_ints("pads_end", &g.pads_end),
    ]
}

fn read_pool(r: &AttrReader) -> Result<PoolGeometry, ModelError> {
    Ok(PoolGeometry {
        kernel: r.usizes("kernel")?,
        strides: r.usizes("strides")?,
        dilations: r.usizes("dilations")?,
        pads_begin: r.usizes("pads_begin")?,
        pads_end: r.usizes("pads_end")?,
    })
}
