"""`symeq eval`: the numbers every run gets (`run.py`), from a trained run loaded as plain modules (`model.py`).

Fréchet maths (`frechet.py`), the linear probe (`probe.py`), feature networks (`features/`), the report
(`report.py`), figures (`figures.py`) and the comparison of runs (`compare.py`). Must not import `train`.
"""
