"""Local-run conveniences, not the product: the embedded PostgreSQL and NATS servers, the
demo and the sample extensions. Imported only by the commands that use them."""
