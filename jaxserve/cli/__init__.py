"""jaxserve/cli."""
