"""Preflight: compile the real step for a target topology, then read its memory, FLOPs and
collectives from the compiled program."""
