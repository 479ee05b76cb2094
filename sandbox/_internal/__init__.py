"""Internals of the sandbox package: backends, image builder, seccomp compiler, namespace init."""
