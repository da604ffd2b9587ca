"""What a lookup gives when the mount or SSM fails: the documented result,
never a wrong value and never a silent None."""

from __future__ import annotations

import pytest
from conftest import Moto
from data import VARIABLES, kwargs_configurations, seed

from ssmfs_airflow import SsmfsMountError, SsmfsNotMounted, SsmfsSecretsBackend


def test_a_dead_daemon_is_an_error_naming_mountpoint_key_and_cause(seeded, mount):
    m = mount(kwargs_configurations(seeded.endpoint)["default_prefixes"])
    backend = SsmfsSecretsBackend(mountpoint=str(m.path))
    assert backend.get_variable("plain") == "hello"
    m.kill()  # SIGKILL: the mount stays, its daemon is gone
    # (What the kernel already holds may still be served; a new lookup is not.)
    with pytest.raises(SsmfsMountError) as failure:
        backend.get_conn_value("http_api")
    message = str(failure.value)
    assert str(m.path) in message and "connections/http_api" in message
    assert "not connected" in message and "restart" in message


def test_an_empty_mountpoint_is_an_error_not_a_miss(tmp_path):
    backend = SsmfsSecretsBackend(mountpoint=str(tmp_path))
    with pytest.raises(SsmfsNotMounted) as failure:
        backend.get_variable("plain")
    assert str(tmp_path) in str(failure.value) and "not an ssmfs mount" in str(failure.value)
    with pytest.raises(SsmfsNotMounted):
        backend.get_conn_value("db_postgres")


def test_a_missing_key_on_a_healthy_mount_is_none(seeded, mount):
    m = mount(kwargs_configurations(seeded.endpoint)["default_prefixes"])
    backend = SsmfsSecretsBackend(mountpoint=str(m.path))
    assert backend.get_variable("no_such_variable") is None
    assert backend.get_config("no_such_option") is None


def test_ssm_down_serves_cached_values_and_names_the_uncached_key(mount):
    moto = Moto()  # a server of its own, to stop
    try:
        seed(moto.client())
        kwargs = kwargs_configurations(moto.endpoint)["default_prefixes"]
        m = mount(kwargs, ["--request-timeout", "2s", "--max-retries", "0"], moto)
        backend = SsmfsSecretsBackend(mountpoint=str(m.path))
        assert backend.get_variable("secret") == VARIABLES["secret"][0]
        moto.stop()
        assert backend.get_variable("secret") == VARIABLES["secret"][0], "cached: served"
        # The mount-time listing covered the variables; connections were never read.
        with pytest.raises(SsmfsMountError) as failure:
            backend.get_conn_value("http_api")
        message = str(failure.value)
        assert "connections/http_api" in message and "Input/output error" in message
    finally:
        if moto.process.poll() is None:
            moto.stop()


def test_fallback_asks_ssm_directly_while_the_mount_is_unusable(seeded, tmp_path, capfd):
    kwargs = kwargs_configurations(seeded.endpoint)["default_prefixes"]
    backend = SsmfsSecretsBackend(mountpoint=str(tmp_path), fallback=True, **kwargs)
    assert backend.get_variable("secret") == VARIABLES["secret"][0]
    assert backend.get_variable("plain") == "hello"
    assert backend.get_variable("no_such_variable") is None
    out, err = capfd.readouterr()  # Airflow 3 logs through structlog to stdout
    fallbacks = [line for line in (out + err).splitlines() if "(fallback)" in line]
    assert len(fallbacks) == 1, "the fallback is logged once"
    assert str(tmp_path) in fallbacks[0]
