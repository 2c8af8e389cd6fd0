"""Integrations built on other libraries: quantization backends, LoRA recovery, perplexity, SVD baselines."""
