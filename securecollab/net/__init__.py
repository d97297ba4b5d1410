"""Transport and wire: gRPC servers and channels with mutual TLS, certificates, tensor encoding, byte counting, failpoints."""
