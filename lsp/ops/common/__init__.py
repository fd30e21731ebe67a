"""Pieces shared by the op families: input validation and the chunkwise PyTorch form."""
