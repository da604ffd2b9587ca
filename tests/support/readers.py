"""One reader process for the supervisor tests: opens, reads and checks the
given files round-robin until a deadline, and prints one JSON line:
reads, failures (an error), wrong (other bytes than expected) and the
longest read in milliseconds. Expected contents come as name=value pairs."""

import json
import os
import sys
import time

mount, seconds, pairs = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
expected = [(os.path.join(mount, p.split("=", 1)[0]), p.split("=", 1)[1].encode()) for p in pairs]
deadline = time.monotonic() + seconds
reads = failures = wrong = 0
longest = 0.0
errors = {}
i = 0
while time.monotonic() < deadline:
    path, value = expected[i % len(expected)]
    i += 1
    started = time.monotonic()
    try:
        with open(path, "rb") as f:
            got = f.read()
        if got != value:
            wrong += 1
    except OSError as e:
        failures += 1
        errors[e.strerror] = errors.get(e.strerror, 0) + 1
    longest = max(longest, (time.monotonic() - started) * 1000)
    reads += 1
print(json.dumps({"reads": reads, "failures": failures, "wrong": wrong, "longest_ms": round(longest, 1), "errors": errors}))
