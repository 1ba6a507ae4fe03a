"""A miniature procedurally generated image-text world and an evaluator trained on it (issue 8, part 1).

The evaluator is imported lazily (`from dopsd.world.evaluator import ...`) so that generating data needs
only numpy and pillow."""
from .generator import *  # noqa: F401,F403
from .generator import __all__  # noqa: F401
