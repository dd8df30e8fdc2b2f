"""amd135m: AMD-135M re-implemented in JAX/Flax."""
