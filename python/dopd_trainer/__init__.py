"""Reference on-policy DOPD trainer on Hugging Face causal LMs (consumes `dopd_kernels`)."""

__version__ = "0.1.0"
