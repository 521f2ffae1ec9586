"""What the tests and the benchmarks share: polling, loopback ports, a live model server with minted keys, and the
blue-green world (the operator as a subprocess, a namespace handle, continuous traffic).

Importable from anywhere the repository is installed (`pip install -e .`), so neither side reaches into the other's
files by path.
"""
