"""Herald: reliable outbound messaging on RabbitMQ and PostgreSQL."""

__version__ = "0.1.0"
