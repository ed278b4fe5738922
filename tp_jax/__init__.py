"""tp-jax: target propagation with analytical (TJMC) feedback in JAX."""
