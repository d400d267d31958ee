"""`make bench`: measured claims about speed, fidelity, memory and load (see bench/run.py)."""
