//! The bundled data sets: the MNIST test set (gzipped IDX files) and the
//! Wisconsin breast-cancer table (CSV), read into f32 tensors and labels.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, bail};
use ndarray::{Array2, Array4, ArrayD};

/// A labelled data set, inputs stacked on axis 0.
pub struct Dataset {
    /// name as given on the command line
    pub name: String,
    /// inputs, sample i at index i of axis 0
    pub inputs: ArrayD<f32>,
    /// class of each sample
    pub labels: Vec<usize>,
}

/// Directory of the bundled data, next to the models.
pub fn data_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("onnx-models")
        .join("data")
}

fn gunzip(path: &Path) -> anyhow::Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut out)
        .with_context(|| format!("{}: not a gzip file", path.display()))?;
    Ok(out)
}

fn be_u32(bytes: &[u8], at: usize, path: &Path) -> anyhow::Result<usize> {
    let b = bytes
        .get(at..at + 4)
        .with_context(|| format!("{}: truncated IDX header", path.display()))?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// MNIST images as [N, 1, 28, 28] in [0, 1] and their labels.
pub fn mnist(dir: &Path) -> anyhow::Result<Dataset> {
    let ipath = dir.join("t10k-images.idx3-ubyte.gz");
    let lpath = dir.join("t10k-labels.idx1-ubyte.gz");
    let images = gunzip(&ipath)?;
    let labels = gunzip(&lpath)?;
    if be_u32(&images, 0, &ipath)? != 0x803 || be_u32(&labels, 0, &lpath)? != 0x801 {
        bail!(
            "{} / {}: not MNIST IDX files (bad magic number)",
            ipath.display(),
            lpath.display()
        );
    }
    let (n, rows, cols) = (
        be_u32(&images, 4, &ipath)?,
        be_u32(&images, 8, &ipath)?,
        be_u32(&images, 12, &ipath)?,
    );
    if be_u32(&labels, 4, &lpath)? != n
        || images.len() != 16 + n * rows * cols
        || labels.len() != 8 + n
    {
        bail!("MNIST files disagree on their sizes or are truncated");
    }
    let pixels: Vec<f32> = images[16..].iter().map(|&p| f32::from(p) / 255.0).collect();
    let inputs = Array4::from_shape_vec((n, 1, rows, cols), pixels)?.into_dyn();
    let labels = labels[8..].iter().map(|&l| l as usize).collect();
    Ok(Dataset {
        name: "mnist".into(),
        inputs,
        labels,
    })
}

/// The test split of the breast-cancer CSV: 30 raw features, label 0/1.
pub fn breast_cancer(path: &Path) -> anyhow::Result<Dataset> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().context("empty CSV")?.split(',').collect();
    let label_col = header
        .iter()
        .position(|h| *h == "label")
        .context("CSV has no 'label' column")?;
    let split_col = header
        .iter()
        .position(|h| *h == "split")
        .context("CSV has no 'split' column")?;
    let mut features = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() != header.len() {
            bail!(
                "{} line {}: {} cells, header has {}",
                path.display(),
                i + 2,
                cells.len(),
                header.len()
            );
        }
        if cells[split_col] != "test" {
            continue;
        }
        for (j, c) in cells.iter().enumerate() {
            if j == label_col || j == split_col {
                continue;
            }
            features.push(
                c.trim().parse::<f32>().with_context(|| {
                    format!("{} line {}: bad number '{c}'", path.display(), i + 2)
                })?,
            );
        }
        labels.push(
            cells[label_col]
                .trim()
                .parse::<usize>()
                .with_context(|| format!("{} line {}: bad label", path.display(), i + 2))?,
        );
    }
    let width = header.len() - 2;
    let inputs = Array2::from_shape_vec((labels.len(), width), features)?.into_dyn();
    Ok(Dataset {
        name: "breast-cancer".into(),
        inputs,
        labels,
    })
}

/// Loads a bundled data set by name.
pub fn load(name: &str) -> anyhow::Result<Dataset> {
    match name {
        "mnist" => mnist(&data_dir().join("mnist")),
        "breast-cancer" => {
            breast_cancer(&data_dir().join("breast-cancer").join("breast_cancer.csv"))
        }
        other => bail!("unknown data set '{other}' (known: mnist, breast-cancer)"),
    }
}

/// The first `n` inputs of a bundled data set, for the converter's calibration.
pub fn calibration_samples(name: &str, n: usize) -> anyhow::Result<tract_onnx::prelude::Tensor> {
    use tract_onnx::prelude::IntoTensor;
    let data = load(name)?;
    let n = n.min(data.inputs.len_of(ndarray::Axis(0)));
    Ok(data
        .inputs
        .slice_axis(ndarray::Axis(0), (0..n).into())
        .to_owned()
        .into_tensor())
}
