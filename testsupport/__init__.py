"""Harnesses for tests and benchmarks, outside the installed package: throwaway PostgreSQL
servers, a multi-node cluster, statement counting, the OpenTelemetry provider switch."""
