"""Client SDK and command-line clients."""
