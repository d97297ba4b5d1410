"""Generated code only (scripts/gen-protos from protos/; CI checks it matches with scripts/check-protos). Do not edit."""
