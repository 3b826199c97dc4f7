"""What a target forward costs on this machine, as a function of how many tokens it scores.

Tree drafters size their trees against this curve (Sequoia's hardware-aware sizing): on a GPU
scoring 64 tokens costs about what scoring one does, on a small CPU it costs several times more,
and the best tree differs accordingly. The curve is measured once per model, format and machine
and cached under $GEARSHIFT_HOME/profiles.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from . import kernels
from .hub import atomic_file, home
from .model import Transformer

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 65)  # up to a full 64-node tree and its root
CONTEXT = 256  # a typical prompt + answer length for the benchmark's questions


@dataclass
class CostModel:
    sizes: list[int]
    seconds: list[float]

    def __call__(self, n: int) -> float:
        """Seconds for one target forward over n tokens (interpolated; extrapolated linearly past the end)."""
        if n <= self.sizes[-1]:
            return float(np.interp(n, self.sizes, self.seconds))
        slope = (self.seconds[-1] - self.seconds[-2]) / (self.sizes[-1] - self.sizes[-2])
        return self.seconds[-1] + slope * (n - self.sizes[-1])


def machine_key(model: Transformer, model_id: str) -> str:
    dev = model.device
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or platform.machine()}"
    cpu = ""
    if dev.type == "cpu" and os.path.exists("/proc/cpuinfo"):
        cpu = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    native = kernels.version() if dev.type == "cpu" else ""
    raw = (
        f"{model_id}|{model.fmts}|{model.dtype}|{dev.type}|{where}|{cpu}|{torch.get_num_threads()}|"
        f"{torch.__version__}|{native}"
    )
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@torch.inference_mode()
def measure(model: Transformer, sizes=SIZES, reps: int = 3) -> CostModel:
    """Median time of a tree-shaped forward (the shape tree verification runs) per size."""
    ctx = min(CONTEXT, model.cfg.max_seq_len - max(sizes) - 1)
    cache = model.new_cache(1, ctx + max(sizes) + 1)
    g = torch.Generator().manual_seed(0)
    model.run(torch.randint(0, model.cfg.vocab_size, (ctx,), generator=g), cache, logits_from=None)
    seconds = []
    for n in tqdm(sizes, desc="measuring forward cost", leave=False):
        tokens = torch.randint(0, model.cfg.vocab_size, (n,), generator=g)
        parents = [(i - 1) // 2 for i in range(1, n)]  # a binary tree below the first token
        times = []
        for _ in range(reps + 1):
            cache.rollback(0, ctx)
            t0 = time.perf_counter()
            model.run(tokens, cache, parents=parents)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        seconds.append(float(np.median(times[1:])))  # the first run warms up
    return CostModel(list(sizes), seconds)


def forward_costs(model: Transformer, model_id: str) -> CostModel:
    """The cached curve for this model on this machine, measured on first use."""
    path = home() / "profiles" / f"{machine_key(model, model_id)}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            return CostModel(data["sizes"], data["seconds"])
        except (ValueError, KeyError):
            pass  # unreadable: measure again
    costs = measure(model)
    with atomic_file(path) as f:
        f.write(json.dumps({"model": model_id, "sizes": costs.sizes, "seconds": costs.seconds}).encode())
    return costs


def memory_bandwidth(megabytes: int = 512, reps: int = 5) -> float:
    """Read bandwidth of this machine in bytes/s, all threads: the best of `reps` sums over a buffer
    far larger than the caches (what decoding does: stream every weight once per token)."""
    buf = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best


def bytes_per_token(model: Transformer, context: int) -> int:
    """Bytes one decode step must read: every weight of the layers and the LM head, one embedding
    row, and the KV cache of `context` earlier tokens (of a sliding-window layer, its window)."""
    table = ("embed", "embed_q", "embed_d")  # the input embedding table: one row of it is read
    weights = sum(
        b.numel() * b.element_size()
        for name, b in model.named_buffers()
        if name not in table and "inv_freq" not in name
    )
    row = sum(b[0].numel() * b.element_size() for name, b in model.named_buffers() if name in table)
    entry = 2 * model.cfg.n_kv_heads * model.cfg.head_dim * model.dtype.itemsize  # one layer, one position
    read = sum(context if w is None else min(context, w) for w in model.cfg.windows)  # sliding layers: the window
    return weights + row + read * entry
