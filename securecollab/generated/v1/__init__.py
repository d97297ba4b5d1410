"""Generated protobuf/gRPC code for the securecollab.v1 wire format (scripts/gen-protos; do not edit)."""
