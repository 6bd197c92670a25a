"""Inference back-ends. Each module drives one algorithm and returns a ReferenceClass."""

__all__: list[str] = []
