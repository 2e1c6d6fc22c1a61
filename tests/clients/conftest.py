"""The client tests run against a real gateway on the digits demo model, started like the gateway tests do."""

from serve.conftest import digits_test_images, free_port, repo_copy, start_gateway  # noqa: F401  (shared fixtures)
