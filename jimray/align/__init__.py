"""Alignment of particles against wedge-free references (kernels: pure torch, no Ray, no files)."""
