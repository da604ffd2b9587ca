"""API calls, counted by moto: 1,000 Variable.get calls over 20 keys cost
nothing after the first read of each key through ssmfs, and 1,000 calls
through Airflow's own backend."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import airflow_env

KEYS = [f"hot_{i:02d}" for i in range(20)]
LOOP = """
import json, sys, time
from airflow.models import Variable
keys = json.loads(sys.argv[1])
for key in keys:
    Variable.get(key)                     # the first read of each key
print("WARM", flush=True)
sys.stdin.readline()                      # the test counts calls here
started = time.perf_counter()
for i in range(1000):
    assert Variable.get(keys[i % len(keys)]) == "value-" + keys[i % len(keys)]
print("DONE", (time.perf_counter() - started) / 1000, flush=True)
"""


def next_marker(process, marker):
    """The next stdout line that starts with `marker` (Airflow logs to stdout too)."""
    for line in process.stdout:
        if line.startswith(marker):
            return line.split()
    raise AssertionError(f"the loop ended before {marker}")


def count_loop(moto, env, log):
    """(SSM calls during 1,000 warm Variable.get, seconds per call)."""
    process = subprocess.Popen(
        [sys.executable, "-c", LOOP, json.dumps(KEYS)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),
        text=True,
    )
    next_marker(process, "WARM")
    before = moto.requests()
    process.stdin.write("\n")
    process.stdin.flush()
    done = next_marker(process, "DONE")
    process.wait()
    return moto.requests() - before, float(done[1])


def test_a_thousand_variable_gets_cost_nothing_once_warm(seeded, mount, tmp_path):
    client = seeded.client()
    for key in KEYS:
        client.put_parameter(Name=f"/cost/variables/{key}", Value=f"value-{key}", Type="SecureString", Overwrite=True)
    kwargs = {"variables_prefix": "/cost/variables", "connections_prefix": None, "config_prefix": None,
              "endpoint_url": seeded.endpoint, "region_name": "us-east-1"}
    m = mount(kwargs)
    calls, _ = count_loop(seeded, airflow_env(m.path, kwargs), tmp_path / "ssmfs.log")
    assert calls == 0, f"{calls} SSM calls for 1,000 warm Variable.get through ssmfs"

    env = airflow_env(m.path)
    env["AIRFLOW__SECRETS__BACKEND"] = "airflow.providers.amazon.aws.secrets.systems_manager.SystemsManagerParameterStoreBackend"
    env["AIRFLOW__SECRETS__BACKEND_KWARGS"] = json.dumps(kwargs)
    calls, _ = count_loop(seeded, env, tmp_path / "ssm.log")
    assert calls >= 1000, f"Airflow's own backend made {calls} calls for 1,000 lookups"
