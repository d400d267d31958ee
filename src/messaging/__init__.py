"""Everything that travels through RabbitMQ over STOMP.

- `destinations`: the queue and topic names of one `QUEUE_PREFIX`, with the headers
  that declare them (RabbitMQ refuses a re-declaration whose arguments differ).
- `broker`: one STOMP connection that reconnects with back-off and re-subscribes.
- `schema`: the messages themselves, headers and lossless binary bodies.
"""
