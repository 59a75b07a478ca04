"""The machinery under the game: process group (`dist`), DeepSpeed engines (`engines`), checkpoints and
TensorBoard (`monitor`). The only importers of deepspeed and tensorboard. Must not import `game` or `data`."""
