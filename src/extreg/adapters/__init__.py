"""Thin adapters around the core, one per outside system: PostgreSQL (`postgres`,
`postgres_health`, `migrate`), fixtures folders, the snapshot file and NATS. Each translates
its library's errors into `extreg.errors` in one place."""
