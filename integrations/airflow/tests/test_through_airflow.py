"""Airflow itself, configured only by environment variables, reads through
the mount: its CLI, Variable.get in a process, and a DAG run whose tasks read
a Variable and a Connection (Python) and the same secret with `cat` (Bash)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import airflow_bin, airflow_env
from data import CONNECTIONS, VARIABLES, kwargs_configurations


def run(args, env, timeout=120):
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_airflow_cli_reads_variables_and_connections(seeded, mount):
    kwargs = kwargs_configurations(seeded.endpoint)["default_prefixes"]
    m = mount(kwargs)
    env = airflow_env(m.path, kwargs)
    out = run([airflow_bin(), "variables", "get", "secret"], env)
    assert out.strip() == VARIABLES["secret"][0]
    out = run([airflow_bin(), "connections", "get", "db_postgres", "-o", "json"], env)
    (connection,) = json.loads(out)
    assert connection["host"] == "db.example.com" and connection["password"] == "p@ss/word"


def test_variable_get_in_a_python_process(seeded, mount):
    kwargs = kwargs_configurations(seeded.endpoint)["default_prefixes"]
    m = mount(kwargs)
    script = "from airflow.models import Variable; import sys; sys.stdout.write(Variable.get('unicode'))"
    out = run([sys.executable, "-c", script], airflow_env(m.path, kwargs))
    assert out == VARIABLES["unicode"][0]


DAG = '''
import datetime, os
from airflow.hooks.base import BaseHook
try:  # Airflow 3
    from airflow.sdk import DAG, Variable
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.models import Variable
    from airflow.operators.python import PythonOperator
    from airflow.operators.bash import BashOperator

OUT = os.environ["SSMFS_TEST_OUT"]

def read_through_airflow():
    with open(os.path.join(OUT, "variable"), "w") as f:
        f.write(Variable.get("secret"))
    with open(os.path.join(OUT, "password"), "w") as f:
        f.write(BaseHook.get_connection("db_postgres").password)

with DAG("ssmfs_reads", start_date=datetime.datetime(2024, 1, 1), schedule=None) as dag:
    python = PythonOperator(task_id="python", python_callable=read_through_airflow)
    bash = BashOperator(task_id="bash", bash_command='cat "$MNT/variables/secret" > "$SSMFS_TEST_OUT/cat"',
                        env={"MNT": os.environ["SSMFS_TEST_MNT"], "SSMFS_TEST_OUT": OUT})
    python >> bash

if __name__ == "__main__":
    print("STATE", dag.test().state)
'''


def test_a_dag_run_reads_the_same_secret_three_ways(seeded, mount, tmp_path):
    kwargs = kwargs_configurations(seeded.endpoint)["default_prefixes"]
    m = mount(kwargs)
    env = airflow_env(m.path, kwargs, SSMFS_TEST_OUT=str(tmp_path), SSMFS_TEST_MNT=str(m.path))
    run([airflow_bin(), "db", "migrate"], env)
    dags = os.environ["AIRFLOW__CORE__DAGS_FOLDER"]
    os.makedirs(dags, exist_ok=True)
    dag_file = os.path.join(dags, "ssmfs_reads.py")
    with open(dag_file, "w") as f:
        f.write(textwrap.dedent(DAG))
    out = run([sys.executable, dag_file], env, timeout=300)
    assert "STATE success" in out, out[-3000:]
    secret = VARIABLES["secret"][0]
    assert (tmp_path / "variable").read_text() == secret
    assert (tmp_path / "cat").read_text() == secret
    assert (tmp_path / "password").read_text() == "p@ss/word"
    assert CONNECTIONS["db_postgres"][0].startswith("postgresql://user:p%40ss%2Fword@")
