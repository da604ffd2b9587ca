"""An Airflow secrets backend that reads Variables, Connections and config
options from an ssmfs mount instead of calling SSM.

ssmfs mounted with ``--airflow`` (or ``--airflow-kwargs``) serves the layout
Airflow's ``SystemsManagerParameterStoreBackend`` reads, with the same kwargs:
``<mountpoint>/variables/<key>``, ``<mountpoint>/connections/<conn_id>`` and
``<mountpoint>/config/<key>``; prefixes, ``null`` prefixes and lookup patterns
are applied by the mount. This backend only reads files, so every lookup on a
host is answered from one shared cache (the kernel's page cache, then ssmfs's),
at no API call while warm::

    AIRFLOW__SECRETS__BACKEND=ssmfs_airflow.SsmfsSecretsBackend
    AIRFLOW__SECRETS__BACKEND_KWARGS='{"mountpoint": "/mnt/airflow"}'

Results, as Airflow expects of a backend:

- a value: the file's exact text;
- ``None`` (Airflow tries its next backend): the name does not exist
  (ENOENT on a healthy mount), or it is not a valid relative name (empty,
  absolute, ``.``/``..`` components, NUL), which is answered without touching
  the filesystem;
- ``SsmfsMountError``: anything else, named with the mountpoint, the key and
  the cause: the mountpoint is not an ssmfs mount (an empty directory: ssmfs
  is not running), the daemon died (ENOTCONN), SSM failed for an uncached value
  (EIO), access denied (EACCES). Airflow logs the exception and tries its next
  backend; it never receives a wrong value or a silent ``None``.

A healthy mount is told from an empty directory only when a read says ENOENT,
by one ``statvfs`` of the mountpoint: ssmfs reports SSM's name limit (1011) as
``f_namemax`` on a read-only mount, which no empty directory does. Reads that
find their file cost no extra system call.

``fallback: true`` delegates to Airflow's own
``SystemsManagerParameterStoreBackend``, built from the remaining kwargs (the
very kwargs the ``--airflow`` mount reads), while the mount is unusable (not
mounted, or the daemon gone); the first fallback is logged once.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from airflow.secrets import BaseSecretsBackend
from airflow.utils.log.logging_mixin import LoggingMixin

#: ssmfs's statvfs signature: SSM's limit on a parameter name's length.
SSMFS_NAMEMAX = 1011
#: Airflow's separator between a team name and a secret id (multi-team mode).
TEAM_SEP = "--"
#: Kwargs that belong to this backend; every other one is Airflow's SSM backend's.
OWN_KWARGS = ("mountpoint", "fallback")
#: Failures that mean the mount itself is unusable (fallback applies).
MOUNT_GONE = (errno.ENOTCONN, errno.ECONNABORTED)


class SsmfsMountError(RuntimeError):
    """A lookup failed for a reason other than "not found".

    ``errno`` is the failed system call's, when one failed.
    """

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


class SsmfsNotMounted(SsmfsMountError):
    """The mountpoint is not an ssmfs mount (ssmfs is not running)."""


def _is_relative_name(name: Any) -> bool:
    """Whether ``name`` can only address a file below its folder."""
    if not isinstance(name, str) or not name or "\0" in name or name.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


class SsmfsSecretsBackend(BaseSecretsBackend, LoggingMixin):
    """Reads Airflow Variables, Connections and config from an ssmfs mount.

    :param mountpoint: where ssmfs is mounted with ``--airflow`` (default ``/mnt/airflow``).
    :param fallback: when the mount is unusable, ask SSM directly through Airflow's
        ``SystemsManagerParameterStoreBackend``, built from the other kwargs.
    :param kwargs: the ``SystemsManagerParameterStoreBackend`` kwargs (prefixes,
        lookup patterns, region...). The mount applies them; they are used here
        only for ``fallback``.
    """

    def __init__(self, mountpoint: str = "/mnt/airflow", fallback: bool = False, **kwargs: Any):
        super().__init__()
        self.mountpoint = os.path.abspath(mountpoint)
        self.fallback = bool(fallback)
        self.ssm_kwargs = kwargs
        self._ssm_backend = None
        self._fell_back = False

    # ----- Airflow's backend interface -----

    def get_conn_value(self, conn_id: str, team_name: str | None = None, **_: Any) -> str | None:
        return self._lookup("connections", "connection", conn_id, team_name)

    def get_variable(self, key: str, team_name: str | None = None, **_: Any) -> str | None:
        return self._lookup("variables", "variable", key, team_name)

    def get_config(self, key: str, **_: Any) -> str | None:
        return self._lookup("config", "config option", key, None)

    # ----- reading -----

    def _lookup(self, folder: str, kind: str, key: str, team_name: str | None) -> str | None:
        if not _is_relative_name(key):
            return None
        if _multi_team() and TEAM_SEP in key:
            self.log.warning("%s id %r contains %r (a team separator); not looked up", kind, key, TEAM_SEP)
            return None
        try:
            if team_name and _is_relative_name(team_name):
                value = self._read(folder, f"{team_name}{TEAM_SEP}{key}")
                if value is not None:
                    return value
            return self._read(folder, key)
        except SsmfsMountError as error:
            if self.fallback and self._mount_unusable(error):
                return self._ask_ssm(folder, key, team_name, error)
            raise

    def _read(self, folder: str, key: str) -> str | None:
        path = os.path.join(self.mountpoint, folder, key)
        try:
            return self._read_file(path)
        except IsADirectoryError:
            # A name with parameters below it is a directory; its own value is `@value`.
            try:
                return self._read_file(os.path.join(path, "@value"))
            except FileNotFoundError:
                return None
        except (FileNotFoundError, NotADirectoryError):
            # On a healthy mount this is "not found"; in an empty directory it is not.
            self._check_mounted(folder, key)
            return None
        except OSError as error:
            raise self._error(folder, key, error) from error

    @staticmethod
    def _read_file(path: str) -> str:
        # os.open/os.read, not open(): a buffered open() calls isatty(), an
        # ioctl that reaches the ssmfs daemon on every lookup (Python < 3.14).
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks).decode("utf-8")

    def _check_mounted(self, folder: str, key: str) -> None:
        try:
            stats = os.statvfs(self.mountpoint)
        except OSError as error:
            raise self._error(folder, key, error) from error
        if stats.f_namemax != SSMFS_NAMEMAX or not stats.f_flag & os.ST_RDONLY:
            raise SsmfsNotMounted(
                f"ssmfs mount {self.mountpoint}: cannot look up {folder}/{key}: "
                f"{self.mountpoint} is not an ssmfs mount (is ssmfs running? see `mount -t fuse.ssmfs`)"
            )

    def _error(self, folder: str, key: str, error: OSError) -> SsmfsMountError:
        cause = os.strerror(error.errno) if error.errno else str(error)
        hint = {
            errno.ENOTCONN: " (the ssmfs daemon is gone; restart it)",
            errno.EIO: " (SSM did not answer and the value is not cached)",
            errno.EACCES: " (IAM or KMS denies it, or the mount's --uid/--allow-other exclude this user)",
        }.get(error.errno, "")
        return SsmfsMountError(
            f"ssmfs mount {self.mountpoint}: cannot read {folder}/{key}: {cause}{hint}", error.errno
        )

    @staticmethod
    def _mount_unusable(error: SsmfsMountError) -> bool:
        return isinstance(error, SsmfsNotMounted) or error.errno in MOUNT_GONE

    # ----- fallback -----

    def _ask_ssm(self, folder: str, key: str, team_name: str | None, cause: SsmfsMountError) -> str | None:
        if not self._fell_back:
            self._fell_back = True
            self.log.warning("%s; asking SSM directly (fallback) until the mount is back", cause)
        if self._ssm_backend is None:
            from airflow.providers.amazon.aws.secrets.systems_manager import (
                SystemsManagerParameterStoreBackend,
            )

            self._ssm_backend = SystemsManagerParameterStoreBackend(**self.ssm_kwargs)
        backend = self._ssm_backend
        extra = {"team_name": team_name} if team_name else {}
        if folder == "variables":
            return backend.get_variable(key, **extra)
        if folder == "connections":
            return backend.get_conn_value(key, **extra)
        return backend.get_config(key)


def _multi_team() -> bool:
    try:
        from airflow.configuration import conf

        return conf.getboolean("core", "multi_team", fallback=False)
    except Exception:  # older Airflow: no multi-team mode
        return False
