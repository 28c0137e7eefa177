"""Speculative decoding: proposals (prompt lookup, a draft model), verification of K+1 positions in
one forward, exact rejection sampling (docs/speculative.md)."""
