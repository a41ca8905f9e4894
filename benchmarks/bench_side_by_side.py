"""Loader and training throughput side by side: ginseng (this repo), reference ginseng 0.1.4 and
annbatch 0.3.1, on the same synthetic data; prints one table.

Each tool runs in its own interpreter (subprocess): ours in this one, the reference and annbatch in
the virtual environments made by ``bash benchmarks/setup_envs.sh`` (Python 3.12; the reference
package is also named ``ginseng``, so it can never share an interpreter with ours).

Measured:
  loader  cells/s of a shuffled epoch of batches (split "train", batch 256, densified float32):
          ours ``iter_batches`` and ``loader()`` (median of --repeats epochs), the reference's
          ``iter_batches`` (capped at --ref-loader-seconds: it reads one chunk per row), annbatch's
          Loader over its pre-shuffled sharded zarr collection (zarrs codec pipeline, and zarr-python's).
  train   cells/s of steady-state epochs (epoch >= 2: training + holdout evaluation, compile excluded):
          ours GinsengTrainer from a disk-backed dataset, the reference's GinsengTrainer
          (balance_train=False, on the first --ref-train-cells cells: it is slow), and our jitted
          step alone on one in-memory batch (the compute ceiling), measured in the same process.

Usage::

    bash benchmarks/setup_envs.sh          # once
    python benchmarks/bench_side_by_side.py --cells 50000 --json benchmarks/out/side.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"


def ensure_data(path: Path, cells: int, genes: int, types: int, seed: int) -> dict:
    """Generate the synthetic h5ad unless one with the same parameters is already there."""
    if path.exists():
        try:
            with h5py.File(path, "r") as f:
                meta = json.loads(
                    f["uns/synth"][()].decode()
                    if isinstance(f["uns/synth"][()], bytes)
                    else f["uns/synth"][()]
                )
                nnz = f["X/data"].shape[0]
            if (meta["cells"], meta["genes"], meta["types"], meta["seed"]) == (
                cells,
                genes,
                types,
                seed,
            ):
                # meta["density"] is the target; report the measured one.
                return {
                    "reused": str(path),
                    **meta,
                    "target_density": meta["density"],
                    "density": nnz / (cells * genes),
                    "nnz": nnz,
                }
        except (KeyError, OSError, ValueError):
            pass
    cmd = [
        sys.executable,
        str(HERE / "synth.py"),
        "--cells",
        str(cells),
        "--genes",
        str(genes),
        "--types",
        str(types),
        "--seed",
        str(seed),
        "--out",
        str(path),
        "--overwrite",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_worker(name: str, python: Path, args: list[str], logdir: Path, timeout: float) -> dict:
    """Run one worker script; its last stdout line is JSON. Errors become a row with the reason."""
    if not Path(python).exists():
        return {"error": f"{python} not found: run `bash benchmarks/setup_envs.sh` first"}
    load = os.getloadavg()[0]
    log = logdir / f"{name}.log"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [str(python), *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return {"error": f"exit {proc.returncode}: {tail[0]} (log: {log})"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["loadavg_1m_before"] = load
    res["worker_wall_s"] = time.perf_counter() - t0
    return res


def fmt(v, nd=0):
    return "n/a" if v is None else f"{v:,.{nd}f}"


def table(results: dict) -> str:
    """One markdown table with every figure and the ratios the issue's targets are stated in."""
    g = lambda k, f="cells_per_s": results.get(k, {}).get(f)
    rows = [
        (
            "loader",
            "ginseng (ours) iter_batches, shuffled",
            g("ours_loader"),
            "median of epochs "
            + ", ".join(
                fmt(v) for v in results.get("ours_loader", {}).get("iter_batches_cells_per_s", [])
            ),
        ),
        (
            "loader",
            "ginseng (ours) loader(), shuffled",
            None
            if "ours_loader" not in results
            else sorted(results["ours_loader"]["loader_cells_per_s"])[
                len(results["ours_loader"]["loader_cells_per_s"]) // 2
            ],
            "median of epochs "
            + ", ".join(
                fmt(v) for v in results.get("ours_loader", {}).get("loader_cells_per_s", [])
            ),
        ),
        (
            "loader",
            "ginseng 0.1.4 iter_batches, shuffled",
            g("ref_loader"),
            f"{fmt(g('ref_loader', 'cells'))} cells in {fmt(g('ref_loader', 'seconds'), 1)} s",
        ),
        (
            "loader",
            "annbatch 0.3.1 (zarrs), densified",
            g("annb_loader"),
            f"chunk 512, preload 32; {fmt(g('annb_loader', 'cells'))} cells",
        ),
        (
            "loader",
            "annbatch 0.3.1 (zarr-python), densified",
            g("annb_loader_zarrpy"),
            f"{fmt(g('annb_loader_zarrpy', 'cells'))} cells",
        ),
        (
            "train",
            "ginseng (ours) GinsengTrainer, disk-backed",
            g("ours_train"),
            f"{fmt(g('ours_train', 'train_cells'))} train cells, epochs "
            + ", ".join(f"{v:.1f}s" for v in results.get("ours_train", {}).get("epoch_s", [])),
        ),
        (
            "train",
            "ginseng (ours) GinsengTrainer, disk-backed, train steps only",
            g("ours_train", "train_only_cells_per_s"),
            "the same epochs without their holdout evaluation: "
            + ", ".join(f"{v:.1f}s" for v in results.get("ours_train", {}).get("train_only_s", [])),
        ),
        (
            "train",
            "ginseng (ours) jitted step alone (ceiling)",
            None
            if "ours_train" not in results or "ceiling_cells_per_s" not in results["ours_train"]
            else sum(results["ours_train"]["ceiling_cells_per_s"]) / 2,
            "before/after training: "
            + ", ".join(
                fmt(v) for v in results.get("ours_train", {}).get("ceiling_cells_per_s", [])
            ),
        ),
        (
            "train",
            "ginseng 0.1.4 jitted step alone (its ceiling)",
            g("ref_train", "ceiling_cells_per_s"),
            "reference nn/opt, batched dropout, no per-cell keys",
        ),
        (
            "train",
            "ginseng 0.1.4 GinsengTrainer (balance_train=False)",
            g("ref_train"),
            f"{fmt(g('ref_train', 'train_cells'))} train cells, epochs "
            + ", ".join(f"{v:.1f}s" for v in results.get("ref_train", {}).get("epoch_s", [])),
        ),
    ]
    keys = [
        "ours_loader",
        "ours_loader",
        "ref_loader",
        "annb_loader",
        "annb_loader_zarrpy",
        "ours_train",
        "ours_train",
        "ours_train",
        "ref_train",
        "ref_train",
    ]
    out = ["| part | tool | cells/s | load | notes |", "| --- | --- | ---: | ---: | --- |"]
    for (part, tool, v, note), k in zip(rows, keys):
        load = results.get(k, {}).get("loadavg_1m_before")
        out.append(f"| {part} | {tool} | {fmt(v)} | {fmt(load, 1)} | {note} |")
    ratios = []
    ol, al, rl = g("ours_loader"), g("annb_loader"), g("ref_loader")
    ot, rt = g("ours_train"), g("ref_train")
    if ol and al:
        ratios.append(f"ours iter_batches / annbatch (zarrs): {ol / al:.2f}x")
    if ol and g("annb_loader_zarrpy"):
        ratios.append(
            f"ours iter_batches / annbatch (zarr-python): {ol / g('annb_loader_zarrpy'):.2f}x"
        )
    if ol and rl:
        ratios.append(f"ours iter_batches / ginseng 0.1.4: {ol / rl:.1f}x")
    if ot and "ours_train" in results and "fraction_of_ceiling" in results["ours_train"]:
        ratios.append(
            f"ours training / ceiling: {100 * results['ours_train']['fraction_of_ceiling']:.0f}%"
        )
    if ot and "ours_train" in results and "train_only_fraction_of_ceiling" in results["ours_train"]:
        ratios.append(
            "ours train steps only (no holdout evaluation) / ceiling: "
            f"{100 * results['ours_train']['train_only_fraction_of_ceiling']:.0f}%"
        )
    if ot and rt:
        ratios.append(f"ours training / ginseng 0.1.4 training: {ot / rt:.1f}x")
    if rt and g("ref_train", "ceiling_cells_per_s"):
        ratios.append(
            "ginseng 0.1.4 training / its own step ceiling: "
            f"{100 * rt / g('ref_train', 'ceiling_cells_per_s'):.0f}%"
        )
    if rt and "ours_train" in results and "ceiling_cells_per_s" in results["ours_train"]:
        ceil = sum(results["ours_train"]["ceiling_cells_per_s"]) / 2
        ratios.append(f"our step ceiling / ginseng 0.1.4 training: {ceil / rt:.1f}x")
    errors = [
        f"{k}: {v['error']}" for k, v in results.items() if isinstance(v, dict) and "error" in v
    ]
    return "\n".join(out + [""] + ratios + (["", "errors:"] + errors if errors else []))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=50_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--types", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="epochs timed for our loaders")
    p.add_argument("--epochs", type=int, default=3, help="our trainer epochs (first is compile)")
    p.add_argument(
        "--train-cells", type=int, default=0, help="cells of the dataset our trainer uses (0 = all)"
    )
    p.add_argument("--ref-loader-seconds", type=float, default=30.0)
    p.add_argument("--ref-train-cells", type=int, default=10_000)
    p.add_argument("--ref-epochs", type=int, default=2)
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=[
            "ours_loader",
            "ours_train",
            "ref_loader",
            "ref_train",
            "annb_loader",
            "annb_loader_zarrpy",
        ],
    )
    p.add_argument("--workdir", default=str(HERE / "out" / "side"))
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    h5ad = work / f"synth_{a.cells}x{a.genes}_{a.types}t_s{a.seed}.h5ad"
    t0 = time.perf_counter()
    data = ensure_data(h5ad, a.cells, a.genes, a.types, a.seed)
    common = ["--h5ad", str(h5ad), "--workdir", str(work), "--batch-size", str(a.batch_size)]
    ref_py, annb_py = VENVS / "ref" / "bin" / "python", VENVS / "annb" / "bin" / "python"
    jobs = {
        "ours_loader": (
            sys.executable,
            [str(HERE / "_side_ours.py"), "loader", *common, "--repeats", str(a.repeats)],
        ),
        "ours_train": (
            sys.executable,
            [
                str(HERE / "_side_ours.py"),
                "train",
                *common,
                "--epochs",
                str(a.epochs),
                "--cells",
                str(a.train_cells),
            ],
        ),
        "annb_loader": (annb_py, [str(HERE / "_side_annbatch.py"), *common]),
        "annb_loader_zarrpy": (annb_py, [str(HERE / "_side_annbatch.py"), *common, "--no-zarrs"]),
        "ref_loader": (
            ref_py,
            [str(HERE / "_side_ref.py"), "loader", *common, "--seconds", str(a.ref_loader_seconds)],
        ),
        "ref_train": (
            ref_py,
            [
                str(HERE / "_side_ref.py"),
                "train",
                *common,
                "--cells",
                str(a.ref_train_cells),
                "--epochs",
                str(a.ref_epochs),
            ],
        ),
    }
    results = {"data": data, "args": vars(a), "nproc": os.cpu_count()}
    for name, (py, args) in jobs.items():
        if a.only and name not in a.only:
            continue
        print(f"[side-by-side] {name} ...", file=sys.stderr, flush=True)
        results[name] = run_worker(name, py, args, work, timeout=1800)
        print(f"[side-by-side] {name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    results["wall_s"] = time.perf_counter() - t0
    print(
        f"data: {a.cells} cells x {a.genes} genes, {a.types} types, density "
        f"{data.get('density', float('nan')):.3f}; batch {a.batch_size}; nproc {os.cpu_count()}; "
        f"wall {results['wall_s']:.0f} s"
    )
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
