"""Audio workers: `worker` is one worker process, `supervisor` runs N of them (`make workers`)."""
