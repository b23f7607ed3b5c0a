#!/usr/bin/env python3
"""Print the absolute path of onnx/backend/test/data/pytorch-converted.

That directory ships inside the installed `onnx` package: one sub-directory per
test case holding model.onnx and test_data_set_*/{input,output}_*.pb.

Usage: onnx_conformance_dir.py [--list]

--list also prints, to stderr, the test cases whose names start with
test_Conv, test_ConvTranspose, test_Linear or test_BatchNorm.
Exits 1 with a message if onnx or the directory is missing.
"""
import os
import sys

PREFIXES = ("test_Conv", "test_ConvTranspose", "test_Linear", "test_BatchNorm")


def main(argv):
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip(), file=sys.stderr)
        return 0
    unknown = [a for a in argv if a != "--list"]
    if unknown:
        print(f"onnx_conformance_dir.py: unknown argument(s): {' '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        import onnx
    except ImportError as e:
        print(f"onnx_conformance_dir.py: cannot import onnx ({e}); run scripts/onnx-venv.sh", file=sys.stderr)
        return 1
    path = os.path.abspath(
        os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "pytorch-converted")
    )
    if not os.path.isdir(path):
        print(
            f"onnx_conformance_dir.py: {path} not found (onnx {onnx.__version__} installed without its test data?)",
            file=sys.stderr,
        )
        return 1
    if "--list" in argv:
        cases = sorted(
            d for d in os.listdir(path)
            if d.startswith(PREFIXES) and os.path.isfile(os.path.join(path, d, "model.onnx"))
        )
        for c in cases:
            print(c, file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
