"""Lazy readers for images, masks and metadata (contract 3.1 of ARCHITECTURE.md)."""
