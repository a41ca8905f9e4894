"""Data-parallel scaling: measured step time on 1/2/4 virtual CPU devices, the bytes all-reduced per
step (read from the compiled HLO), and a projection for 8 GPUs on one node and 4 nodes x 8 GPUs.

    python benchmarks/bench_scaling.py [--batch 256] [--steps 5] [--genes 2000] [--hidden 256]

Virtual CPU devices share this machine's cores, so the CPU timings show the cost of the sharded
step and its all-reduce on one host, not GPU speed-ups. The GPU projection combines the measured
all-reduce volume with the model's FLOPs and the stated hardware assumptions below.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import namedtuple

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import jax
import numpy as np

from ginseng._core.mesh import global_arrays, make_mesh, replicate
from ginseng.train import GinsengTrainerSettings
from ginseng.train.step import build_init, build_train_step

Batch = namedtuple("Batch", "x y slot mask index")

# ---- Assumptions for the GPU projection (stated, not measured here: no GPU in this task) -------
GPU_TFLOPS = 100.0  # achieved dense TF32 matmul throughput per H100 (~20 % of 495 TF32 peak)
NVLINK_GBPS = 360.0  # NCCL all-reduce bus bandwidth within an 8x H100 NVLink/NVSwitch node
IB_GBPS = 40.0  # per-GPU inter-node bandwidth: one 400 Gb/s NDR NIC per GPU, ~80 % achieved
LATENCY_S = 20e-6  # fixed cost per all-reduce call (launch + ring latency)


def model_flops_per_cell(n_genes: int, hidden: int, n_classes: int) -> float:
    """Training FLOPs per cell: forward matmuls x 3 (forward + two backward matmuls)."""
    macs = 2 * n_genes * n_genes + 2 * n_genes * hidden + n_genes * n_classes
    return 3 * 2 * macs


def allreduce_bytes_from_hlo(compiled_text: str) -> int:
    """Sum the output bytes of every all-reduce in the compiled HLO."""
    sizes = {"f32": 4, "s32": 4, "f16": 2, "bf16": 2, "f64": 8, "u32": 4, "pred": 1}
    total = 0
    for line in compiled_text.splitlines():
        if " all-reduce(" not in line and " all-reduce-start(" not in line:
            continue
        lhs = line.split("=", 1)[1] if "=" in line else line
        head = lhs.split("all-reduce", 1)[0]
        for dtype, dims in re.findall(r"(f32|s32|f16|bf16|f64|u32|pred)\[([0-9,]*)\]", head):
            n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            total += n * sizes[dtype]
    return total


def time_steps(n_devices, batch, steps, settings, n_genes, n_classes):
    mesh = make_mesh(jax.devices()[:n_devices])
    params, opt = build_init(settings, mesh, n_genes, n_classes)(jax.random.key(0))
    key = jax.random.wrap_key_data(replicate(jax.random.key_data(jax.random.key(1)), mesh))
    step = build_train_step(settings, mesh, total_steps=steps + 2)
    metrics = replicate(np.zeros(2, np.float32), mesh)
    rng = np.random.default_rng(0)
    x = rng.poisson(1.0, (batch, n_genes)).astype(np.float32)
    y = rng.integers(0, n_classes, batch).astype(np.int32)
    b = Batch(x, y, np.arange(batch, dtype=np.int32), np.ones(batch, bool), np.arange(batch))
    arrays = global_arrays(b, mesh, batch)
    hlo = step.lower(params, opt, metrics, key, *arrays).compile().as_text()
    params, opt, metrics = step(params, opt, metrics, key, *arrays)  # compile + warm up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, opt, metrics = step(params, opt, metrics, key, *arrays)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    param_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    return float(np.median(times)), allreduce_bytes_from_hlo(hlo), param_bytes


def ring_time(nbytes: float, n: int, gbps: float) -> float:
    return 2 * (n - 1) / n * nbytes / (gbps * 1e9) + LATENCY_S


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256, help="global batch for the CPU timings")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--gpu-batch", type=int, default=1024, help="per-GPU batch for the projection")
    args = ap.parse_args(argv)

    settings = GinsengTrainerSettings(hidden_dim=args.hidden)
    print(f"jax {jax.__version__}, {jax.device_count()} virtual CPU devices on {os.cpu_count()} cores")
    print(f"model: {args.genes} genes, hidden {args.hidden}, {args.classes} classes; "
          f"global batch {args.batch}; median of {args.steps} steps")
    base = None
    for n in (1, 2, 4):
        if n > jax.device_count():
            break
        t, ar_bytes, p_bytes = time_steps(n, args.batch, args.steps, settings, args.genes, args.classes)
        base = base or t
        print(f"  {n} device(s): step {t * 1e3:8.1f} ms  ({args.batch / t:8.0f} cells/s)  "
              f"speed-up {base / t:4.2f}  all-reduced per step {ar_bytes / 1e6:6.2f} MB "
              f"(parameters {p_bytes / 1e6:.2f} MB)")

    flops = model_flops_per_cell(args.genes, args.hidden, args.classes)
    cpu_gflops = flops * args.batch / base / 1e9
    print(f"\nmodel FLOPs: {flops / 1e6:.1f} MFLOP per cell per training step "
          f"(1 CPU device achieves {cpu_gflops:.0f} GFLOP/s)")
    compute = flops * args.gpu_batch / (GPU_TFLOPS * 1e12)
    print(f"\nProjection at per-GPU batch {args.gpu_batch} (assumptions: {GPU_TFLOPS:.0f} TFLOP/s achieved "
          f"per H100, NVLink all-reduce {NVLINK_GBPS:.0f} GB/s bus bandwidth, InfiniBand "
          f"{IB_GBPS:.0f} GB/s per GPU, {LATENCY_S * 1e6:.0f} us per all-reduce; ring all-reduce "
          f"2(n-1)/n x bytes / bandwidth; no overlap of communication with compute)")
    print(f"  compute per step: {compute * 1e3:.3f} ms")
    cases = [
        ("8 GPUs, 1 node (NVLink)", ring_time(p_bytes, 8, NVLINK_GBPS)),
        # Hierarchical (NCCL-like): reduce-scatter/all-gather over NVLink inside the node, and
        # an inter-node ring over 4 nodes of each GPU's 1/8 shard on its own NIC.
        ("32 GPUs, 4 nodes x 8 (hierarchical)",
         ring_time(p_bytes, 8, NVLINK_GBPS) + ring_time(p_bytes / 8, 4, IB_GBPS)),
        ("32 GPUs, 4 nodes x 8 (flat ring over IB)", ring_time(p_bytes, 32, IB_GBPS)),
    ]
    for name, comm in cases:
        eff = compute / (compute + comm)
        print(f"  {name:42s}: all-reduce {comm * 1e3:.3f} ms -> step {(compute + comm) * 1e3:.3f} ms, "
              f"scaling efficiency {eff * 100:.0f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
