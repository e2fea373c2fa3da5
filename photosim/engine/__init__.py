"""Executing the integer model: exact integer kernels, requantization modes, PyTorch kernel emulation."""
