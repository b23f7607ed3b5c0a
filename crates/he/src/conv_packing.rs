//! The block packing for 2-D convolutions: one inference's input channels
//! and rows in the coefficients of a few polynomials, each output channel's
//! kernel in a plaintext polynomial, so that one product gives the
//! convolution at known coefficients (Cheetah, Huang et al., USENIX Security
//! 2022, §4; the layout and why nothing collides: docs/offline.md,
//! "Convolutions").
//!
//! For a group's block of `C'` input channels and a tile of rows, padded to
//! `Hp × Wp` (`P = Hp·Wp` coefficients per channel), input channel `c` of the
//! block sits at `c·P + y·Wp + x`. The kernel of output channel `m` (of a
//! block of `M'`) and input channel `c` sits reversed at
//! `(m·C' + C' − 1 − c)·P + O − i·dh·Wp − j·dw` with `O = dh(kh−1)·Wp +
//! dw(kw−1)`; the product holds output `(m, y, x)` (stride-1 coordinates in
//! the tile) at `(m·C' + C' − 1)·P + O + y·Wp + x`. Strides keep every
//! `s`-th of those; dilations spread the kernel; padding is the zeros around
//! the tile; groups are independent blocks. `M'·C'·P ≤ N`.

use crate::HeError;
use crate::packing::{Kept, Layout};

/// A 2-D convolution's public geometry (NCHW, one inference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDims {
    /// input channels `C`
    pub channels: usize,
    /// input height and width
    pub height: usize,
    /// input width
    pub width: usize,
    /// output channels `M`
    pub out_channels: usize,
    /// kernel height and width
    pub kernel: [usize; 2],
    /// strides (rows, columns)
    pub strides: [usize; 2],
    /// dilations (rows, columns)
    pub dilations: [usize; 2],
    /// zero padding: top, left, bottom, right
    pub pads: [usize; 4],
    /// groups (divides `C` and `M`)
    pub group: usize,
}

impl ConvDims {
    /// Output height and width.
    pub fn output_hw(&self) -> [usize; 2] {
        let out = |n: usize, p0: usize, p1: usize, k: usize, s: usize, d: usize| {
            let span = d * (k - 1) + 1;
            let padded = n + p0 + p1;
            if padded < span {
                0
            } else {
                (padded - span) / s + 1
            }
        };
        [
            out(
                self.height,
                self.pads[0],
                self.pads[2],
                self.kernel[0],
                self.strides[0],
                self.dilations[0],
            ),
            out(
                self.width,
                self.pads[1],
                self.pads[3],
                self.kernel[1],
                self.strides[1],
                self.dilations[1],
            ),
        ]
    }

    /// Elements of one inference's input.
    pub fn input_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Elements of one inference's output.
    pub fn output_len(&self) -> usize {
        let [ho, wo] = self.output_hw();
        self.out_channels * ho * wo
    }

    /// Positive sizes, strides and dilations, groups dividing both channel
    /// counts, a non-empty output.
    pub fn is_valid(&self) -> bool {
        let pos = |v: &[usize]| v.iter().all(|&x| x > 0);
        pos(&[
            self.channels,
            self.height,
            self.width,
            self.out_channels,
            self.group,
        ]) && pos(&self.kernel)
            && pos(&self.strides)
            && pos(&self.dilations)
            && self.channels.is_multiple_of(self.group)
            && self.out_channels.is_multiple_of(self.group)
            && self.output_hw().iter().all(|&v| v > 0)
    }

    /// Input channels per group.
    pub fn group_channels(&self) -> usize {
        self.channels / self.group
    }

    /// Output channels per group.
    pub fn group_out_channels(&self) -> usize {
        self.out_channels / self.group
    }

    /// Padded width of every tile.
    fn padded_width(&self) -> usize {
        self.width + self.pads[1] + self.pads[3]
    }

    /// Rows of a tile holding `rows` output rows.
    fn tile_height(&self, rows: usize) -> usize {
        (rows - 1) * self.strides[0] + 1 + self.dilations[0] * (self.kernel[0] - 1)
    }

    /// Coefficients per channel of a tile of `rows` output rows.
    pub fn plane(&self, rows: usize) -> usize {
        self.tile_height(rows) * self.padded_width()
    }

    /// Kernel weights per output channel.
    fn kernel_len(&self) -> usize {
        self.group_channels() * self.kernel[0] * self.kernel[1]
    }
}

/// A convolution layout for a batch: blocks of `in_block` input channels and
/// `out_block` output channels within each group, tiles of `rows` output rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// the convolution
    pub dims: ConvDims,
    /// inferences in the batch
    pub count: usize,
    /// input channels per block (`C'`, within a group)
    pub in_block: usize,
    /// output channels per block (`M'`, within a group)
    pub out_block: usize,
    /// output rows per tile
    pub rows: usize,
}

impl ConvShape {
    fn in_blocks(&self) -> usize {
        self.dims.group_channels().div_ceil(self.in_block)
    }
    fn out_blocks(&self) -> usize {
        self.dims.group_out_channels().div_ceil(self.out_block)
    }
    fn tiles(&self) -> usize {
        self.dims.output_hw()[0].div_ceil(self.rows)
    }
    /// Input ciphertexts per inference.
    fn inputs_per_inference(&self) -> usize {
        self.tiles() * self.dims.group * self.in_blocks()
    }
    /// Replies per inference.
    fn outputs_per_inference(&self) -> usize {
        self.tiles() * self.dims.group * self.out_blocks()
    }
    fn plane(&self) -> usize {
        self.dims.plane(self.rows)
    }
    fn offset(&self) -> usize {
        let d = &self.dims;
        d.dilations[0] * (d.kernel[0] - 1) * d.padded_width() + d.dilations[1] * (d.kernel[1] - 1)
    }
}

impl Layout for ConvShape {
    fn input_ciphertexts(&self) -> usize {
        self.count * self.inputs_per_inference()
    }

    fn output_ciphertexts(&self) -> usize {
        self.count * self.outputs_per_inference()
    }

    fn fan_in_bound(&self) -> usize {
        self.dims.kernel_len() * self.out_block
    }

    fn input_plaintext(
        &self,
        k: usize,
        masks: &[&[u64]],
        degree: usize,
    ) -> Result<Vec<u64>, HeError> {
        let d = &self.dims;
        if k >= self.input_ciphertexts() || masks.len() != self.count {
            return Err(HeError::Shape(format!(
                "input ciphertext {k} of {} ({} masks for a batch of {})",
                self.input_ciphertexts(),
                masks.len(),
                self.count
            )));
        }
        let per = self.inputs_per_inference();
        let (b, rest) = (k / per, k % per);
        let (t, rest) = (
            rest / (d.group * self.in_blocks()),
            rest % (d.group * self.in_blocks()),
        );
        let (gr, gc) = (rest / self.in_blocks(), rest % self.in_blocks());
        let row = masks[b];
        if row.len() != d.input_len() {
            return Err(HeError::Shape(format!(
                "a mask of {} elements for a convolution of {} inputs",
                row.len(),
                d.input_len()
            )));
        }
        let (hp, wp, p) = (d.tile_height(self.rows), d.padded_width(), self.plane());
        let y0 = t * self.rows * d.strides[0]; // first padded row of the tile
        let mut m = vec![0u64; degree];
        let c_first = gr * d.group_channels() + gc * self.in_block;
        let c_end =
            (gr * d.group_channels() + (gc + 1) * self.in_block).min((gr + 1) * d.group_channels());
        for c in c_first..c_end {
            for yy in 0..hp {
                let Some(iy) = (y0 + yy).checked_sub(d.pads[0]).filter(|&v| v < d.height) else {
                    continue;
                };
                for x in 0..d.width {
                    let xx = x + d.pads[1];
                    m[(c - c_first) * p + yy * wp + xx] = row[(c * d.height + iy) * d.width + x];
                }
            }
        }
        Ok(m)
    }

    fn kept(&self, k: usize) -> Vec<Kept> {
        let d = &self.dims;
        if k >= self.output_ciphertexts() {
            return Vec::new();
        }
        let per = self.outputs_per_inference();
        let (b, rest) = (k / per, k % per);
        let (t, rest) = (
            rest / (d.group * self.out_blocks()),
            rest % (d.group * self.out_blocks()),
        );
        let (gr, fm) = (rest / self.out_blocks(), rest % self.out_blocks());
        let [ho, wo] = d.output_hw();
        let (wp, p, o) = (d.padded_width(), self.plane(), self.offset());
        let m_first = gr * d.group_out_channels() + fm * self.out_block;
        let m_end = (m_first + self.out_block).min((gr + 1) * d.group_out_channels());
        let mut out = Vec::new();
        for m in m_first..m_end {
            let slot = ((m - m_first) * self.in_block + self.in_block - 1) * p + o;
            for yl in 0..self.rows {
                let y = t * self.rows + yl;
                if y >= ho {
                    break;
                }
                for x in 0..wo {
                    out.push(Kept {
                        coefficient: slot + yl * d.strides[0] * wp + x * d.strides[1],
                        output: (m * ho + y) * wo + x,
                        inference: b,
                    });
                }
            }
        }
        out
    }

    fn terms(&self, k: usize) -> Vec<(usize, usize)> {
        let d = &self.dims;
        let per = self.outputs_per_inference();
        let (b, rest) = (k / per, k % per);
        let (t, rest) = (
            rest / (d.group * self.out_blocks()),
            rest % (d.group * self.out_blocks()),
        );
        let (gr, fm) = (rest / self.out_blocks(), rest % self.out_blocks());
        let first_input = b * self.inputs_per_inference() + (t * d.group + gr) * self.in_blocks();
        (0..self.in_blocks())
            .map(|gc| {
                (
                    first_input + gc,
                    (gr * self.out_blocks() + fm) * self.in_blocks() + gc,
                )
            })
            .collect()
    }

    fn weight_polys(&self) -> usize {
        self.dims.group * self.out_blocks() * self.in_blocks()
    }

    fn weight_positions(&self, poly: usize) -> Vec<(usize, usize)> {
        let d = &self.dims;
        let gc = poly % self.in_blocks();
        let fm = (poly / self.in_blocks()) % self.out_blocks();
        let gr = poly / (self.in_blocks() * self.out_blocks());
        let (wp, p, o) = (d.padded_width(), self.plane(), self.offset());
        let [kh, kw] = d.kernel;
        let cg = d.group_channels();
        let m_first = gr * d.group_out_channels() + fm * self.out_block;
        let m_end = (m_first + self.out_block).min((gr + 1) * d.group_out_channels());
        let c_first = gc * self.in_block; // within the group
        let c_end = (c_first + self.in_block).min(cg);
        let mut out = Vec::new();
        for m in m_first..m_end {
            for c in c_first..c_end {
                let slot = ((m - m_first) * self.in_block + self.in_block - 1 - (c - c_first)) * p;
                for i in 0..kh {
                    for j in 0..kw {
                        let coefficient = slot + o - i * d.dilations[0] * wp - j * d.dilations[1];
                        out.push((coefficient, ((m * cg + c) * kh + i) * kw + j));
                    }
                }
            }
        }
        out
    }

    fn weights_len(&self) -> usize {
        self.dims.out_channels * self.dims.kernel_len()
    }

    fn products(&self) -> usize {
        self.output_ciphertexts() * self.in_blocks()
    }

    fn kept_total(&self) -> usize {
        self.count * self.dims.output_len()
    }

    fn check(&self, degree: usize) -> Result<(), HeError> {
        let d = &self.dims;
        // validity first: the output size divides by the strides
        let fits = d.is_valid()
            && self.in_block >= 1
            && self.out_block >= 1
            && self.rows >= 1
            && self.in_block <= d.group_channels()
            && self.out_block <= d.group_out_channels()
            && self.rows <= d.output_hw()[0]
            && self
                .in_block
                .checked_mul(self.out_block)
                .and_then(|v| v.checked_mul(self.plane()))
                .is_some_and(|v| v <= degree);
        if self.count == 0 || self.count > degree || !fits {
            return Err(HeError::Shape(format!(
                "convolution layout {self:?} does not fit degree {degree}"
            )));
        }
        Ok(())
    }
}

/// Every convolution layout worth considering for a batch of `count`: each
/// input-channel block and each tile height, with the output-channel block
/// as large as the degree and `max_out_block` allow.
pub(crate) fn candidates(
    dims: &ConvDims,
    count: usize,
    degree: usize,
    max_out_block: usize,
) -> Vec<ConvShape> {
    let mut out = Vec::new();
    if !dims.is_valid() {
        return out;
    }
    let ho = dims.output_hw()[0];
    for rows in 1..=ho {
        let p = dims.plane(rows);
        if p > degree {
            break;
        }
        for in_block in 1..=dims.group_channels() {
            let room = degree / p / in_block;
            let out_block = room.min(dims.group_out_channels()).min(max_out_block);
            if out_block == 0 {
                break;
            }
            out.push(ConvShape {
                dims: *dims,
                count,
                in_block,
                out_block,
                rows,
            });
        }
    }
    out
}
