#!/usr/bin/env python3
"""Train and export secinfer's bundled ONNX models.

    pip install -r onnx-models/requirements.txt
    python onnx-models/train.py --mnist-dir DIR --out onnx-models/

DIR holds the four gzipped MNIST IDX files (train-images.idx3-ubyte.gz,
train-labels.idx1-ubyte.gz, t10k-images.idx3-ubyte.gz, t10k-labels.idx1-ubyte.gz;
the `-idx3-ubyte.gz` spelling is accepted too). The breast-cancer CSV is read
from onnx-models/data/breast-cancer/breast_cancer.csv (see
make_breast_cancer_csv.py).

Writes to --out:
  mnist_mlp.onnx           784-128-128-10 ReLU MLP, input [N,1,28,28] = pixel/255
  mnist_cnn.onnx           2-conv CNN with one BatchNorm2d, same input/output
  mnist_cnn_small.onnx     2-conv 5x5 CNN (16/32 channels, FC 1568-100-10, no
                           BatchNorm), the size of CrypTen's MNIST benchmark CNN;
                           same input/output
  breast_cancer_mlp.onnx   30-16-2 ReLU MLP on raw features; the train split's
                           standardisation is in the graph as Sub/Div nodes
                           (exported folded into the first Gemm, then unfolded
                           by explicit_standardisation.py)
  accuracy.json            plaintext test accuracy + training details

Every model: input "input" (float32, batch dim "N"), output "logits"
[N, classes]; opset 13, legacy TorchScript exporter (dynamo=False).
Each file is checked with onnx.checker (full_check=True) and its test accuracy
is recomputed with onnx.reference.ReferenceEvaluator and must equal torch's.
"""
import argparse
import csv
import gzip
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import time
import warnings

import numpy as np
import onnx
import onnx.reference
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_max_pool import MaxPool as RefMaxPool
import torch
import torch.nn as nn
import torch.nn.functional as F

SEED = 0
THREADS = 2
OPSET = 13
HERE = os.path.dirname(os.path.abspath(__file__))
BC_CSV = os.path.join(HERE, "data", "breast-cancer", "breast_cancer.csv")


# --------------------------------------------------------------------------- utils

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def log(msg):
    print(msg, flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def n_params(model):
    return int(sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------- data

def _find(dir_, stem):
    """stem like 't10k-images' + '.idx3-ubyte.gz' or '-idx3-ubyte.gz'."""
    kind = "idx3" if "images" in stem else "idx1"
    for sep in (".", "-"):
        p = os.path.join(dir_, f"{stem}{sep}{kind}-ubyte.gz")
        if os.path.exists(p):
            return p
    sys.exit(f"train.py: {stem}.{kind}-ubyte.gz not found in {dir_}")


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(dims)


def load_mnist(dir_, split):
    images = read_idx(_find(dir_, f"{split}-images"))
    labels = read_idx(_find(dir_, f"{split}-labels"))
    # Exactly pixel/255 in float32 (IEEE division is correctly rounded), no mean/std.
    x = images.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    return x, labels.astype(np.int64)


def load_breast_cancer_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    assert header[-2:] == ["label", "split"], header[-2:]
    feats = np.array([[float(v) for v in r[:-2]] for r in rows], dtype=np.float64)
    labels = np.array([int(r[-2]) for r in rows], dtype=np.int64)
    split = np.array([r[-1] for r in rows])
    tr, te = split == "train", split == "test"
    return feats[tr], labels[tr], feats[te], labels[te], header[:-2]


# --------------------------------------------------------------------------- models

class MnistMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 128), nn.ReLU(),
            nn.Linear(128, 128), nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, x):
        return self.net(x)


class MnistCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, x):
        return self.net(x)


class MnistCNNSmall(nn.Module):
    """The MNIST CNN size used by CrypTen's benchmarks, so timings can be compared."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 100), nn.ReLU(),
            nn.Linear(100, 10),
        )

    def forward(self, x):
        return self.net(x)


class BreastCancerMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x)


# --------------------------------------------------------------------------- training

def random_shift(x, max_shift, gen):
    """Translate each image by an independent integer (dy, dx) in [-max_shift, max_shift]."""
    b, c, h, w = x.shape
    p = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]          # b,h,1
    cols = (dx[:, None] + torch.arange(w))[:, None, :]          # b,1,w
    bi = torch.arange(b)[:, None, None]
    return p[bi, 0, rows, cols][:, None]                        # b,1,h,w


def train_classifier(model, x, y, *, epochs, batch, lr, weight_decay=0.0, shift=0, name=""):
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for ep in range(epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(xt), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            xb, yb = xt[idx], yt[idx]
            if shift:
                xb = random_shift(xb, shift, gen)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            total += len(idx)
        if epochs <= 20 or ep % 25 == 24 or ep == epochs - 1:
            log(f"  [{name}] epoch {ep + 1}/{epochs} loss {loss_sum / total:.4f} "
                f"train acc {correct / total:.4f} ({time.time() - t0:.1f}s)")
    model.eval()
    return model


@torch.no_grad()
def torch_logits(model, x, batch=1000):
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i:i + batch])).numpy()
                           for i in range(0, len(x), batch)])


# --------------------------------------------------------------------------- export + verify

def export(model, example, path, *, keep_batchnorm=False):
    model.eval()
    kwargs = {}
    if keep_batchnorm:
        # The legacy exporter in TrainingMode.EVAL (default) runs an "eval peephole"
        # that fuses Conv+BatchNormalization. PRESERVE keeps the model's mode (eval,
        # so BatchNorm uses its running statistics) but skips that fusion, leaving a
        # BatchNormalization node for secinfer's converter to fold.
        kwargs["training"] = torch.onnx.TrainingMode.PRESERVE
    with warnings.catch_warnings():
        # Only applies to models left in training mode; ours is in eval mode.
        warnings.filterwarnings("ignore", message="It is recommended that constant folding be turned off")
        torch.onnx.export(
            model, (example,), path,
            dynamo=False, opset_version=OPSET, do_constant_folding=True,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            **kwargs,
        )
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    ops = [n.op_type for n in m.graph.node]
    log(f"  wrote {path} ({os.path.getsize(path)} bytes), ops: {' '.join(ops)}")
    return m, ops


class MaxPool(RefMaxPool):
    """onnx.reference's MaxPool, vectorised for the 2x2 / stride 2 / no-pad case.

    The reference MaxPool loops over output pixels in Python (~90 ms per MNIST
    image on this machine); max involves no rounding, so the reshape-based
    version gives bit-identical results. Any other configuration, or a request
    for the Indices output, uses onnx's own implementation.
    """

    op_domain = ""

    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None,
             pads=None, storage_order=None, strides=None):
        simple = (
            x.ndim == 4 and len(self.output) == 1
            and list(kernel_shape or []) == [2, 2] and list(strides or []) == [2, 2]
            and not any(pads or []) and not ceil_mode
            and all(d == 1 for d in (dilations or [1, 1]))
            and auto_pad in (None, "NOTSET", b"NOTSET")
            and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
        )
        if not simple:
            return super()._run(x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations,
                                kernel_shape=kernel_shape, pads=pads,
                                storage_order=storage_order, strides=strides)
        n, c, h, w = x.shape
        return (x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5)),)


class BatchNormalization(OpRun):
    """Spec-conformant inference-mode BatchNormalization for onnx.reference.

    Before opset 14, a BatchNormalization node with a single output is in test
    (inference) mode: Y = scale * (X - mean) / sqrt(var + epsilon) + B with the
    stored statistics; `momentum` only matters for training-mode nodes (five
    outputs). onnx.reference's opset-9..13 kernel instead blends the current
    batch's statistics into mean/var whenever momentum is set -- and the schema
    default fills it in -- so its output depends on the batch and differs from
    torch, onnxruntime and tract (onnx/onnx PR #8442). Only the one-output case
    is needed here; anything else is refused rather than guessed.
    """

    op_domain = ""

    def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, training_mode=None,
             is_test=None, spatial=None):
        if len(self.output) != 1 or training_mode:
            raise NotImplementedError("training-mode BatchNormalization")
        eps = 1e-5 if epsilon is None else epsilon
        shape = (-1,) + (1,) * (x.ndim - 2)
        y = (scale.reshape(shape) * (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
             + bias.reshape(shape))
        return (y.astype(x.dtype),)


def onnx_logits(path, x, batch):
    sess = onnx.reference.ReferenceEvaluator(path, new_ops=[MaxPool, BatchNormalization])
    return np.concatenate([sess.run(["logits"], {"input": x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


def verify(path, x, y, torch_out, batch):
    t0 = time.time()
    ref = onnx_logits(path, x, batch)
    acc_torch = float((torch_out.argmax(1) == y).mean())
    acc_onnx = float((ref.argmax(1) == y).mean())
    disagree = int((torch_out.argmax(1) != ref.argmax(1)).sum())
    max_diff = float(np.abs(torch_out - ref).max())
    log(f"  onnx.reference: acc {acc_onnx:.4f} (torch {acc_torch:.4f}), argmax disagreements "
        f"{disagree}, max |logit diff| {max_diff:.2e} ({time.time() - t0:.1f}s)")
    if acc_onnx != acc_torch:
        sys.exit(f"train.py: {path}: ONNX reference accuracy {acc_onnx} != torch accuracy {acc_torch}")
    return acc_torch, acc_onnx, disagree, max_diff, ref


def top2_margins(logits):
    """Per-example gap between the largest and second-largest logit."""
    top = np.sort(logits, axis=1)
    return top[:, -1] - top[:, -2]


def record(path, ops, model, x, y, logits, batch, details):
    acc_t, acc_o, disagree, max_diff, ref = verify(path, x, y, logits, batch)
    correct = int((logits.argmax(1) == y).sum())
    margins = top2_margins(ref)  # of the exported file's logits (onnx.reference)
    return {
        "file": os.path.basename(path),
        "sha256": sha256(path),
        "bytes": os.path.getsize(path),
        "test_accuracy": acc_t,
        "test_correct": correct,
        "test_total": int(len(y)),
        "onnx_reference_accuracy": acc_o,
        "onnx_reference_argmax_disagreements": disagree,
        "onnx_reference_max_abs_logit_diff": max_diff,
        # How close the nearest test examples are to an argmax flip: a secure
        # evaluation with larger logit error than this may disagree with plaintext.
        "test_min_top2_logit_margin": float(margins.min()),
        "test_examples_with_top2_margin_below_0.01": int((margins < 0.01).sum()),
        "test_examples_with_top2_margin_below_0.1": int((margins < 0.1).sum()),
        "onnx_ops": ops,
        "parameters": n_params(model),
        **details,
    }


# --------------------------------------------------------------------------- the models

def make_mnist_mlp(out, xtr, ytr, xte, yte):
    log("== mnist_mlp: 784-128-128-10 ReLU")
    seed_everything(SEED)
    cfg = dict(epochs=15, batch=128, lr=2e-3, weight_decay=0.0, shift=0)
    t0 = time.time()
    model = train_classifier(MnistMLP(), xtr, ytr, name="mlp", **cfg)
    secs = time.time() - t0
    logits = torch_logits(model, xte)
    path = os.path.join(out, "mnist_mlp.onnx")
    _, ops = export(model, torch.from_numpy(xte[:1]), path)
    return record(path, ops, model, xte, yte, logits, 2000, {
        "architecture": "Flatten; Linear 784->128; ReLU; Linear 128->128; ReLU; Linear 128->10",
        "input": "input float32 [N,1,28,28], pixel/255 (no mean/std normalisation)",
        "output": "logits float32 [N,10]",
        "train_set": "MNIST train, 60000 images",
        "test_set": "MNIST t10k, 10000 images",
        "optimizer": f"Adam (weight_decay {cfg['weight_decay']}), OneCycleLR max_lr {cfg['lr']}",
        "epochs": cfg["epochs"], "batch_size": cfg["batch"],
        "augmentation": "none",
        "loss": "cross-entropy",
        "seed": SEED, "train_seconds": round(secs, 1),
    })


def make_mnist_cnn(out, xtr, ytr, xte, yte):
    log("== mnist_cnn: conv32-pool-conv64-BN-pool-fc128-fc10")
    seed_everything(SEED)
    cfg = dict(epochs=8, batch=256, lr=3e-3, weight_decay=0.0, shift=2)
    t0 = time.time()
    model = train_classifier(MnistCNN(), xtr, ytr, name="cnn", **cfg)
    secs = time.time() - t0
    logits = torch_logits(model, xte)
    path = os.path.join(out, "mnist_cnn.onnx")
    _, ops = export(model, torch.from_numpy(xte[:1]), path, keep_batchnorm=True)
    if "BatchNormalization" not in ops:
        sys.exit("train.py: mnist_cnn.onnx lost its BatchNormalization node")
    return record(path, ops, model, xte, yte, logits, 500, {
        "architecture": ("Conv 1->32 3x3 pad 1; ReLU; MaxPool 2; Conv 32->64 3x3 pad 1; "
                         "BatchNorm2d(64) (eval, running stats); ReLU; MaxPool 2; Flatten; "
                         "Linear 3136->128; ReLU; Linear 128->10"),
        "input": "input float32 [N,1,28,28], pixel/255 (no mean/std normalisation)",
        "output": "logits float32 [N,10]",
        "train_set": "MNIST train, 60000 images",
        "test_set": "MNIST t10k, 10000 images",
        "optimizer": f"Adam (weight_decay {cfg['weight_decay']}), OneCycleLR max_lr {cfg['lr']}",
        "epochs": cfg["epochs"], "batch_size": cfg["batch"],
        "augmentation": f"random integer translation by up to {cfg['shift']} px in x and y (zero fill)",
        "loss": "cross-entropy",
        "export_note": "training=TrainingMode.PRESERVE (model in eval mode) so the exporter keeps "
                       "the BatchNormalization node instead of fusing it into the Conv",
        "seed": SEED, "train_seconds": round(secs, 1),
    })


def make_mnist_cnn_small(out, xtr, ytr, xte, yte):
    log("== mnist_cnn_small: conv16(5x5)-pool-conv32(5x5)-pool-fc100-fc10")
    seed_everything(SEED)
    # Same recipe as mnist_cnn.
    cfg = dict(epochs=8, batch=256, lr=3e-3, weight_decay=0.0, shift=2)
    t0 = time.time()
    model = train_classifier(MnistCNNSmall(), xtr, ytr, name="cnn_small", **cfg)
    secs = time.time() - t0
    logits = torch_logits(model, xte)
    path = os.path.join(out, "mnist_cnn_small.onnx")
    _, ops = export(model, torch.from_numpy(xte[:1]), path)
    return record(path, ops, model, xte, yte, logits, 500, {
        "architecture": ("Conv 1->16 5x5 pad 2; ReLU; MaxPool 2; Conv 16->32 5x5 pad 2; ReLU; "
                         "MaxPool 2; Flatten; Linear 1568->100; ReLU; Linear 100->10"),
        "input": "input float32 [N,1,28,28], pixel/255 (no mean/std normalisation)",
        "output": "logits float32 [N,10]",
        "train_set": "MNIST train, 60000 images",
        "test_set": "MNIST t10k, 10000 images",
        "optimizer": f"Adam (weight_decay {cfg['weight_decay']}), OneCycleLR max_lr {cfg['lr']}",
        "epochs": cfg["epochs"], "batch_size": cfg["batch"],
        "augmentation": f"random integer translation by up to {cfg['shift']} px in x and y (zero fill)",
        "loss": "cross-entropy",
        "note": "same size as the MNIST CNN in CrypTen's benchmarks, for comparing timings",
        "seed": SEED, "train_seconds": round(secs, 1),
    })


def make_breast_cancer(out):
    log("== breast_cancer_mlp: 30-16-2 ReLU on standardised features")
    seed_everything(SEED)
    xtr, ytr, xte, yte, names = load_breast_cancer_csv(BC_CSV)
    assert xtr.shape[1] == 30 and len(names) == 30
    mean = xtr.mean(axis=0)
    std = xtr.std(axis=0)  # population std of the train split
    norm = lambda a: ((a - mean) / std).astype(np.float32)
    cfg = dict(epochs=100, batch=32, lr=1e-3, weight_decay=1e-2, shift=0)
    t0 = time.time()
    model = train_classifier(BreastCancerMLP(), norm(xtr), ytr, name="bc", **cfg)
    secs = time.time() - t0
    logits_std = torch_logits(model, norm(xte))

    # Fold x_std = (x - mean) / std into Linear 1:  W' = W / std,  b' = b - W' @ mean.
    lin = model.net[0]
    w = lin.weight.detach().double().numpy()
    b = lin.bias.detach().double().numpy()
    w_f = w / std[None, :]
    b_f = b - w_f @ mean
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w_f.astype(np.float32)))
        lin.bias.copy_(torch.from_numpy(b_f.astype(np.float32)))
    xte32 = xte.astype(np.float32)
    logits = torch_logits(model, xte32)
    fold_diff = float(np.abs(logits - logits_std).max())
    fold_disagree = int((logits.argmax(1) != logits_std.argmax(1)).sum())
    log(f"  folding: max |logit diff| {fold_diff:.2e}, argmax changes {fold_disagree}")
    if fold_disagree:
        sys.exit("train.py: folding the standardisation changed a prediction")

    path = os.path.join(out, "breast_cancer_mlp.onnx")
    export(model, torch.from_numpy(xte32[:1]), path)
    # Folding gives layer-1 weights a ~10^5 dynamic range that one fixed-point
    # scale per layer cannot hold, so the bundled file carries the standardisation
    # as explicit Sub(mean)/Div(std) nodes in front of an unfolded Gemm.
    # explicit_standardisation.py does that rewrite (and checks it changes no
    # prediction); it needs the repository root as working directory.
    subprocess.run([sys.executable, os.path.join(HERE, "explicit_standardisation.py"),
                    os.path.abspath(path)], cwd=os.path.dirname(HERE), check=True)
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    ops = [n.op_type for n in m.graph.node]
    log(f"  rewrote {path} ({os.path.getsize(path)} bytes), ops: {' '.join(ops)}")
    return record(path, ops, model, xte32, yte, logits, len(xte32), {
        "architecture": "Sub(mean); Div(std); Linear 30->16; ReLU; Linear 16->2",
        "input": "input float32 [N,30], raw (un-normalised) features in the CSV's column order",
        "output": "logits float32 [N,2] (class 0 = malignant, 1 = benign)",
        "train_set": f"breast_cancer.csv split=train, {len(ytr)} rows",
        "test_set": f"breast_cancer.csv split=test, {len(yte)} rows",
        "preprocessing": "standardised with the train split's mean and population std; in the "
                         "ONNX file as explicit Sub(feature_mean) and Div(feature_std) nodes before "
                         "the first Gemm (exported folded, then unfolded by "
                         "explicit_standardisation.py)",
        "fold_max_abs_logit_diff": fold_diff,
        "optimizer": f"Adam (weight_decay {cfg['weight_decay']}), OneCycleLR max_lr {cfg['lr']}",
        "epochs": cfg["epochs"], "batch_size": cfg["batch"],
        "augmentation": "none",
        "loss": "cross-entropy",
        "hyperparameter_choice": "5-fold stratified CV on the train split (seed 0) over a few "
                                 "(epochs, lr, weight_decay) settings; test split not used",
        "seed": SEED, "train_seconds": round(secs, 1),
    })


# Short name (for --only) -> model name (file stem and accuracy.json key), in output order.
MODELS = {
    "mlp": "mnist_mlp",
    "cnn": "mnist_cnn",
    "cnn_small": "mnist_cnn_small",
    "bc": "breast_cancer_mlp",
}


def main():
    ap = argparse.ArgumentParser(description="Train and export secinfer's ONNX models.")
    ap.add_argument("--mnist-dir", required=True, help="directory with the four gzipped MNIST IDX files")
    ap.add_argument("--out", required=True, help="output directory (normally onnx-models/)")
    ap.add_argument("--only", default=",".join(MODELS),
                    help=f"comma-separated subset of {','.join(MODELS)} (or the full model names "
                         f"{','.join(MODELS.values())}); accuracy.json keeps the other entries")
    args = ap.parse_args()
    full_names = {v: k for k, v in MODELS.items()}
    which = {full_names.get(w, w) for w in args.only.split(",")}
    if not which <= set(MODELS):
        ap.error(f"--only: unknown model(s) {sorted(which - set(MODELS))}")

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    acc_path = os.path.join(args.out, "accuracy.json")
    results = {}
    if os.path.exists(acc_path) and which != set(MODELS):
        with open(acc_path) as f:
            results = json.load(f).get("models", {})

    t0 = time.time()
    if which & {"mlp", "cnn", "cnn_small"}:
        xtr, ytr = load_mnist(args.mnist_dir, "train")
        xte, yte = load_mnist(args.mnist_dir, "t10k")
        log(f"MNIST: train {xtr.shape}, test {xte.shape}")
        if "mlp" in which:
            results["mnist_mlp"] = make_mnist_mlp(args.out, xtr, ytr, xte, yte)
        if "cnn" in which:
            results["mnist_cnn"] = make_mnist_cnn(args.out, xtr, ytr, xte, yte)
        if "cnn_small" in which:
            results["mnist_cnn_small"] = make_mnist_cnn_small(args.out, xtr, ytr, xte, yte)
    if "bc" in which:
        results["breast_cancer_mlp"] = make_breast_cancer(args.out)

    summary = {
        "description": "Plaintext test accuracy of the bundled models (torch; equal to "
                       "onnx.reference.ReferenceEvaluator on the exported file).",
        "command": "python onnx-models/train.py --mnist-dir <dir> --out onnx-models/",
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "onnx": onnx.__version__,
            "threads": THREADS,
            "exporter": f"torch.onnx.export legacy TorchScript exporter (dynamo=False), opset {OPSET}",
        },
        "models": {k: results[k] for k in MODELS.values() if k in results},
    }
    with open(acc_path, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    log("")
    for k, r in summary["models"].items():
        log(f"{k:18s} test accuracy {r['test_accuracy']:.4f} ({r['test_correct']}/{r['test_total']})")
    log(f"wrote {acc_path} (total {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
