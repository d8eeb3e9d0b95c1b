"""Trainable heads on frozen features, on the CPU: the only probe module that imports torch.

- `fit_decoder`: the paper's dense heads. 2D: shallow conv blocks on the patch-token
  map with bilinear upsampling to the mask resolution. 3D: each slice's token map
  stacked into a pseudo-3D feature volume, a light 3D conv decoder and a voxel-wise
  head. Dice + cross-entropy, AdamW, cosine schedule, a fixed step budget.
- `fit_abmil`: gated attention-MIL pooling of slice embeddings (Ilse et al. 2018).
- `seed_linear`: the paper's linear probe, one linear layer trained with BCE.

Arrays in, arrays out; nothing here opens a file or loads an encoder. Every fit runs
under `_deterministic`: fixed seeds (the global RNG is restored after), deterministic
algorithms and a fixed thread count, so a rerun gives the same bits on one machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featstore.errors import ProbeError
from featstore.probing.probes import patch_targets

THREADS = 1  # fixed: bit-identical reruns, and on a shared 2-core machine the fastest


@contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)


def _cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))


# ------------------------------------------------------------------ dense decoders


@dataclass(frozen=True)
class DecoderConfig:
    """The fixed budget and recipe of the dense heads (docs/probes.md, "Probes").

    The budget is `passes` image (2D) or slice (3D) forward/backward passes, whatever
    the dataset size: 250 steps of 4 images, or 125 steps of one 8-slice slab. lr 3e-3
    rather than the paper's 1e-4: the paper trains for many epochs, while this budget
    is a few hundred steps from a random init, where 1e-4 and 3e-4 leave the head far
    from converged (docs/probes.md, "Probes", gives the sweep).
    """

    passes: int = 1000
    batch: int = 4  # 2D: images per step
    slab: int = 8  # 3D: consecutive slices per step (one slab)
    width: int = 32  # channels after the 1x1 projection; halved at each upsampling
    lr: float = 3e-3
    weight_decay: float = 1e-4

    def steps(self, dims: int) -> int:
        """Optimizer steps for 2D or 3D data."""
        return max(1, self.passes // (self.batch if dims == 2 else self.slab))


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.GELU())


class _AcrossSlices(nn.Module):
    """A kernel-3 convolution along the slice axis, then GroupNorm and GELU:
    (B, C, D, r, c) -> same. With the 3x3 in-plane block before it, a factorised
    (2+1)D 3x3x3 convolution; as a Conv1d over each (row, col) it runs on the fast
    2D kernels, where torch's CPU Conv3d takes a slow im2col path."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(width, width, 3, padding=1)
        self.post = nn.Sequential(nn.GroupNorm(4, width), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, w, d, r, c = x.shape
        y = self.conv(x.permute(0, 3, 4, 1, 2).reshape(b * r * c, w, d))
        return self.post(y.reshape(b, r, c, w, d).permute(0, 3, 4, 1, 2))


class _Decoder(nn.Module):
    """A 1x1 projection of the tokens, a 3x3 conv block at the token grid (3D: then a
    conv across the stacked slices), two (x2 bilinear upsample, 3x3 conv block) stages,
    a 1x1 class head, and bilinear logits at the mask size.

    In 3D the slices of a slab are folded into the batch for the in-plane layers; only
    the grid-level block mixes slices, which keeps the decoder light enough for the
    probe's CPU budget (torch's CPU Conv3d is several times slower than 2D kernels).
    """

    def __init__(self, dims: int, c_in: int, n_classes: int, width: int) -> None:
        super().__init__()
        self.dims = dims
        self.proj = nn.Conv2d(c_in, width, 1)
        self.grid = _block(width, width)
        self.across = _AcrossSlices(width) if dims == 3 else None
        self.up = nn.ModuleList([_block(width, width // 2), _block(width // 2, width // 4)])
        self.head = nn.Conv2d(width // 4, n_classes, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, C, rows, cols) or (B, C, slices, rows, cols) tokens -> class logits
        (B, K, [slices,] H, W) at `size` (H, W), or at 4x the token grid when None."""
        b, depth = x.shape[0], x.shape[2] if self.dims == 3 else 1
        if self.dims == 3:  # fold slices into the batch for the 2D layers
            x = x.transpose(1, 2).flatten(0, 1)  # (B*D, C, r, c)
        x = self.grid(self.proj(x))
        if self.across is not None:
            x = self.across(x.unflatten(0, (b, depth)).transpose(1, 2))
            x = x.transpose(1, 2).flatten(0, 1)
        for block in self.up:
            x = block(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        x = self.head(x)
        if size is not None:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x if self.dims == 2 else x.unflatten(0, (b, depth)).transpose(1, 2)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice over the foreground classes (batch-wise).

    logits: (B, K, *spatial) float; target: (B, *spatial) int64 class ids.
    """
    ce = F.cross_entropy(logits, target)
    prob = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].to(prob.dtype)
    axes = [0, *range(2, prob.ndim)]
    inter = (prob * onehot).sum(axes)
    dice = (2 * inter + 1.0) / (prob.sum(axes) + onehot.sum(axes) + 1.0)
    return ce + (1 - dice.mean())


@dataclass(frozen=True)
class DenseHead:
    """A fitted decoder; `predict` gives label maps at the mask resolution."""

    model: _Decoder
    mean: np.ndarray  # (C,) token standardisation, from the training tokens
    std: np.ndarray
    dims: int
    param: float  # the learning rate (results rows' `param`)
    seconds: float

    def _input(self, patch: np.ndarray) -> torch.Tensor:
        x = (np.asarray(patch, np.float32) - self.mean) / self.std  # (n, rows, cols, C)
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)  # (n, C, r, c)
        return t if self.dims == 2 else t.permute(1, 0, 2, 3)[None]  # (1, C, n, r, c)

    def predict(self, patch: np.ndarray, size: int, batch: int = 32) -> np.ndarray:
        """2D: patch (n, rows, cols, C) -> (n, size, size) uint8, each image on its own.
        3D: the slices of ONE volume, in slice order -> its (n, size, size) label map."""
        out = self._maps(patch, size, batch, lambda logits: logits.argmax(1))
        return out.numpy().astype(np.uint8)

    def boundary(self, patch: np.ndarray, size: int, batch: int = 32) -> np.ndarray:
        """As `predict`, the softmax probability of class 1 instead of the arg-max:
        (n, size, size) float32 (instance datasets)."""
        out = self._maps(patch, size, batch, lambda logits: logits.softmax(1)[:, 1])
        return out.numpy().astype(np.float32)

    def _maps(
        self,
        patch: np.ndarray,
        size: int,
        batch: int,
        reduce: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """`reduce` of the class logits (B, K, H, W) of each image (2D) or slice (3D)."""
        with _deterministic(0), torch.no_grad():
            self.model.eval()
            if self.dims == 3:  # (1, K, n, H, W) -> the slices as a batch (n, K, H, W)
                return reduce(self.model(self._input(patch), (size, size))[0].transpose(0, 1))
            maps = [
                reduce(self.model(self._input(patch[s : s + batch]), (size, size)))
                for s in range(0, len(patch), batch)
            ]
            return torch.cat(maps)


def fit_decoder(
    patch: np.ndarray,
    mask: np.ndarray,
    volumes: list[np.ndarray],
    n_classes: int,
    dims: int,
    seed: int = 0,
    cfg: DecoderConfig = DecoderConfig(),
) -> DenseHead:
    """Train a dense head on frozen patch tokens.

    patch: (n, rows, cols, C) float16 | float32 training tokens (layers concatenated
    along C); mask: (n, H, W) uint8 class ids at the mask resolution; volumes: for 3D,
    the item indices of each training volume in slice order (2D: ignored).
    """
    if len(patch) == 0:
        raise ProbeError("the decoder needs training items")
    t0 = time.perf_counter()
    x = np.array(patch, np.float32)  # a copy, standardised in place
    flat = x.reshape(-1, x.shape[-1])
    mean = flat.mean(0, dtype=np.float64).astype(np.float32)
    std = (flat.std(0, dtype=np.float64) + 1e-6).astype(np.float32)
    x -= mean
    x /= std
    rng = np.random.default_rng(seed)
    with _deterministic(seed):
        model = _Decoder(dims, x.shape[-1], n_classes, cfg.width)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.steps(dims)
        sched = _cosine(opt, steps)
        tokens = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)  # (n, C, r, c)
        # The loss is taken at 4x the token grid (the decoder's own output, 4 px cells
        # for 16 px patches): finer than a patch, and ~3x cheaper than at the mask size.
        target = torch.from_numpy(patch_targets(mask, 4 * x.shape[1], 4 * x.shape[2], n_classes))
        depth = min([cfg.slab, *(len(v) for v in volumes)]) if dims == 3 else 0
        model.train()
        for _ in range(steps):
            if dims == 2:
                pick = torch.from_numpy(rng.choice(len(x), min(cfg.batch, len(x)), replace=False))
                inp, tgt = tokens[pick], target[pick]
            else:  # a slab of `depth` consecutive slices from a random volume
                v = int(rng.integers(0, len(volumes)))
                start = int(rng.integers(0, len(volumes[v]) - depth + 1))
                idx = torch.from_numpy(volumes[v][start : start + depth][None])  # (1, depth)
                inp = tokens[idx].permute(0, 2, 1, 3, 4)  # (B, C, depth, r, c)
                tgt = target[idx]
            loss = dice_ce_loss(model(inp), tgt)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return DenseHead(model, mean, std, dims, cfg.lr, time.perf_counter() - t0)


# ------------------------------------------------------------------ attention-MIL


class _GatedAttentionMIL(nn.Module):
    """Ilse et al. 2018: h = ReLU(W x); a = softmax(w^T (tanh(V h) * sigmoid(U h)))."""

    def __init__(self, d: int, n_out: int, hidden: int = 64, att: int = 32) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(d, hidden), nn.ReLU())
        self.v, self.u, self.w = nn.Linear(hidden, att), nn.Linear(hidden, att), nn.Linear(att, 1)
        self.classify = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, S, d) slices, keep: (B, S) bool (False: padding) -> logits, weights."""
        h = self.embed(x)
        score = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)
        a = score.masked_fill(~keep, float("-inf")).softmax(1)
        return self.classify((a.unsqueeze(-1) * h).sum(1)), a


@dataclass(frozen=True)
class MILResult:
    """Attention weights of every volume, and the MIL classifier's test scores."""

    weights: list[np.ndarray]  # per volume: (slices,) float64, summing to 1
    proba: np.ndarray  # (n_test, K) softmax, or (n_test, L) sigmoid for multi-hot labels
    lr: float
    seconds: float


def _pad(bags: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    depth = max(len(b) for b in bags)
    x = np.zeros((len(bags), depth, bags[0].shape[1]), np.float32)
    keep = np.zeros((len(bags), depth), bool)
    for i, b in enumerate(bags):
        x[i, : len(b)], keep[i, : len(b)] = b, True
    return torch.from_numpy(x), torch.from_numpy(keep)


def fit_abmil(
    bags: list[np.ndarray],
    y: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    n_classes: int,
    seed: int = 0,
    steps: int = 300,
    batch: int = 16,
    lr: float = 1e-3,
) -> MILResult:
    """Gated attention-MIL on slice embeddings, trained on the `train` volumes.

    bags: per volume, (slices, D) float features; y: (V,) int labels or (V, L)
    multi-hot; train, test: (V,) bool. Cross-entropy (BCE for multi-hot), AdamW
    (weight decay 1e-4) with a cosine schedule, `steps` minibatches of `batch` volumes.
    Inputs are standardised with the train slices' mean and std.
    """
    t0 = time.perf_counter()
    tr = np.flatnonzero(train)
    if len(tr) == 0 or not test.any():
        raise ProbeError("attention-MIL pooling needs train and test volumes")
    items = np.concatenate([bags[i] for i in tr]).astype(np.float64)
    mean, std = items.mean(0), items.std(0) + 1e-6
    norm = [((b - mean) / std).astype(np.float32) for b in bags]
    multi = y.ndim == 2
    rng = np.random.default_rng(seed)
    with _deterministic(seed):
        model = _GatedAttentionMIL(norm[0].shape[1], y.shape[1] if multi else n_classes)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = _cosine(opt, steps)
        for _ in range(steps):
            pick = rng.choice(tr, min(batch, len(tr)), replace=False)
            x, keep = _pad([norm[i] for i in pick])
            logits, _ = model(x, keep)
            target = torch.from_numpy(y[pick])
            loss = (
                F.binary_cross_entropy_with_logits(logits, target.float())
                if multi
                else F.cross_entropy(logits, target.long())
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            weights, logits_all = [], []
            for i in range(len(norm)):  # one volume at a time: no padding effects
                x, keep = _pad([norm[i]])
                lg, a = model(x, keep)
                weights.append(a[0].double().numpy())
                logits_all.append(lg[0])
            lt = torch.stack([logits_all[i] for i in np.flatnonzero(test)])
            proba = (lt.sigmoid() if multi else lt.softmax(1)).double().numpy()
    return MILResult(weights, proba, lr, time.perf_counter() - t0)


# ------------------------------------------------------------------ the seed's linear probe

SEED_LR, SEED_BATCH, SEED_EPOCHS = 0.005, 1024, 50


def seed_linear(
    xtr: np.ndarray,
    ytr: np.ndarray,
    xte: np.ndarray,
    n_classes: int,
    seed: int = 0,
    lr: float = SEED_LR,
    batch: int = SEED_BATCH,
    epochs: int = SEED_EPOCHS,
) -> np.ndarray:
    """The paper's linear probe: one linear layer on frozen features, trained with BCE.

    Exactly: targets one-hot (single-label) or multi-hot; `BCEWithLogits` averaged over
    the batch and the outputs; Adam (the paper names no optimizer; Adam with torch's
    defaults is our choice) at lr 0.005; minibatches of 1024 in a fresh seeded
    permutation each epoch (`numpy.random.default_rng(seed)`); 50 epochs; weights and
    bias start at zero; no feature scaling, no validation-based choice.

    xtr: (n, D) float; ytr: (n,) int or (n, L) multi-hot; returns (n_test, K or L)
    float64 per-output sigmoid probabilities.
    """
    target = np.eye(n_classes)[ytr] if ytr.ndim == 1 else ytr
    rng = np.random.default_rng(seed)
    with _deterministic(seed):
        layer = nn.Linear(xtr.shape[1], target.shape[1])
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        opt = torch.optim.Adam(layer.parameters(), lr=lr)
        x = torch.from_numpy(np.asarray(xtr, np.float32))
        t = torch.from_numpy(np.asarray(target, np.float32))
        for _ in range(epochs):
            order = rng.permutation(len(x))
            for s in range(0, len(x), batch):
                idx = torch.from_numpy(order[s : s + batch])
                loss = F.binary_cross_entropy_with_logits(layer(x[idx]), t[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            out = layer(torch.from_numpy(np.asarray(xte, np.float32))).sigmoid()
    return out.double().numpy()
