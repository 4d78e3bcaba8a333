"""QMP (DESIGN section 7, layer L5): the server every VMM serves on its control socket, and a
client for operators and tests."""
