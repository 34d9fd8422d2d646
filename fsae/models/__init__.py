"""Backbones: image -> feature map."""
