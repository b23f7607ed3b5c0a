#!/usr/bin/env python3
"""Write an ImageNet-size ResNet (torchvision's ResNet-18 or ResNet-50
architecture) as an ONNX file with random weights, for secinfer's large-model
test and benchmark.

    python scripts/make_resnet.py --depth 18 --out resnet18.onnx [--seed 0]

Needs only `onnx` and `numpy` (scripts/onnx-venv.sh makes a venv with both):
the graph is built node by node, not exported from torch, so that the test
suite does not have to install torch. The layers are those of
torchvision.models.resnet18 / resnet50 (He et al., CVPR 2016; torchvision's
"v1.5" variant with the stride on the 3x3 convolution of a bottleneck):

- stem: Conv 7x7/2 (3 -> 64, pad 3, no bias), BatchNormalization, Relu,
  MaxPool 3x3/2 (pad 1);
- four stages of residual blocks, 64/128/256/512 channels wide, [2,2,2,2]
  BasicBlocks (ResNet-18) or [3,4,6,3] Bottlenecks of expansion 4
  (ResNet-50); the first block of stages 2-4 has stride 2 and a 1x1/2
  convolution + BatchNormalization on its shortcut;
- GlobalAveragePool, Flatten, Gemm to 1,000 classes.

Weights follow torchvision's initialisation (Kaiming normal, fan-out, for
convolutions; uniform(+-1/sqrt(fan_in)) for the classifier). The
BatchNormalization statistics are drawn at random around torchvision's initial
values (mean ~0, variance ~1, scale ~1, shift ~0) so that folding them into
the convolutions is exercised with values that are not the identity.

Input "input" [N,3,224,224] float32, output "logits" [N,1000]; opset 13.
ResNet-18 has 11.7 M parameters (47 MB), ResNet-50 25.6 M (102 MB): the files
are written where the caller says and are not committed.
"""
import argparse
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13


class Builder:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes = []
        self.inits = []
        self.count = 0

    def name(self, prefix):
        self.count += 1
        return f"{prefix}_{self.count}"

    def init(self, prefix, array):
        n = self.name(prefix)
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), n))
        return n

    def conv(self, x, cin, cout, k, stride, pad):
        fan_out = cout * k * k
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_out), size=(cout, cin, k, k))
        out = self.name("conv")
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self.init("w", w)],
                [out],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
            )
        )
        return out

    def bn(self, x, c):
        scale = self.rng.uniform(0.8, 1.2, size=c)
        shift = self.rng.normal(0.0, 0.05, size=c)
        mean = self.rng.normal(0.0, 0.05, size=c)
        var = self.rng.uniform(0.8, 1.2, size=c)
        out = self.name("bn")
        self.nodes.append(
            helper.make_node(
                "BatchNormalization",
                [x, self.init("scale", scale), self.init("shift", shift),
                 self.init("mean", mean), self.init("var", var)],
                [out],
                epsilon=1e-5,
            )
        )
        return out

    def op(self, op_type, inputs, **attrs):
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def basic_block(self, x, cin, cout, stride):
        y = self.op("Relu", [self.bn(self.conv(x, cin, cout, 3, stride, 1), cout)])
        y = self.bn(self.conv(y, cout, cout, 3, 1, 1), cout)
        shortcut = x
        if stride != 1 or cin != cout:
            shortcut = self.bn(self.conv(x, cin, cout, 1, stride, 0), cout)
        return self.op("Relu", [self.op("Add", [y, shortcut])])

    def bottleneck(self, x, cin, width, stride):
        cout = width * 4
        y = self.op("Relu", [self.bn(self.conv(x, cin, width, 1, 1, 0), width)])
        y = self.op("Relu", [self.bn(self.conv(y, width, width, 3, stride, 1), width)])
        y = self.bn(self.conv(y, width, cout, 1, 1, 0), cout)
        shortcut = x
        if stride != 1 or cin != cout:
            shortcut = self.bn(self.conv(x, cin, cout, 1, stride, 0), cout)
        return self.op("Relu", [self.op("Add", [y, shortcut])])


def resnet(depth, seed, classes):
    blocks = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3]}[depth]
    b = Builder(seed)
    x = b.op("Relu", [b.bn(b.conv("input", 3, 64, 7, 2, 3), 64)])
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, count in enumerate(blocks):
        width = 64 << stage
        for i in range(count):
            stride = 2 if stage > 0 and i == 0 else 1
            if depth == 18:
                x = b.basic_block(x, cin, width, stride)
                cin = width
            else:
                x = b.bottleneck(x, cin, width, stride)
                cin = width * 4
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    bound = 1.0 / np.sqrt(cin)
    w = b.rng.uniform(-bound, bound, size=(classes, cin))
    bias = b.rng.uniform(-bound, bound, size=classes)
    b.nodes.append(
        helper.make_node(
            "Gemm", [x, b.init("fc_w", w), b.init("fc_b", bias)], ["logits"], transB=1
        )
    )
    graph = helper.make_graph(
        b.nodes,
        f"resnet{depth}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        b.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="secinfer scripts/make_resnet.py",
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, choices=[18, 50], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=1000)
    a = p.parse_args()
    model = resnet(a.depth, a.seed, a.classes)
    onnx.save(model, a.out)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(f"{a.out}: ResNet-{a.depth}, {len(model.graph.node)} nodes, {params} parameters",
          file=sys.stderr)


if __name__ == "__main__":
    main()
