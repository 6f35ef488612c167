from .generate import greedy_generate

__all__ = ["greedy_generate"]
