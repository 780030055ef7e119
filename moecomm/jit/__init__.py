"""What every kernel family shares: the implementation choice (backend.py), Triton launches with
little host time (launch.py)."""
