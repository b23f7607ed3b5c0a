//! Inputs for `secinfer predict`: `.npy` arrays, PNG images (image models)
//! and CSV rows (tabular models), each read into samples of the model's
//! per-sample shape, with an error naming the file and what does not fit.

use std::path::Path;

use anyhow::{Context, bail};
use ndarray::{ArrayD, IxDyn};

/// Samples read from the files, stacked on a new axis 0, with a label per
/// sample naming where it came from.
#[derive(Debug)]
pub struct Samples {
    /// `[n, sample shape...]`
    pub data: ArrayD<f32>,
    /// `file` or `file[row]` per sample
    pub names: Vec<String>,
}

/// Reads every file; `sample` is the shape of one sample.
pub fn read_all(paths: &[impl AsRef<Path>], sample: &[usize]) -> anyhow::Result<Samples> {
    let per: usize = sample.iter().product();
    let mut data = Vec::new();
    let mut names = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        let rows = match ext.as_str() {
            "npy" => read_npy(path, per),
            "png" => read_png(path, sample),
            "csv" => read_csv(path, per),
            _ => bail!(
                "{}: unknown input type; give .npy, .png or .csv files",
                path.display()
            ),
        }
        .with_context(|| format!("reading input {}", path.display()))?;
        let many = rows.len() > 1;
        for (i, row) in rows.into_iter().enumerate() {
            if let Some((j, v)) = row.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                bail!("{}: value {j} of sample {i} is {v}", path.display());
            }
            data.extend(row);
            names.push(if many {
                format!("{}[{i}]", path.display())
            } else {
                path.display().to_string()
            });
        }
    }
    let mut shape = vec![names.len()];
    shape.extend_from_slice(sample);
    Ok(Samples {
        data: ArrayD::from_shape_vec(IxDyn(&shape), data)?,
        names,
    })
}

/// A `.npy` file (format versions 1-3, C order, little-endian f32/f64,
/// u8, i32, i64): one sample if it holds `per` values, else a stack of
/// samples along its first axis.
fn read_npy(path: &Path, per: usize) -> anyhow::Result<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path)?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("not a .npy file (bad magic)");
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            let b = bytes.get(8..12).context("truncated header")?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
        }
        v => bail!("unsupported .npy format version {v}"),
    };
    let header = bytes
        .get(start..start + header_len)
        .context("truncated header")?;
    let header = std::str::from_utf8(header).context("header is not text")?;
    let field = |name: &str| -> anyhow::Result<&str> {
        let at = header
            .find(&format!("'{name}'"))
            .with_context(|| format!("header has no '{name}'"))?;
        let rest = header[at + name.len() + 2..].trim_start();
        Ok(rest.strip_prefix(':').unwrap_or(rest).trim_start())
    };
    if field("fortran_order")?.starts_with("True") {
        bail!("Fortran-order arrays are not supported; save with np.ascontiguousarray");
    }
    let descr = field("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .context("unreadable 'descr'")?;
    let shape_text = field("shape")?;
    let shape_text = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .context("unreadable 'shape'")?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .with_context(|| format!("bad dimension '{s}'"))
        })
        .collect::<anyhow::Result<_>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .context("shape overflows")?;
    let body = &bytes[start + header_len..];
    let values: Vec<f32> = match descr {
        "<f4" => le_values::<4>(body, count)?
            .map(f32::from_le_bytes)
            .collect(),
        "<f8" => le_values::<8>(body, count)?
            .map(|b| f64::from_le_bytes(b) as f32)
            .collect(),
        "|u1" | "<u1" => le_values::<1>(body, count)?
            .map(|b| f32::from(b[0]))
            .collect(),
        "<i4" => le_values::<4>(body, count)?
            .map(|b| i32::from_le_bytes(b) as f32)
            .collect(),
        "<i8" => le_values::<8>(body, count)?
            .map(|b| i64::from_le_bytes(b) as f32)
            .collect(),
        other => bail!(
            "unsupported element type '{other}' (use float32, float64, uint8, int32 or int64, little-endian)"
        ),
    };
    if per == 0 || count % per != 0 || count == 0 {
        bail!(
            "array of shape {shape:?} ({count} values) does not hold whole samples of {per} values"
        );
    }
    Ok(values.chunks(per).map(<[f32]>::to_vec).collect())
}

fn le_values<const N: usize>(
    body: &[u8],
    count: usize,
) -> anyhow::Result<impl Iterator<Item = [u8; N]> + '_> {
    let need = count.checked_mul(N).context("array too large")?;
    if body.len() < need {
        bail!(
            "data is truncated: {} bytes for {count} values of {N} bytes",
            body.len()
        );
    }
    Ok(body[..need]
        .chunks_exact(N)
        .map(|c| c.try_into().unwrap_or([0; N])))
}

/// A PNG image for a model whose sample is `[1, H, W]` (or `[H, W]`, or
/// `[H·W]` flattened): 8- or 16-bit grey, or colour turned grey, scaled to
/// [0, 1] as the bundled MNIST models expect.
fn read_png(path: &Path, sample: &[usize]) -> anyhow::Result<Vec<Vec<f32>>> {
    let file = std::fs::File::open(path)?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().context("not a PNG image")?;
    let mut buf = vec![0; reader.output_buffer_size().context("image too large")?];
    let info = reader.next_frame(&mut buf).context("corrupt PNG image")?;
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = info.color_type.samples();
    let per: usize = sample.iter().product();
    let dims: Vec<usize> = sample.iter().copied().filter(|&d| d != 1).collect();
    let fits = match dims.as_slice() {
        [hh, ww] => (*hh, *ww) == (h, w),
        [n] => *n == h * w,
        _ => false,
    };
    if !fits || per != h * w {
        bail!(
            "the image is {w}x{h}; the model takes samples of shape {sample:?} (a single-channel image of that size)"
        );
    }
    let pixels = buf[..info.buffer_size()]
        .chunks(channels)
        .map(|px| {
            let v = match channels {
                1 | 2 => f32::from(px[0]),
                _ => 0.299 * f32::from(px[0]) + 0.587 * f32::from(px[1]) + 0.114 * f32::from(px[2]),
            };
            v / 255.0
        })
        .collect();
    Ok(vec![pixels])
}

/// CSV rows of `per` numbers each. A first line that is not numbers is a
/// header; columns it names `label` or `split` are ignored (so rows of the
/// bundled breast-cancer CSV work as they are).
fn read_csv(path: &Path, per: usize) -> anyhow::Result<Vec<Vec<f32>>> {
    let text = std::fs::read_to_string(path)?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let mut skip = Vec::new();
    let mut rows = Vec::new();
    let mut first = true;
    for (i, line) in lines.by_ref() {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if first && cells.iter().any(|c| c.parse::<f32>().is_err()) {
            skip = cells
                .iter()
                .enumerate()
                .filter(|(_, c)| matches!(**c, "label" | "split"))
                .map(|(j, _)| j)
                .collect();
            first = false;
            continue;
        }
        first = false;
        let row: Vec<f32> = cells
            .iter()
            .enumerate()
            .filter(|(j, _)| !skip.contains(j))
            .map(|(j, c)| {
                c.parse::<f32>().with_context(|| {
                    format!("line {}, column {}: '{c}' is not a number", i + 1, j + 1)
                })
            })
            .collect::<anyhow::Result<_>>()?;
        if row.len() != per {
            bail!(
                "line {}: {} values; the model takes {per} per sample",
                i + 1,
                row.len()
            );
        }
        rows.push(row);
    }
    if rows.is_empty() {
        bail!("no data rows");
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, body: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(body);
        out
    }

    fn tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("secinfer-inputs-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn npy_stacks_and_single_samples() {
        let body: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let p = tmp("a.npy", &npy("<f4", "(2, 3)", &body));
        let s = read_all(&[&p], &[3]).unwrap();
        assert_eq!(s.data.shape(), &[2, 3]);
        assert_eq!(s.data[[1, 2]], 5.0);
        assert_eq!(s.names.len(), 2);
        let e = read_all(&[&p], &[4]).unwrap_err();
        assert!(format!("{e:#}").contains("whole samples"), "{e:#}");
        let p2 = tmp("b.npy", &npy("<f4", "(2, 3)", &body[..8]));
        assert!(format!("{:#}", read_all(&[&p2], &[3]).unwrap_err()).contains("truncated"));
        let p3 = tmp("c.npy", &npy("<c8", "(1,)", &[0; 8]));
        assert!(format!("{:#}", read_all(&[&p3], &[1]).unwrap_err()).contains("element type"));
        let nan: Vec<u8> = [1f32, f32::NAN, 2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let p4 = tmp("d.npy", &npy("<f4", "(3,)", &nan));
        assert!(format!("{:#}", read_all(&[&p4], &[3]).unwrap_err()).contains("NaN"));
        for p in [p, p2, p3, p4] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn csv_rows_with_header_and_ignored_columns() {
        let p = tmp("a.csv", b"a,b,label,split\n1,2,0,test\n3,4,1,train\n");
        let s = read_all(&[&p], &[2]).unwrap();
        assert_eq!(s.data.shape(), &[2, 2]);
        assert_eq!(s.data[[1, 1]], 4.0);
        let bad = tmp("b.csv", b"1,2\n3,x\n");
        let e = format!("{:#}", read_all(&[&bad], &[2]).unwrap_err());
        assert!(e.contains("line 2") && e.contains("'x'"), "{e}");
        let short = tmp("c.csv", b"1,2,3\n");
        assert!(format!("{:#}", read_all(&[&short], &[2]).unwrap_err()).contains("3 values"));
        for p in [p, bad, short] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn png_grey_image_scaled_to_unit_range() {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, 3, 2);
            enc.set_color(png::ColorType::Grayscale);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().unwrap();
            w.write_image_data(&[0, 255, 51, 0, 0, 255]).unwrap();
        }
        let p = tmp("a.png", &bytes);
        let s = read_all(&[&p], &[1, 2, 3]).unwrap();
        assert_eq!(s.data.shape(), &[1, 1, 2, 3]);
        assert_eq!(s.data[[0, 0, 0, 1]], 1.0);
        assert!((s.data[[0, 0, 0, 2]] - 0.2).abs() < 1e-6);
        let e = format!("{:#}", read_all(&[&p], &[1, 28, 28]).unwrap_err());
        assert!(e.contains("3x2"), "{e}");
        let _ = std::fs::remove_file(p);
        let junk = tmp("b.png", b"not a png");
        assert!(format!("{:#}", read_all(&[&junk], &[1, 2, 3]).unwrap_err()).contains("PNG"));
        let _ = std::fs::remove_file(junk);
    }
}
