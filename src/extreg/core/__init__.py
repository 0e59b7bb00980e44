"""The pure core: records, snapshots, the circuit breaker, health arithmetic, routing and the
wire envelope. Nothing here does I/O or imports a driver: every function is a decision on
values, so it is tested without servers and reused by every adapter."""
