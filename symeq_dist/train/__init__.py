"""The ONE training loop (`trainer.py`, whose docstring is the step order) and what it composes: the rank's
state and RNG streams (`state.py`), the update guards (`guards.py`), preemption (`preemption.py`) and fault
drills (`drills.py`). Must not import argparse, read environment variables, or import `datasets` / `eval`."""
