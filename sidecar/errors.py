"""One exception hierarchy for the whole sidecar.

Driver errors (psycopg, nats-py, httptools) are wrapped at the I/O boundary with
``raise ... from exc`` so callers handle one family and logs keep the cause.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base class of every error the sidecar raises on purpose."""


class ConfigError(WorkerError):
    """Configuration (environment, .env, command line or SQL registry) is invalid."""


class MigrationError(WorkerError):
    """The schema cannot be migrated (edited migration, unknown version, failing SQL)."""


class DatabaseError(WorkerError):
    """PostgreSQL refused or lost a request."""


class InvalidInput(WorkerError):
    """A subject, header, message id or URL breaks the rules of sidecar.validation."""


class SetupError(WorkerError):
    """What the command needs is missing and will not appear by waiting: the CLI exits with code 2."""


class HttpError(WorkerError):
    """A webhook exchange failed without a (complete) response head: sidecar.http1."""
