"""Episode generation rate of one task generator on one core: Omniglot 5-way 1-shot 15-query
episodes in batches of 32, read from the shards (the TaskGenerator's own build path, slicing and
timestamps included). Target: >= 10,000 episodes/s. Side by side: the shards memory-mapped (the
default at Omniglot's size) and read with pread (the default for shards over task.map_shards_mb).

    distmeta data build omniglot --src ../shared/data/omniglot --out data/omniglot
    python benchmarks/episodes.py --shards data/omniglot
"""

from __future__ import annotations

import argparse
import json
import os
import time

from distmeta.config import load_config
from distmeta.runtime.task_generator import TaskGenerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="data/omniglot")
    parser.add_argument("--batches", type=int, default=2000)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    results = {}
    for mode, map_shards_mb in (("mmap", 256), ("pread", 0)):
        cfg = load_config(
            None,
            [
                *("task.source=shards", "model.name=conv4", f"task.shards={args.shards}"),
                *("task.ways=5", "task.shots=1", "task.queries=15", "train.meta_batch_size=32"),
                f"task.map_shards_mb={map_shards_mb}",
            ],
        )
        generator = TaskGenerator(cfg, [32], [0], prefetch=False)
        assert generator.source.data.mapped == (mode == "mmap")
        for step in range(50):  # warm-up: page the shard in
            generator.build(step)
        start = time.perf_counter()
        for step in range(args.batches):
            generator.build(step)
        seconds = time.perf_counter() - start
        results[mode] = args.batches * 32 / seconds
        print(f"{mode:5}: {results[mode]:,.0f} episodes/s ({seconds / args.batches * 1e3:.2f} ms per batch of 32)")
    print(json.dumps({"episodes_per_s": results, "batches": args.batches}))


if __name__ == "__main__":
    main()
