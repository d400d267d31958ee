"""The stem-separation job kind (`separate`): how a song splits into jobs, how a worker
processes one, and how the results merge back. Everything that knows about demucs lives here.

- `kind.py`: the server half (src/kinds/base.py's `Kind`): prepare, plan, payload, check, merge.
- `runner.py`: the worker half (`Runner`): checks a job, runs it.
- `prepare.py`: decoding and normalisation before planning.
- `plan.plan_jobs`: the splitter. Cuts the song into `JobPlan`s on the server.
- `compute.run_jobs`: the processing. Runs on a worker, the segments of the jobs it holds batched.
- `merge.merge_results`: the merger. Streams the stored results into whole stems.

Why the merge is exact. demucs' `apply_model(split=True, shifts=0, overlap=0.25)`
runs the model on segments whose offsets lie on a fixed grid, `range(0, L, stride)`,
each fed its segment plus some neighbouring audio (`TensorChunk.padded`), and blends
them as `sum(w * out) / sum(w)` with triangular weights `w`. A job here owns a run of
consecutive grid offsets and is sent exactly the audio those segments read. The worker
returns the numerator of its segments, `sum(w * out)`, and the server adds the jobs'
numerators and divides by the grid's `sum(w)`. That is the same arithmetic as the
whole-file call, on the same segments, so the workers together run the model on
exactly as many segments as one whole-file call does, and the result matches it.
A naive split (separate each piece alone, concatenate) re-pads every piece boundary
and loses that; `tests/test_fidelity.py` shows both.
"""

# Jobs run on one device class per task: "" is the kind's plain jobs queue, which CPU workers
# take; "cuda" the GPU workers' (a GPU's and a CPU's answers differ by about 40 dB, so a task
# whose jobs mixed both would carry a seam). The server prefers a GPU when one is live.
ROUTES = ("", "cuda")

# The output that mixes the kept sources (the other outputs are the sources). Here, not in
# kind.py, so that the karaoke façade can name it without importing torch.
MIX = "mix"
