"""fedvp_jax: federated viewport prediction for 360-degree video, in JAX."""
