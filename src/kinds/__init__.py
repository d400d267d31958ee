"""Job kinds: each a package with a server half and a worker half (see `base.py`).

`registry.py` maps a kind's name to its package and imports it only when asked, so a
server or worker that never runs separation never imports torch.
"""
