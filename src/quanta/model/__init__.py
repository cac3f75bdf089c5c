"""Llama-family models in plain PyTorch. This __init__ stays torch-free (the simulator reads config.py)."""
