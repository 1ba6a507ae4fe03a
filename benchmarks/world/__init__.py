"""dopsd_world: a miniature procedurally generated image-text world, an evaluator trained on it, and the
builder of the toy turbo model (research and benchmark code beside the `dopsd` library, which never imports
it; installed from benchmarks/world/ with the repository, see its README.md).

The evaluator and the toy-base builder are imported lazily (`from dopsd_world.evaluator import ...`,
`dopsd_world.toybase`) so that generating data needs only numpy and pillow; so are the curved world, whose
captions leave attributes open (`dopsd_world.curved`), and its toy turbo's gate (`dopsd_world.gate`).
Command: `dopsd-world`."""
from .generator import *  # noqa: F401,F403
from .generator import __all__  # noqa: F401

from pathlib import Path as _Path

# The evaluator the world ships (`evaluator.train_evaluator(seed=0)`, trained before any model existed).
EVALUATOR_WEIGHTS = _Path(__file__).resolve().parent / "assets" / "world_evaluator.safetensors"
# The curved world's toy turbo, once built and past its gate (`dopsd-world make-toy-base --world curved`; README).
CURVED_TURBO = _Path(__file__).resolve().parent / "assets" / "curved_turbo"
