"""pytest-benchmark suite: this library against naive PyTorch, torch.compile and peer libraries (see README.md)."""
