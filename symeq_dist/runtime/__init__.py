"""The machinery under the game: process group (`dist`), DeepSpeed engines (`engines`), checkpoints and
TensorBoard (`monitor`). The only importers of deepspeed and tensorboard. Must not import `game` or `data`.

Without CUDA, DS_ACCELERATOR defaults to "cpu" here, before deepspeed is imported: DeepSpeed would pick the
CPU anyway, but announce it with a warning in every process; `api.train` says once which accelerator runs.
"""

import os

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"
