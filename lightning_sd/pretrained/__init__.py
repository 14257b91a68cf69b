"""A tiny SD1.x-architecture base pretrained here on real captioned images (Noto emoji)."""
