"""Collaborative-learning protocols: each a client and a server-side state machine, wired to gRPC in services/."""
