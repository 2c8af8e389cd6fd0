"""Model families: the adapters that name module paths and shapes, and the remote-code A3 model."""
