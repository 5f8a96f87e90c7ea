"""Speculative decoding: draft proposers and the rejection sampler that keeps the target distribution exact."""
