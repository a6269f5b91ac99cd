"""Settings, errors and logging: the bottom layer every other package may import."""
