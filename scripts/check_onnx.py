#!/usr/bin/env python3
"""Validate ONNX files with onnx.checker.check_model(model, full_check=True).

Usage: check_onnx.py FILE...

Prints `ok FILE` or `FAIL FILE: reason` per file; exits 1 if any failed,
2 on bad usage or if the onnx package is missing.
"""
import sys


def one_line(exc):
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        import onnx
    except ImportError as e:
        print(f"check_onnx.py: cannot import onnx ({e}); run scripts/onnx-venv.sh", file=sys.stderr)
        return 2
    failed = 0
    for path in argv:
        try:
            model = onnx.load(path)
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:  # noqa: BLE001 - report any failure per file
            failed += 1
            print(f"FAIL {path}: {one_line(e)}", flush=True)
        else:
            print(f"ok {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
