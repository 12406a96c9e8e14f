"""Run in a venv with sae-lens and eai-sparsify: load SAE directories with the real packages.

Usage: python peer_reconstruct.py jobs.json, where jobs.json lists {"format", "dir", "x", "out"};
writes each reconstruction of the [n, d] float32 array in "x" (.npy) to "out" (.npy).
"""
import json
import sys

import numpy as np
import torch


def main(path):
  jobs = json.load(open(path))
  for job in jobs:
    x = torch.tensor(np.load(job["x"]))
    with torch.no_grad():
      if job["format"] == "sae_lens":
        from sae_lens import SAE
        out = SAE.load_from_disk(job["dir"], device="cpu")(x)
      elif job["format"] == "sparsify":
        from sparsify import SparseCoder
        out = SparseCoder.load_from_disk(job["dir"], device="cpu")(x).sae_out
      else:
        raise SystemExit(f"unknown format {job['format']}")
    np.save(job["out"], out.float().numpy())


if __name__ == "__main__":
  main(sys.argv[1])
