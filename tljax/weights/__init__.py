"""Pretrained weights: read files into flat arrays (never running code), merge into a model."""
