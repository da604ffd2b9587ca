"""Readers for `scripts/fleet.sh --check`: one thread per mount, each reading
the 50 keys d{0..4}/k{0..9} at 2 reads a second (Poisson), Zipf-distributed as
examples/fleet.rs reads them (key i in proportion to 1/(i+1)), for SECONDS.

    python bench/fleet_readers.py SECONDS MOUNT...
"""

import bisect
import random
import sys
import threading
import time

seconds, mounts = float(sys.argv[1]), sys.argv[2:]
weights = [1 / (i + 1) for i in range(50)]
total = sum(weights)
cdf, acc = [], 0.0
for w in weights:
    acc += w / total
    cdf.append(acc)
failures = []


def read(mount, seed):
    rng = random.Random(seed)
    end = time.monotonic() + seconds
    while True:
        time.sleep(rng.expovariate(2.0))
        if time.monotonic() >= end:
            return
        i = min(bisect.bisect_left(cdf, rng.random()), 49)
        d, k = divmod(i, 10)
        try:
            with open(f"{mount}/d{d}/k{k}", "rb") as f:
                if f.read() != f"value-{d}-{k}".encode():
                    failures.append((mount, i, "wrong bytes"))
        except OSError as e:
            failures.append((mount, i, str(e)))


threads = [threading.Thread(target=read, args=(m, n)) for n, m in enumerate(mounts)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(f"failed reads: {len(failures)}")
sys.exit(1 if failures else 0)
