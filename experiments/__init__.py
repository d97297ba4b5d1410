"""Experiments: start real protocol runs (services over gRPC), attack their transcripts, write rows and figures."""
