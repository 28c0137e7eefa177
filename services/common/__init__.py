"""Pieces every tandem service shares: config, gRPC bootstrap, logging."""
