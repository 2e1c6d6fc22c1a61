"""Serving side: the gRPC gateway. Never imports torch."""
