"""Media files as every part of the product reads and writes them: probing an upload
(probe.py), audio as float32 files (pcm.py), writing a file so that no reader ever sees
half of it (atomic.py). Below both the server and the kinds; imports neither."""
