"""upcycle: exact dense-to-MoE upcycling of Hugging Face language models."""

__version__ = "0.1.0"
