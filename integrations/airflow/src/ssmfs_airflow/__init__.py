"""Airflow secrets backend that reads from an ssmfs mount (see backend.py)."""

from ssmfs_airflow.backend import SsmfsMountError, SsmfsNotMounted, SsmfsSecretsBackend

__all__ = ["SsmfsMountError", "SsmfsNotMounted", "SsmfsSecretsBackend"]
__version__ = "0.1.0"
