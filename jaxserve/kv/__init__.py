"""The paged KV cache on the host side: page allocation and block tables (`pages`). Bookkeeping only, no JAX; the
device pool itself belongs to the runner."""
