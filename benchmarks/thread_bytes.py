"""Do a CPU forward pass's bytes depend on torch's thread count?

The default `--threads` is `free_cores()`, which follows the machine's load, so a
resumed extract may run with another thread count than the run it resumes. This
encodes the same batch with several thread counts and compares the features bit for
bit (float32, and float16 as stored).

    python benchmarks/thread_bytes.py [--encoder dinov3-vits16] [--resolution 224]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from featstore.encode.encoders import load_encoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="dinov3-vits16")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 3, 8])
    args = ap.parse_args()
    enc = load_encoder(args.encoder, "cpu", None)
    r = args.resolution
    x = torch.randn(4, 3, r, r, generator=torch.Generator().manual_seed(0))
    out = {}
    for t in args.threads:
        torch.set_num_threads(t)
        fb = enc.encode(x, 1, (-1,))
        out[t] = np.concatenate([fb.cls.numpy().ravel(), fb.patch.numpy().ravel()])
    ref = out[args.threads[0]]
    for t in args.threads[1:]:
        same32 = np.array_equal(ref, out[t])
        same16 = np.array_equal(ref.astype(np.float16), out[t].astype(np.float16))
        first = args.threads[0]
        print(f"threads {first} vs {t}: float32 identical {same32}, float16 identical {same16}")


if __name__ == "__main__":
    main()
