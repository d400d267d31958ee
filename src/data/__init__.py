"""The data plane: where job inputs and results travel, apart from the broker (the claim check).

A job message names its input and where its result goes by reference (`store.DataStore`);
the bytes move over HTTP between the worker and a store made for them: the server's own
data endpoint (`local.ServerStore` behind `endpoint`), or an S3 bucket (`s3.S3Store`).
A reference is a capability (`capability`): an HMAC the server signs, which names the job,
the attempt, the direction and an expiry. The worker's side is `client`.
"""
