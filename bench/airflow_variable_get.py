"""Benchmark row 7: Variable.get through Airflow, with its secrets backend set
to ssmfs_airflow.SsmfsSecretsBackend or to Airflow's own
SystemsManagerParameterStoreBackend (configured only by environment variables,
as on a worker). Prints "<mean microseconds per Variable.get> <lookups>".

    python bench/airflow_variable_get.py ssmfs|tmpfs|ssm ENDPOINT MOUNTPOINT LOOKUPS

`tmpfs` is ssmfs_airflow over a tmpfs copy of the mount's layout (MOUNTPOINT),
the floor for what the backend itself costs per lookup.

Each of the 50 keys /bench/hot/sNN is read once first (the cold reads), then
LOOKUPS reads cycle through them; the caller counts API calls around it.
"""

import json
import os
import sys
import tempfile
import time

backend, endpoint, mountpoint, lookups = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
kwargs = {"variables_prefix": "/bench/hot", "connections_prefix": None, "config_prefix": None,
          "endpoint_url": endpoint, "region_name": "us-east-1"}
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="ssmfs-bench-airflow-")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
if backend in ("ssmfs", "tmpfs"):
    os.environ["AIRFLOW__SECRETS__BACKEND"] = "ssmfs_airflow.SsmfsSecretsBackend"
    kwargs["mountpoint"] = mountpoint
else:
    os.environ["AIRFLOW__SECRETS__BACKEND"] = (
        "airflow.providers.amazon.aws.secrets.systems_manager.SystemsManagerParameterStoreBackend"
    )
os.environ["AIRFLOW__SECRETS__BACKEND_KWARGS"] = json.dumps(kwargs)

from airflow.models import Variable  # noqa: E402  (after the environment is set)

keys = [f"s{i:02d}" for i in range(50)]
for key in keys:
    Variable.get(key)
print("WARM", flush=True)
sys.stdin.readline()
started = time.perf_counter()
for i in range(lookups):
    Variable.get(keys[i % len(keys)])
print(f"{(time.perf_counter() - started) * 1e6 / lookups:.0f} {lookups}", flush=True)
