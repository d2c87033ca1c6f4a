"""Run every performance benchmark of drnn-stream and print its figures; --json FILE also writes them as one object.

Usage: python benchmarks/run_all.py --dataset PATH [--format F] [--json FILE] [--skip SECTION ...] [--profile]

Sections, in order (each can be skipped with --skip):

- kernel: the training kernel's GFLOP/s against NumPy's float32 products of
  the same shapes, batched, in the same process (kernel_efficiency_ratio);
- pipeline: the worker's steady events/s against a bare kafka-python consumer
  that only polls and decodes the same topic (end_to_end_ratio), with the
  prequential metrics on and off, and the share of each stage;
- ranking: events/s with full ranking and with sampled ranking for 1,700,
  25,000 and 250,000 items;
- memory: Redis bytes per user against the raw state size, float32 and float16
  states, the HR@10 cost of float16, and the RSS of a 1,000,000-item model;
- startup: process start to first trained event, Numba cache cold and warm;
- deps: the effect of crc32c, hiredis and orjson.

The dataset given by --dataset (for example MovieLens 100K's u.data) feeds the
pipeline, memory, startup and deps sections and --profile. The kernel and
ranking sections use synthetic streams, so they run without --dataset.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import bench_kernel
import bench_memory
import bench_pipeline
from streamer.datasets import FORMATS

SECTIONS = ("kernel", "pipeline", "ranking", "memory", "startup", "deps")
DATASET_SECTIONS = ("pipeline", "memory", "startup", "deps")
STAGES = ("poll", "decode", "dead_letter", "state_load", "compute", "state_store", "commit", "unaccounted")


def machine() -> dict:
    """Return what the figures were measured on."""
    import numba
    import numpy

    return {
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "load_average": os.getloadavg()[0],
    }


def _cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or platform.processor() where it is missing."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_kernel(figures: dict) -> None:
    print("\n== 1. Kernel efficiency (h=64, K=4, default settings, batches of 500, one core) ==")
    print(f"FLOP per trained event (see bench_kernel.flop_per_event): {figures['flop_per_event']:,}")
    print(f"training kernel: {figures['kernel_events_per_second']:,.0f} events/s = {figures['kernel_gflops']:.2f} GFLOP/s")
    print(f"NumPy, {bench_kernel.BATCH} stacked (1, h) x (h, h) products: {figures['numpy_stacked_gflops']:.2f} GFLOP/s")
    print(f"NumPy, {bench_kernel.BATCH} rows times one shared (h, h) matrix: {figures['numpy_broadcast_gflops']:.2f} GFLOP/s")
    print(f"kernel_efficiency_ratio (kernel / stacked): {figures['kernel_efficiency_ratio']:.3f}  (target >= 0.5)")
    print(f"kernel / shared-matrix product: {figures['kernel_to_broadcast_ratio']:.3f}")


def print_pipeline(figures: dict) -> None:
    print(f"\n== 2. End to end on {figures['dataset']} ({figures['events']:,} events, "
          f"{figures['partitions']} partitions, batch {figures['batch_size']}) ==")
    print(f"bare kafka-python poll + decode: {figures['bare_events_per_second']:,.0f} events/s "
          f"(runs {figures['bare_events_per_second_first']:,.0f} and {figures['bare_events_per_second_second']:,.0f})")
    print(f"worker, prequential metrics on:  {figures['worker_events_per_second']:,.0f} events/s, "
          f"end_to_end_ratio {figures['end_to_end_ratio']:.3f}  (target >= 0.6)")
    print(f"worker, prequential metrics off: {figures['worker_events_per_second_no_eval']:,.0f} events/s, "
          f"ratio {figures['end_to_end_ratio_no_eval']:.3f}")
    print("\n== 3. Share of the worker's steady wall time by stage (metrics on / off) ==")
    for stage in STAGES:
        on = figures["stage_share_of_wall"].get(stage, 0.0)
        off = figures["stage_share_of_wall_no_eval"].get(stage, 0.0)
        print(f"{stage:>12}: {on:6.1%} / {off:6.1%}")
    print(f"load average before / after: {figures['load_average_before']:.2f} / {figures['load_average_after']:.2f}")


def print_ranking(rows: list[dict]) -> None:
    print("\n== 4. Prequential ranking cost (synthetic, h=64, K=4, default settings, one core) ==")
    print(f"{'items':>9} {'ranked':>16} {'events/s':>10}")
    for row in rows:
        every = row["sample_every"]
        if every == 0:
            label = "none (training)"
        elif every == 1:
            label = "every event"
        else:
            label = f"1 in {every}"
        print(f"{row['items']:>9,} {label:>16} {row['events_per_second']:>10,.0f}")


def print_memory(figures: dict) -> None:
    print("\n== 5. Memory ==")
    for result in figures["redis"]:
        print(
            f"Redis, {result['state_dtype']} states: {result['mean_bytes_per_user']:.1f} B per user (MEMORY USAGE, "
            f"{result['users']} users) for {result['raw_state_bytes']} B of raw state: ratio {result['ratio']:.3f} "
            f"(target <= 1.5); Redis {result['redis_version']}, {result['redis_allocator']}"
        )
    cost = figures["float16_hr_cost"]
    print(f"HR@10 (one partition, same order): float32 {cost['hr_at_10_float32']:.4f}, "
          f"float16 {cost['hr_at_10_float16']:.4f}, difference {cost['difference']:+.4f}")
    rss = figures["rss"]
    print(f"worker RSS with {rss['items']:,} items at h={rss['hidden_size']}: peak {rss['peak_rss_mib']:.0f} MiB, "
          f"{rss['rss_after_train_mib']:.0f} MiB after training, for {rss['model_array_mib']:.0f} MiB of model arrays "
          f"(an idle worker process: {rss['idle_worker_rss_mib']:.0f} MiB)")


def print_startup(figures: dict) -> None:
    print("\n== 6. Start-up: process start to first trained event ==")
    for label in ("cold", "warm"):
        parts = ", ".join(
            f"{name} {figures[f'{label}_{name}_seconds']:.2f} s"
            for name in ("import", "build", "group_join", "first_batch")
            if f"{label}_{name}_seconds" in figures
        )
        print(f"Numba cache {label}: {figures[f'{label}_seconds']:.1f} s ({parts})")
    if figures.get("core_sources_changed"):
        print("warning: a drnn_core source changed during the runs, so the warm run compiled again")


def print_deps(figures: dict) -> None:
    print("\n== 7. Client packages ==")
    for key, value in figures.items():
        print(f"{key}: {value:,.3f}" if isinstance(value, float) else f"{key}: {value}")


def run(args: argparse.Namespace) -> dict:
    """Run the sections not skipped, print each as it ends, and return every figure."""
    results: dict = {"machine": machine(), "dataset": str(args.dataset) if args.dataset else None}
    print(f"machine: {results['machine']}")
    started = time.perf_counter()
    if "kernel" not in args.skip:
        results["kernel"] = bench_kernel.kernel_efficiency()
        results["kernel_efficiency_ratio"] = results["kernel"]["kernel_efficiency_ratio"]
        print_kernel(results["kernel"])
    if "pipeline" not in args.skip:
        results["pipeline"] = bench_pipeline.end_to_end(args.dataset, args.format)
        results["end_to_end_ratio"] = results["pipeline"]["end_to_end_ratio"]
        print_pipeline(results["pipeline"])
    if "ranking" not in args.skip:
        results["ranking"] = bench_kernel.ranking_cost()
        print_ranking(results["ranking"])
    if "memory" not in args.skip:
        results["memory"] = {
            "redis": [bench_memory.redis_bytes_per_user(args.dataset, args.format, dtype) for dtype in ("float32", "float16")],
            "float16_hr_cost": bench_memory.float16_hr_cost(args.dataset, args.format),
            "rss": bench_memory.worker_rss(),
        }
        print_memory(results["memory"])
    if "startup" not in args.skip:
        results["startup"] = bench_pipeline.startup(args.dataset, args.format)
        print_startup(results["startup"])
    if "deps" not in args.skip:
        import bench_deps

        results["deps"] = bench_deps.dependency_effects(args.dataset, args.format)
        print_deps(results["deps"])
    if args.profile:
        results["profile"] = bench_pipeline.profile_worker(args.dataset, args.format)
        print("\n== Profile of the worker's main thread (pyinstrument) ==")
        print(results["profile"])
    results["seconds"] = time.perf_counter() - started
    print(f"\nall sections: {results['seconds']:.0f} s")
    return results


def dataset_error(args: argparse.Namespace) -> str | None:
    """Return why the requested sections cannot run on --dataset, or None when they can."""
    sections = [section for section in DATASET_SECTIONS if section not in args.skip]
    if not sections and not args.profile:
        return None
    if args.dataset is None:
        problem = "no --dataset given"
    elif not args.dataset.exists():
        problem = f"dataset {args.dataset} not found"
    elif not args.dataset.is_file():
        problem = f"dataset {args.dataset} is not a file"
    else:
        return None

    readers = []
    fixes = []
    if args.profile:
        readers.append("--profile")
        fixes.append("drop --profile")
    if sections:
        noun = "section" if len(sections) == 1 else "sections"
        readers.append(f"the {noun} {_join_words(sections)}")
        fixes.append(f"skip {'it' if len(sections) == 1 else 'them'} with --skip {' '.join(sections)}")
    verb = "needs" if len(sections) + args.profile == 1 else "need"
    subject = " and ".join(readers)
    return (
        f"{problem}. {subject[0].upper()}{subject[1:]} {verb} a dataset file. "
        f"Pass --dataset PATH/TO/ml-100k/u.data, or {' and '.join(fixes)}."
    )


def _join_words(words: list[str]) -> str:
    """Join words as "a", "a and b" or "a, b and c"."""
    if len(words) == 1:
        return words[0]
    return f"{', '.join(words[:-1])} and {words[-1]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", type=Path, metavar="PATH",
        help=f"Interaction file, for example ml-100k/u.data. --profile and the sections "
             f"{_join_words(list(DATASET_SECTIONS))} read it.",
    )
    parser.add_argument("--format", default="movielens", choices=FORMATS, help="Format of --dataset. Default: %(default)s")
    parser.add_argument("--json", type=Path, metavar="FILE", help="Also write every figure to FILE as one JSON object.")
    parser.add_argument("--skip", nargs="+", default=[], choices=SECTIONS, metavar="SECTION",
                        help=f"Sections not to run: {', '.join(SECTIONS)}.")
    parser.add_argument("--profile", action="store_true", help="Also profile the worker with pyinstrument.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.ERROR)

    error = dataset_error(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    results = run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
