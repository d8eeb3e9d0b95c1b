"""Prints the Python, the GPU torch sees, and each package's version and origin.

Run by benchmarks/gpu/run.sh with the wheelhouse's target on PYTHONPATH: the origin
column shows which packages came from the wheels and which from the image.
"""

from __future__ import annotations

import importlib
import sys

MODULES = [
    *("torch", "transformers", "numpy", "pandas", "scipy", "sklearn", "xarray", "zarr"),
    *("numcodecs", "google_crc32c", "dask", "distributed", "pydantic", "nibabel", "pydicom"),
    *("PIL", "typer", "fsspec", "yaml", "psutil", "tqdm", "featstore"),
]


def main() -> None:
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    import torch

    cuda = torch.cuda.is_available()
    gpu = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if cuda else "no CUDA"
    print(f"torch {torch.__version__}: {gpu}")
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError as exc:
            print(f"{name:<14} MISSING ({exc})")
            continue
        version = getattr(mod, "__version__", "?")
        print(f"{name:<14} {version:<14} {getattr(mod, '__file__', '?')}")


if __name__ == "__main__":
    main()
