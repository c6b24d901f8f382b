"""framebroker: a high-throughput camera frame broker over ZeroMQ."""
__version__ = "0.1.0"
