"""DCU (SIMPLON REST) client: typed parameters with metadata, commands, specific errors. Tango-free."""
