"""dopsd: D-OPSD on-policy self-distillation for step-distilled diffusion transformers.

Importing the package has no side effects; heavy dependencies are imported by the modules that need them.
"""
__version__ = "0.1.0"
