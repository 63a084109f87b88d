"""bench/dataplane_carry.py in parts: what the GPU machine needs, downloaded, trimmed, packed and split."""
