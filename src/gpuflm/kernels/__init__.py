"""Array-level compute, one module per operation.

Each module exposes a public function with checks and a numpydoc docstring.
Kernels never read files and never parse arguments; steps call them through
the backend. Host-only kernels (those that lean on gemmi, such as
:mod:`gpuflm.kernels.hkl`) say so in their docstring.
"""
