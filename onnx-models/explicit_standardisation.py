"""Rewrite breast_cancer_mlp.onnx so that standardisation is explicit.

train.py folds x_std = (x - mean) / std into the first Linear layer. That
gives layer-1 weights a dynamic range of ~10^5 (features range from 0.05 to
4,000), which one fixed-point scale per layer cannot represent well. This
script undoes the fold: the model gets explicit Sub(mean) and Div(std) nodes
in front of the first Gemm (they run on the client: data statistics, not
weights) and the Gemm gets the unfolded weights W = W' * std,
b = b' + W' @ mean. The function computed is unchanged (checked with
onnx.reference on the test split).

    python onnx-models/explicit_standardisation.py onnx-models/breast_cancer_mlp.onnx
"""
import csv
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

path = sys.argv[1]
rows = list(csv.DictReader(open("onnx-models/data/breast-cancer/breast_cancer.csv")))
features = [k for k in rows[0] if k not in ("label", "split")]
def table(split):
    sel = [r for r in rows if r["split"] == split]
    return np.array([[float(r[f]) for f in features] for r in sel], dtype=np.float64)
xtr, xte = table("train"), table("test")
mean, std = xtr.mean(axis=0), xtr.std(axis=0)

model = onnx.load(path)
g = model.graph
if any(n.op_type == "Sub" for n in g.node):
    sys.exit("already explicit")
before = ReferenceEvaluator(model).run(None, {"input": xte.astype(np.float32)})[0]
gemm = next(n for n in g.node if n.op_type == "Gemm")
inits = {t.name: t for t in g.initializer}
trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
w = numpy_helper.to_array(inits[gemm.input[1]]).astype(np.float64)
b = numpy_helper.to_array(inits[gemm.input[2]]).astype(np.float64)
wk = w.T if trans_b else w  # [in, out]
b_new = b + mean @ wk
wk_new = wk * std[:, None]
w_new = wk_new.T if trans_b else wk_new
inits[gemm.input[1]].CopyFrom(numpy_helper.from_array(w_new.astype(np.float32), gemm.input[1]))
inits[gemm.input[2]].CopyFrom(numpy_helper.from_array(b_new.astype(np.float32), gemm.input[2]))
g.initializer.extend([
    numpy_helper.from_array(mean.astype(np.float32), "feature_mean"),
    numpy_helper.from_array(std.astype(np.float32), "feature_std"),
])
x = gemm.input[0]
gemm.input[0] = "standardised"
nodes = [
    helper.make_node("Sub", [x, "feature_mean"], ["centred"], name="standardise_sub"),
    helper.make_node("Div", ["centred", "feature_std"], ["standardised"], name="standardise_div"),
]
idx = list(g.node).index(gemm)
for i, n in enumerate(nodes):
    g.node.insert(idx + i, n)
onnx.checker.check_model(model, full_check=True)
after = ReferenceEvaluator(model).run(None, {"input": xte.astype(np.float32)})[0]
diff = float(np.abs(after - before).max())
changed = int((after.argmax(1) != before.argmax(1)).sum())
print(f"max |logit diff| {diff:.2e}, argmax changes {changed}")
if changed:
    sys.exit("rewrite changed a prediction")
onnx.save(model, path)
