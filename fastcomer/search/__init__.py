"""Beam and greedy searches: the reference (CoMER step for step) and the decoding engine."""
