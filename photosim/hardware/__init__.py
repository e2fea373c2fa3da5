"""Models of the dot-product hardware the engine simulates, and their configuration."""
