"""gRPC servicers and the entry points that run them, one per role."""
