"""Throwaway services for tests, benchmarks and the local demo (PostgreSQL, nats-server, HTTP receiver)."""
