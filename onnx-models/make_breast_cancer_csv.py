#!/usr/bin/env python3
"""Write onnx-models/data/breast-cancer/breast_cancer.csv.

The Wisconsin diagnostic breast-cancer data set as shipped with scikit-learn
(`sklearn.datasets.load_breast_cancer`): 569 rows, 30 float features, label
0 = malignant, 1 = benign (sklearn's coding), plus a `split` column holding a
fixed stratified 80/20 train/test split (`train_test_split(..., test_size=0.2,
stratify=label, random_state=0)`).

Usage: python onnx-models/make_breast_cancer_csv.py [--out PATH]
"""
import argparse
import csv
import os

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

SEED = 0


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(here, "data", "breast-cancer", "breast_cancer.csv"))
    args = ap.parse_args()

    ds = load_breast_cancer()
    x, y = ds.data, ds.target
    idx = np.arange(len(y))
    _, test_idx = train_test_split(idx, test_size=0.2, stratify=y, random_state=SEED)
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_idx] = True

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(list(ds.feature_names) + ["label", "split"])
        for i in range(len(y)):
            w.writerow([repr(float(v)) for v in x[i]] + [int(y[i]), "test" if is_test[i] else "train"])
    print(f"wrote {args.out}: {len(y)} rows, {int((~is_test).sum())} train / {int(is_test.sum())} test")


if __name__ == "__main__":
    main()
