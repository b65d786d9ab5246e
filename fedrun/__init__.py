"""fedrun: federated learning of language models with privacy protection."""
import os

# Before torch loads OpenMP (libgomp reads this once): threads waiting for work sleep instead of
# spinning. Spinning wins alone by ~10% on tiny models, but runs sharing a machine's cores then
# burn them waiting for each other: two default runs at once took 2.7x one run alone with
# libgomp's spinning, 1.4x with passive waiting (README "Sweeps", Threads). OMP_WAIT_POLICY=ACTIVE
# in the environment restores spinning on a machine of one's own.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
