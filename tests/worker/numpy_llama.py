"""The NumPy reference forward pass under its first name: numpy_forward.NumpyForward covers llama
(and qwen2, untied heads, rope_freqs); see that module."""
from numpy_forward import NumpyForward as NumpyLlama  # noqa: F401
