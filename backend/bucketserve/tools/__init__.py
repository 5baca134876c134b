"""Command-line tools: build the default model, benchmark the policies, run a batch file offline."""
