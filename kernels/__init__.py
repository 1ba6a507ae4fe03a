"""dopsd_kernels: Triton kernels for the D-OPSD training step, each beside its eager reference.

Installed as the package `dopsd_kernels` (source folder `kernels/`). Imports nothing from `dopsd`.
"""
