"""Generated gRPC stubs of the ``oodguard.v1`` API (regenerate with ``scripts/gen_proto.sh``; do not edit)."""
