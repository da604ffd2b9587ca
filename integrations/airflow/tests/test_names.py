"""Names that are not valid relative names never touch the filesystem."""

from __future__ import annotations

import pytest

from ssmfs_airflow import SsmfsSecretsBackend


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../../etc/passwd", "a/../b", "./a", "a//b", "a/", "a\0b", None, 5])
def test_invalid_names_are_none_without_a_filesystem_call(key, monkeypatch):
    def forbidden(*_args, **_kwargs):
        raise AssertionError("the filesystem was touched")

    monkeypatch.setattr("builtins.open", forbidden)
    monkeypatch.setattr("os.statvfs", forbidden)
    backend = SsmfsSecretsBackend(mountpoint="/nonexistent-mount")
    assert backend.get_variable(key) is None
    assert backend.get_conn_value(key) is None
    assert backend.get_config(key) is None
