"""Herald: reliable outbound messaging on RabbitMQ and PostgreSQL."""

from consumer import amqp_decode

__version__ = "0.1.0"

# Before any connection exists: a publisher's header name or message id that is
# not UTF-8 must not stop the connection that reads it (see consumer.amqp_decode).
amqp_decode.install()
