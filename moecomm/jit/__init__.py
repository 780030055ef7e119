"""What every kernel family shares: the implementation choice (backend.py), custom ops with their
fake and autograd formula (ops.py), Triton launches with little host time (launch.py), the on-disk
cache with its cross-process lock and atomic publish (cache.py), and the compile cache of the CUDA
C++ sources under kernels/ (cuda.py). Importing it imports none of them."""
