"""The parameters every test reads, seeded once into moto, and the kwargs
configurations the conformance tests compare under."""

from __future__ import annotations

VARIABLES = {
    "plain": ("hello", "String"),
    "secret": ("s3cr3t-v@lue", "SecureString"),
    "prod_db_host": ("db.prod.example", "String"),
    "shared_region": ("eu-west-1", "String"),
    "json_var": ('{"a": 1, "b": [1, 2], "c": {"d": null}}', "String"),
    "unicode": ("p\u00e4ss \U0001f511\ttab\nnewline", "SecureString"),
    "list": ("a,b,c", "StringList"),
    "team/nested_key": ("deep", "String"),
    # A name that is both a parameter and a prefix of others ("directory wins").
    "parent": ("parent-value", "String"),
    "parent/child": ("child-value", "String"),
}

CONNECTIONS = {
    "db_postgres": (
        "postgresql://user:p%40ss%2Fword@db.example.com:5432/app?sslmode=require&connect_timeout=10",
        "SecureString",
    ),
    "db_json": (
        '{"conn_type": "mysql", "host": "m.example", "login": "root", "password": "pa ss:w@rd",'
        ' "port": 3306, "schema": "app", "extra": {"charset": "utf8"}}',
        "SecureString",
    ),
    "http_api": ("https://user:token@api.example.com/v1", "String"),
    "aws_default": ("aws://?region_name=eu-west-1", "String"),
}

CONFIG = {
    "sql_alchemy_conn": ("postgresql://airflow@db/airflow", "SecureString"),
    "secret_key": ("flask-secret-key", "SecureString"),
    "smtp_password": ("mail-pass", "String"),
}

MISSING = ["nope", "team/nope", "parent/nope", "plain/below_a_file"]

# Seeded under the default prefixes and under the custom ones of TEAM.
PREFIXES = [
    ("/airflow/variables", "/airflow/connections", "/airflow/config"),
    ("/team/vars", "/team/conns", None),
]


def kwargs_configurations(endpoint: str) -> dict[str, dict]:
    aws = {"endpoint_url": endpoint, "region_name": "us-east-1"}
    return {
        "default_prefixes": {**aws},
        "custom_prefixes_null_config": {
            **aws,
            "variables_prefix": "/team/vars",
            "connections_prefix": "team/conns/",
            "config_prefix": None,
        },
        "lookup_patterns": {
            **aws,
            "variables_lookup_pattern": "^(prod|shared)_",
            "connections_lookup_pattern": "^db_",
            "config_lookup_pattern": "^s",
        },
    }


def seed(client) -> None:
    for variables, connections, config in PREFIXES:
        for prefix, items in ((variables, VARIABLES), (connections, CONNECTIONS), (config, CONFIG)):
            if prefix is None:
                continue
            for key, (value, kind) in items.items():
                client.put_parameter(Name=f"{prefix}/{key}", Value=value, Type=kind, Overwrite=True)
