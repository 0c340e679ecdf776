"""Extraction: what the model passes produce per row (per-sample gradients and their projection, JVP embeddings, target-Hessian products) and the resumable, multi-process stores that hold them."""
