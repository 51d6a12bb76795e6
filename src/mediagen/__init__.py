"""mediagen: text prompts in, stored images out, through Replicate, without losing work."""

__version__ = "0.1.0"
