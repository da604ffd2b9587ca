"""SsmfsSecretsBackend answers exactly what Airflow's own
SystemsManagerParameterStoreBackend answers, over the same moto data, for
every kind of lookup and three kwargs configurations."""

from __future__ import annotations

import pytest
from data import CONFIG, CONNECTIONS, MISSING, VARIABLES, kwargs_configurations

from ssmfs_airflow import SsmfsSecretsBackend


def ssm_backend(kwargs):
    from airflow.providers.amazon.aws.secrets.systems_manager import SystemsManagerParameterStoreBackend

    return SystemsManagerParameterStoreBackend(**kwargs)


def uri(connection):
    return None if connection is None else connection.get_uri()


@pytest.mark.parametrize("configuration", ["default_prefixes", "custom_prefixes_null_config", "lookup_patterns"])
def test_same_answers_as_airflows_ssm_backend(seeded, mount, configuration):
    kwargs = kwargs_configurations(seeded.endpoint)[configuration]
    m = mount(kwargs)
    ours = SsmfsSecretsBackend(mountpoint=str(m.path), **kwargs)
    theirs = ssm_backend(kwargs)
    answered = 0
    for key in [*VARIABLES, *MISSING, "PROD_DB_HOST"]:
        expected = theirs.get_variable(key)
        assert ours.get_variable(key) == expected, f"variable {key!r}"
        answered += expected is not None
    for conn_id in [*CONNECTIONS, *MISSING]:
        expected = theirs.get_conn_value(conn_id)
        assert ours.get_conn_value(conn_id) == expected, f"connection {conn_id!r}"
        assert uri(ours.get_connection(conn_id)) == uri(theirs.get_connection(conn_id)), conn_id
    for key in [*CONFIG, *MISSING]:
        assert ours.get_config(key) == theirs.get_config(key), f"config {key!r}"
    assert answered > 0, "the configuration must find something"


def test_connections_deserialize_to_the_same_fields(seeded, mount):
    kwargs = kwargs_configurations(seeded.endpoint)["default_prefixes"]
    m = mount(kwargs)
    ours = SsmfsSecretsBackend(mountpoint=str(m.path))
    theirs = ssm_backend(kwargs)
    for conn_id in CONNECTIONS:
        a, b = ours.get_connection(conn_id), theirs.get_connection(conn_id)
        for field in ("conn_type", "host", "login", "password", "schema", "port", "extra"):
            assert getattr(a, field) == getattr(b, field), f"{conn_id}.{field}"
    postgres = ours.get_connection("db_postgres")
    assert postgres.password == "p@ss/word" and postgres.port == 5432
    assert ours.get_connection("db_json").extra_dejson == {"charset": "utf8"}


def test_a_name_that_is_also_a_directory_reads_its_own_value(seeded, mount):
    m = mount(kwargs_configurations(seeded.endpoint)["default_prefixes"])
    ours = SsmfsSecretsBackend(mountpoint=str(m.path))
    assert ours.get_variable("parent") == "parent-value"
    assert ours.get_variable("parent/child") == "child-value"


def test_team_name_is_accepted_as_airflow_3_passes_it(seeded, mount):
    m = mount(kwargs_configurations(seeded.endpoint)["default_prefixes"])
    ours = SsmfsSecretsBackend(mountpoint=str(m.path))
    assert ours.get_variable("plain", team_name=None) == "hello"
    assert ours.get_conn_value("http_api", team_name="analytics") == CONNECTIONS["http_api"][0]
