#!/usr/bin/env python3
"""Compares two kvf-llama generations (their `gen=` token ids and --logits-out files):
token agreement and the largest logit difference.

Usage: compare_runs.py GEN_A LOGITS_A GEN_B LOGITS_B VOCAB
Prints one line:
  agree=<positions with the same token>/<n> first_divergence=<index or none>
  max_logit_diff_before_divergence=<x> max_logit_diff_step0=<x>
Logits after the first divergence come from different contexts, so only the steps up to and
including the first divergence are compared for the logit difference.
"""
import sys

import numpy as np


def main():
    if len(sys.argv) != 6:
        print(__doc__)
        return 2
    ga = [int(t) for t in sys.argv[1].split()]
    gb = [int(t) for t in sys.argv[3].split()]
    vocab = int(sys.argv[5])
    la = np.fromfile(sys.argv[2], dtype="<f4").reshape(len(ga), vocab)
    lb = np.fromfile(sys.argv[4], dtype="<f4").reshape(len(gb), vocab)
    n = min(len(ga), len(gb))
    agree = sum(1 for i in range(n) if ga[i] == gb[i])
    first = next((i for i in range(n) if ga[i] != gb[i]), None)
    upto = n if first is None else first + 1
    diff = float(np.abs(la[:upto].astype(np.float64) - lb[:upto]).max())
    d0 = float(np.abs(la[0].astype(np.float64) - lb[0]).max())
    print(f"agree={agree}/{n} first_divergence={'none' if first is None else first} "
          f"max_logit_diff_before_divergence={diff:.4g} max_logit_diff_step0={d0:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
