"""`NAME@conn/FIELD` through a real mount equals what Airflow's own
`Connection` parses from the same value (as its secrets backends deserialize
one: JSON when it starts with `{`, else a URI), field by field, for URIs and
JSON values taken from Airflow's documentation and tests. A field Airflow
leaves None or empty is an absent file; a value Airflow refuses has no
`@conn` directory at all."""

from __future__ import annotations

import json
from pathlib import Path

import airflow
import pytest

FIELDS = ["conn_type", "host", "login", "password", "schema", "port", "extra"]

VALUES = [
    # Airflow's documentation ("Managing Connections", "URI format").
    "postgresql://user:pass@localhost:5432/db",
    "my-conn-type://my-login:my-password@my-host:5432/my-schema?param1=val1&param2=val2",
    "google-cloud-platform://?key_path=%2Fkeys%2Fkey.json&scope=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fcloud-platform&project=airflow&num_retries=5",
    "aws://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI%2FK7MDENG%2FbPxRfiCYEXAMPLEKEY@",
    "aws://?__extra__=%7B%22region_name%22%3A+%22eu-west-1%22%7D",
    "mysql://login:password@host:3306/schema?charset=utf8",
    "spark://mysparkcluster.com:80?deploy-mode=cluster&spark_binary=command&namespace=kube+namespace",
    # Airflow's tests (tests/models/test_connection.py and friends).
    "scheme://user:password@host%2Flocation:1234/schema",
    "scheme://user:password@host%2Flocation:1234/schema?extra1=a%20value&extra2=",
    "scheme://user:password@host%2Flocation:1234/schema?__extra__=single+value",
    "scheme://user:password@host%2Flocation:1234/schema?extra1=a%20value&extra2=%2Fpath%2F",
    "scheme://user:password@host%2Flocation%3Ax%3Ay:1234/schema",
    "scheme://:password@host/schema",
    "scheme://user:@host/schema",
    "scheme://host",
    "http://https://example.com:443/path",
    "sqlite:///tmp/airflow.db",
    "postgres://user:p%40ss%3Aword@HOST.Example.COM:5432/my%20db",
    "redis://:p%C3%A4ss@redis:6379/0",
    "ssh://user@host:22?key_file=%2Fhome%2Fuser%2F.ssh%2Fid_rsa&no_host_key_check=true&timeout=10.5",
    "a://b://c://d",
    "mysql://h:notaport/db",
    # JSON, as Connection.from_json reads it.
    json.dumps({"conn_type": "postgresql", "host": "h", "login": "u", "password": "p", "schema": "s", "port": 5432, "extra": {"sslmode": "require"}}),
    json.dumps({"conn_type": "aws", "extra": {"region_name": "eu-west-1", "nested": {"a": [1, 2.5, None, True]}}}),
    json.dumps({"conn_type": "http", "host": "example.com", "port": "8080", "extra": '{"k": "v"}'}),
    "  " + json.dumps({"conn_type": "my-type", "description": "d", "login": "l\u00e4", "password": "p\u00e4ss \U0001F511"}),
    json.dumps({"conn_type": "x", "unknown_key": 1}),
]


def airflow_fields(value: str) -> dict | None:
    """The fields Airflow's secrets backend gives `value`, or None if it refuses it."""
    from airflow.models.connection import Connection

    value = value.strip()
    try:
        conn = Connection.from_json(value, conn_id="c") if value.startswith("{") else Connection(conn_id="c", uri=value)
    except Exception:
        return None
    fields = {}
    for field in FIELDS:
        got = getattr(conn, field)
        if got is not None and got != "":
            fields[field] = str(got)
    return fields


# ssmfs parses as Airflow 3 does. Airflow 2 is laxer about `extra`: it keeps
# URI query values as strings (3 JSON-decodes those that parse) and only warns
# about an extra that is not a JSON object (3 refuses the connection).
AIRFLOW_2 = airflow.__version__.startswith("2.")


def test_conn_view_fields_equal_airflows_connection(moto, mount):
    ssm = moto.client()
    for i, value in enumerate(VALUES):
        ssm.put_parameter(Name=f"/airflow/connections/view_{i:02d}", Value=value, Type="SecureString", Overwrite=True)
    m = mount({})
    compared = 0
    for i, value in enumerate(VALUES):
        view = Path(m.path) / "connections" / f"view_{i:02d}@conn"
        expected = airflow_fields(value)
        if expected is None:
            assert not view.exists(), f"Airflow refuses {value!r}; ssmfs shows {view}"
            continue
        if AIRFLOW_2:
            if not view.exists():
                continue  # refused under Airflow 3's rule for extra
            expected.pop("extra", None)
        ours = {p.name: p.read_text() for p in view.iterdir()}
        if AIRFLOW_2:
            ours.pop("extra", None)
        assert ours == expected, f"{value!r}"
        compared += 1
    assert compared >= 20
    # Views are looked up, never listed.
    assert not any("@" in p.name for p in (Path(m.path) / "connections").iterdir())
