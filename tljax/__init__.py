"""tljax: transfer learning in JAX/Flax."""
