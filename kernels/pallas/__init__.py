"""Pallas kernels (GPU and TPU), each checked against a pure-jnp reference."""
