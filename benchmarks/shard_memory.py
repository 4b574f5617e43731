"""Resident memory of a task-generation actor streaming episodes from >= 2 GB of shards.

Builds (once) mini-ImageNet-shaped shards of random images (3x84x84, 1,000 classes x 100 images,
2.1 GB), then runs the real TaskGenerator as a Ray actor and pulls MAML's mini-ImageNet batches
(5-way 1-shot 15-query, meta-batch 4) from it, reading the actor's /proc/<pid>/status as it goes.
Side by side: the shards memory-mapped (task.map_shards_mb above their size) and read with pread
(the default for shards over 256 MB). Target: the actor's RSS stays within 300 MB of its start.

RSS is split into anonymous memory, mapped files and shared memory. The shared part is Ray's
object store (the batches the actor returns are written there); it is the object store's memory,
bounded by its size and counted once per node, which is why Ray's own memory accounting leaves it
out (RSS minus shared). We report the growth of anonymous + file-backed memory (the actor's own
memory, mapped shards included) as the target figure, and the full RSS beside it.

    python benchmarks/shard_memory.py [--shards data/bench_2gb] [--steps 4000]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import ray

from distmeta.config import load_config
from distmeta.data.shards import ClassImages, write_shards
from distmeta.runtime.control import StepControl
from distmeta.runtime.task_generator import TaskGenerator

CLASSES, IMAGES, SHAPE = 1000, 100, (3, 84, 84)


def build(out: Path) -> None:
    if (out / "manifest.json").is_file():
        return
    print(f"writing {CLASSES * IMAGES * np.prod(SHAPE) / 1e9:.1f} GB of shards to {out} (once)", flush=True)
    rng = np.random.default_rng(0)
    classes = [ClassImages(f"c{i:04d}", "g", rng.integers(0, 256, (IMAGES, *SHAPE), np.uint8)) for i in range(CLASSES)]
    splits = {"bench/train": list(range(800)), "bench/val": list(range(800, 900)), "bench/test": list(range(900, 1000))}
    write_shards(out, classes, splits)


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0])
    return fields


def stream(shards: Path, map_shards_mb: int, steps: int) -> dict:
    cfg = load_config(
        None,
        [
            *("task.source=shards", "model.name=conv4", f"task.shards={shards}", "task.split_scheme=bench"),
            *("task.rotations=false", "task.ways=5", "task.shots=1", "task.queries=15"),
            f"task.map_shards_mb={map_shards_mb}",
            "train.meta_batch_size=4",
        ],
    )
    generator = ray.remote(TaskGenerator).options(num_cpus=0).remote(cfg, [4], [0])
    pid = ray.get(generator.__ray_call__.remote(lambda self: os.getpid()))
    start = memory_kib(pid)
    peak = dict(start)
    started = time.perf_counter()
    for step in range(steps):
        batch = ray.get(generator.batch_for.remote(StepControl(step), 0))
        assert batch.query_x.shape == (4, 75, *SHAPE)
        if step % 20 == 0 or step == steps - 1:
            peak = {key: max(peak[key], value) for key, value in memory_kib(pid).items()}
    seconds = time.perf_counter() - started
    ray.kill(generator)
    own = {name: (m["RssAnon"] + m["RssFile"]) / 1024 for name, m in (("start", start), ("peak", peak))}
    return {
        "mode": "mmap" if map_shards_mb << 20 > sum(p.stat().st_size for p in shards.glob("*.arrow")) else "pread",
        "episodes_per_s": steps * 4 / seconds,
        "own_start_mb": own["start"],
        "own_growth_mb": own["peak"] - own["start"],
        "rss_start_mb": start["VmRSS"] / 1024,
        "rss_growth_mb": (peak["VmRSS"] - start["VmRSS"]) / 1024,
        "start_mb": {key: round(value / 1024, 1) for key, value in start.items()},
        "peak_mb": {key: round(value / 1024, 1) for key, value in peak.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="data/bench_2gb")
    parser.add_argument("--steps", type=int, default=4000)
    args = parser.parse_args()
    shards = Path(args.shards)
    build(shards)
    size = sum(p.stat().st_size for p in shards.glob("*.arrow"))
    reads = args.steps * 4 * 80
    times = reads / (800 * IMAGES)  # the training split's images
    print(f"{size / 1e9:.2f} GB of shards; {args.steps} batches read {reads:,} images, {times:.0f}x the training split")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = [stream(shards, 8192, args.steps), stream(shards, 256, args.steps)]
    ray.shutdown()
    print(f"{'':6} {'episodes/s':>10} {'anon+file: start':>17} {'growth':>7} {'RSS: start':>11} {'growth':>7}  (MB)")
    for r in rows:
        print(
            f"{r['mode']:6} {r['episodes_per_s']:10,.0f} {r['own_start_mb']:17.0f} {r['own_growth_mb']:7.0f} "
            f"{r['rss_start_mb']:11.0f} {r['rss_growth_mb']:7.0f}"
        )
    print("peak anon / file / shared (MB):", "; ".join(f"{r['mode']} {r['peak_mb']}" for r in rows))
    print(json.dumps({"shard_bytes": size, "rows": rows}))


if __name__ == "__main__":
    main()
