"""Only what pyproject.toml cannot say: the repository's top-level kernels/ travels in the wheel as
the package data of ``moecomm._kernels`` (the CUDA sources moecomm.jit.cuda compiles at run time, and
the host C sources moecomm.jit.host compiles).

pyproject.toml's [tool.setuptools.packages.find] cannot add a package that lives outside moecomm/,
so the package list is built here: every moecomm package, plus moecomm._kernels -> kernels/.
An editable install maps moecomm._kernels to kernels/ the same way (and a checkout finds kernels/
beside moecomm/ directly: moecomm.jit.cuda.kernels_dir()).
"""

from setuptools import find_namespace_packages, setup

setup(
    # namespace packages too, as pyproject's packages.find did (a folder without __init__.py still ships)
    packages=find_namespace_packages(include=["moecomm", "moecomm.*"], exclude=["*.__pycache__"]) + ["moecomm._kernels"],
    package_dir={"moecomm._kernels": "kernels"},
    package_data={"moecomm._kernels": ["**/*.cu", "**/*.cuh", "**/*.c", "**/*.h", "*.md"]},
)
