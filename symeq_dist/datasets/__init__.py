"""Offline shard writers: one module per data set (mnist, celeba, celebamask_hq, folder, digits_seg), the
per-sample conversion engine (`convert.py`) and the packed writer (`packed.py`).

Never imported by a training process (tests/test_layout.py checks `symeq train`'s modules).
"""
