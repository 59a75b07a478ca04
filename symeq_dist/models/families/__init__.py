"""Model families, one file each; `models/registry.py` maps `model.kind` to a family's `build_players`."""
