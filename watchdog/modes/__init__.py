"""One module per watchdog mode."""
