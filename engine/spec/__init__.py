"""Speculative decoding: the --speculative-config flag and the n-gram (prompt lookup) proposer."""
