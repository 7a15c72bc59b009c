"""jaxserve/parallel."""
